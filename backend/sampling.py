"""The sampling distribution and the end-of-turn tokens, defined once for server and trainer.

Behaviour logprobs are those of the *processed* distribution: logits plus the logit
bias (tokens that must never be sampled get ``BANNED_BIAS``), then divided by the
temperature, then log-softmax. The server samples from it and reports its logprobs; the
trainer's loss applies the same transform, so ratios compare like with like.

A completion ends at one of :func:`end_of_turn_ids`; the hf engine, in-process
generation and the banned-token list all take them from here.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

# OpenAI's logit_bias range is [-100, 100]; vLLM honours the same bound.
BANNED_BIAS = -100.0
#: end-of-turn tokens of the chat templates we serve (Qwen's), when the vocabulary has them
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


def end_of_turn_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """Token ids that end a completion.

    The ``eos_token_id`` (an int or a list) of ``generation_config``, the tokenizer's
    ``eos_token_id`` and ``eos_token``, and :data:`END_OF_TURN_TOKENS`; a token the
    vocabulary lacks (unknown id, negative or None) is left out.
    """
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    for e in eos if isinstance(eos, (list, tuple)) else [eos]:
        if isinstance(e, int):
            ids.add(int(e))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in (getattr(tokenizer, "eos_token", None), *END_OF_TURN_TOKENS):
        if isinstance(tok, str):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != unk:
                ids.add(tid)
    return frozenset(ids)


def banned_token_ids(tokenizer: Any) -> list[int]:
    """Special/added tokens a completion must never contain (image pads, vision markers...).

    End-of-turn/end-of-sequence tokens (:func:`end_of_turn_ids`) stay allowed so
    generation can stop.
    """
    allowed = end_of_turn_ids(tokenizer)
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


def processed_logits(logits: torch.Tensor, temperature: float | torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of the sampling distribution: ``(logits + bias) / temperature``. Shape kept.

    ``logits`` is (..., V). ``temperature`` is a float or a tensor that broadcasts against
    it, e.g. (B, 1) for one temperature per row. ``bias`` is (V',) or one row per sequence
    (B, V'); a bias longer than V is cut to V.
    """
    if bias is not None:
        logits = logits + bias[..., : logits.shape[-1]]
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        logits = logits / temperature
    return logits


def processed_logprobs(logits: torch.Tensor, temperature: float | torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """Log-probabilities of the sampling distribution over the last dimension (in fp32)."""
    return torch.log_softmax(processed_logits(logits.float(), temperature, bias), dim=-1)
