"""The trainer's per-token logprobs of a batch, under the server's sampling transform.

The behaviour logprobs a server reports are those of the *processed* distribution
(:mod:`backend.sampling`); :func:`token_logprobs` computes the trainer's with the same
transform, so the importance ratio compares like with like.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from backend.adapters.base import MultimodalAdapter, MultimodalBatch
from backend.loss import entropy_from_logprobs
from backend.sampling import processed_logprobs

def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_logprobs(
    model: Any,
    adapter: MultimodalAdapter,
    batch: MultimodalBatch,
    *,
    temperature: float,
    bias: torch.Tensor | None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs (and entropies) of ``batch.input_ids`` under the sampling transform.

    Returns ``logprobs`` (B, L) with ``logprobs[b, t] = log p(input_ids[b, t] | < t)`` and 0
    at t = 0, and ``entropy`` (B, L) or None. Only the logits from the first completion
    position on are materialised (``logits_to_keep``), not the prompt's.
    """
    B, L = batch.input_ids.shape
    start = 0  # first position whose logits are needed
    if batch.prompt_lengths is not None and B:
        start = max(int(batch.prompt_lengths.min()) - 1, 0)
    extra: dict[str, Any] = {}
    if start > 0 and _accepts_logits_to_keep(model):
        extra["logits_to_keep"] = L - start
    else:
        start = 0
    # float32 for the softmax whatever the model computes in (bf16 logprobs are ~1% off)
    logits = adapter.forward(model, batch, **extra, use_cache=False).logits.float()  # (B, L - start, V)
    lp_full = processed_logprobs(logits[:, :-1], temperature, bias)  # (B, L - start - 1, V)
    targets = batch.input_ids[:, start + 1 :]  # (B, L - start - 1)
    chosen = lp_full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L - start - 1)
    logprobs = torch.zeros((B, L), dtype=chosen.dtype, device=chosen.device)
    logprobs[:, start + 1 :] = chosen
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.zeros((B, L), dtype=chosen.dtype, device=chosen.device)
            entropy[:, start + 1 :] = entropy_from_logprobs(lp_full.detach())
    return logprobs, entropy
