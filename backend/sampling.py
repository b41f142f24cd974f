"""The sampling distribution, defined once for server and trainer.

Behaviour logprobs are those of the *processed* distribution: logits plus the logit
bias (tokens that must never be sampled get ``BANNED_BIAS``), then divided by the
temperature, then log-softmax. The server samples from it and reports its logprobs; the
trainer's loss applies the same transform, so ratios compare like with like.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

# OpenAI's logit_bias range is [-100, 100]; vLLM honours the same bound.
BANNED_BIAS = -100.0


def banned_token_ids(tokenizer: Any) -> list[int]:
    """Special/added tokens a completion must never contain (image pads, vision markers...).

    End-of-turn/end-of-sequence tokens stay allowed so generation can stop.
    """
    allowed: set[int] = set()
    for tok in (getattr(tokenizer, "eos_token", None), "<|im_end|>", "<|endoftext|>"):
        if isinstance(tok, str):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                allowed.add(tid)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        allowed.add(eos)
    banned: set[int] = set()
    for tid in getattr(tokenizer, "added_tokens_decoder", {}) or {}:
        if tid not in allowed:
            banned.add(int(tid))
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        if tid not in allowed:
            banned.add(int(tid))
    return sorted(banned)


def logit_bias_for(banned: Iterable[int]) -> dict[str, float]:
    """The OpenAI ``logit_bias`` request field that bans ``banned``."""
    return {str(int(t)): BANNED_BIAS for t in banned}


def bias_vector(logit_bias: dict[str, float] | dict[int, float] | None, vocab: int,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A dense (vocab,) bias from an OpenAI-style ``logit_bias`` mapping (None if empty)."""
    if not logit_bias:
        return None
    vec = torch.zeros(vocab, device=device, dtype=dtype)
    for k, v in logit_bias.items():
        idx = int(k)
        if 0 <= idx < vocab:
            vec[idx] = float(v)
    return vec


def processed_logits(logits: torch.Tensor, temperature: float, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of the sampling distribution: ``(logits + bias) / temperature``. Shape kept."""
    if bias is not None:
        logits = logits + bias[: logits.shape[-1]]
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def processed_logprobs(logits: torch.Tensor, temperature: float, bias: torch.Tensor | None) -> torch.Tensor:
    """Log-probabilities of the sampling distribution over the last dimension."""
    return torch.log_softmax(processed_logits(logits.float(), temperature, bias), dim=-1)
