"""The GRPO loss: group-relative advantages, importance ratios, clipping, masking, KL.

Pure tensor functions, no model and no I/O. Conventions (B sequences, L positions):

* ``logprobs[b, t]`` is the log-probability of token ``t`` of sequence ``b`` given the
  tokens before it, under the *processed* sampling distribution (backend/sampling.py).
* ``loss_mask[b, t]`` is 1 on completion tokens, 0 on prompt, image and padding tokens.
* ``ratio = exp(logprobs - behavior_logprobs)`` is pi_theta / pi_behaviour per token.

Per token (A = advantage of the token's sequence)::

    pg   = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl   = exp(ref - logp) - (ref - logp) - 1           # k3 estimator, >= 0
    loss = pg + beta * kl,  zeroed where ratio leaves [mask_low, mask_high]

Aggregation: ``token`` sums over all loss tokens and divides by their count (all
sequences together); ``sequence`` averages each sequence's tokens, then the sequences.
Masked tokens stay in the denominators, so one outlier token cannot inflate the weight
of the others. ``denominator`` lets a caller running micro-batches pass the count of the
*whole* batch, so that accumulated gradients equal those of one big batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from backend import records

LossAgg = Literal["token", "sequence"]


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """``reward - group mean`` (divided by ``group std + eps`` when ``scale``).

    rewards: (N,) float; groups: (N,) int, equal ids share a prompt. The std is the
    unbiased one (torch's default, as TRL); a group of one has std 0. Returns (N,).
    """
    rewards = rewards.float()
    _, inv = torch.unique(groups, return_inverse=True)  # (N,) dense group index
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    counts = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, torch.ones_like(rewards))
    sums = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, rewards)
    mean = (sums / counts)[inv]  # (N,)
    adv = rewards - mean
    if scale:
        sq = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inv, adv * adv)
        var = sq / (counts - 1).clamp(min=1)
        adv = adv / (var.sqrt()[inv] + eps)
    return adv


@dataclass
class LossStats:
    """Sums and extremes over loss tokens, mergeable across micro-batches."""

    tokens: float = 0.0  # loss tokens (loss_mask == 1)
    sequences: float = 0.0
    ratio_sum: float = 0.0
    ratio_min: float = math.inf
    ratio_max: float = -math.inf
    clipped: float = 0.0  # tokens whose clipped term was chosen (no gradient)
    masked: float = 0.0  # tokens outside [mask_ratio_low, mask_ratio_high]
    mismatch_kl_sum: float = 0.0  # k3 estimate of KL(behaviour || trainer)
    kl_sum: float = 0.0  # k3 estimate of KL(trainer || reference)
    entropy_sum: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def merge(self, other: "LossStats") -> "LossStats":
        """Accumulate ``other`` into self (returns self)."""
        self.tokens += other.tokens
        self.sequences += other.sequences
        self.ratio_sum += other.ratio_sum
        self.ratio_min = min(self.ratio_min, other.ratio_min)
        self.ratio_max = max(self.ratio_max, other.ratio_max)
        self.clipped += other.clipped
        self.masked += other.masked
        self.mismatch_kl_sum += other.mismatch_kl_sum
        self.kl_sum += other.kl_sum
        self.entropy_sum += other.entropy_sum
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + v
        return self

    def summary(self) -> dict[str, float]:
        """Means per loss token (NaN when there were none), by metrics.jsonl key."""
        n = self.tokens
        mean = (lambda s: s / n) if n else (lambda s: float("nan"))
        return {
            records.IR: mean(self.ratio_sum),
            records.IR_MIN: self.ratio_min if n else float("nan"),
            records.IR_MAX: self.ratio_max if n else float("nan"),
            records.CLIP_FRAC: mean(self.clipped),
            records.MASKED_FRAC: mean(self.masked),
            records.MISMATCH_KL: mean(self.mismatch_kl_sum),
            records.KL: mean(self.kl_sum),
            records.ENTROPY: mean(self.entropy_sum),
        }


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    stats: LossStats


def grpo_loss(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    mask_ratio_low: float = 0.1,
    mask_ratio_high: float = 10.0,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    agg: LossAgg = "token",
    denominator: float | None = None,
    entropy: torch.Tensor | None = None,
) -> LossOutput:
    """The clipped, masked policy-gradient loss of one (micro-)batch.

    logprobs: (B, L) trainer logprobs (with grad); behavior_logprobs: (B, L);
    advantages: (B,); loss_mask: (B, L); ref_logprobs: (B, L) or None; entropy: (B, L)
    per-token entropy for logging only. ``denominator``: loss tokens (token agg) or
    sequences (sequence agg) of the whole batch; default: this batch's.
    """
    if agg not in ("token", "sequence"):
        raise ValueError(f"agg must be 'token' or 'sequence', got {agg!r}")
    mask = loss_mask.to(logprobs.dtype)  # (B, L)
    adv = advantages.to(logprobs.dtype)[:, None]  # (B, 1)

    on = loss_mask.bool()  # (B, L)
    log_ratio = torch.where(on, logprobs - behavior_logprobs, torch.zeros_like(logprobs))  # (B, L)
    ratio = torch.exp(log_ratio)  # (B, L)
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)  # (B, L)

    ratio_d = ratio.detach()
    keep = ((ratio_d >= mask_ratio_low) & (ratio_d <= mask_ratio_high)).to(mask.dtype) * mask  # (B, L)
    per_token = pg
    kl_tok = None
    if ref_logprobs is not None:
        d = torch.where(on, ref_logprobs - logprobs, torch.zeros_like(logprobs))
        kl_tok = torch.exp(d) - d - 1.0  # (B, L)
        if beta:
            per_token = per_token + beta * kl_tok
    per_token = per_token * keep  # (B, L)

    if agg == "token":
        denom = float(mask.sum()) if denominator is None else float(denominator)
        loss = per_token.sum() / max(denom, 1.0)
    else:
        seq_tokens = mask.sum(dim=1).clamp(min=1.0)  # (B,)
        seq_loss = per_token.sum(dim=1) / seq_tokens  # (B,)
        denom = float(mask.shape[0]) if denominator is None else float(denominator)
        loss = seq_loss.sum() / max(denom, 1.0)

    with torch.no_grad():
        n = float(on.sum())
        r = ratio_d[on]
        is_clipped = ((ratio_d < 1.0 - clip_eps_low) & (adv < 0)) | ((ratio_d > 1.0 + clip_eps_high) & (adv > 0))
        lr_d = log_ratio.detach()
        mismatch = torch.exp(lr_d) - lr_d - 1.0  # k3 of KL(behaviour || trainer), samples from behaviour
        stats = LossStats(
            tokens=n,
            sequences=float(mask.shape[0]),
            ratio_sum=float(r.sum()),
            ratio_min=float(r.min()) if n else math.inf,
            ratio_max=float(r.max()) if n else -math.inf,
            clipped=float((is_clipped & on).sum()),
            masked=float(((keep == 0) & on).sum()),
            mismatch_kl_sum=float(mismatch[on].sum()),
            kl_sum=float(kl_tok.detach()[on].sum()) if kl_tok is not None else 0.0,
            entropy_sum=float(entropy.detach()[on].sum()) if entropy is not None else 0.0,
        )
    return LossOutput(loss=loss, stats=stats)


def entropy_from_logprobs(logprobs_full: torch.Tensor) -> torch.Tensor:
    """Entropy of each distribution: (..., V) log-probabilities -> (...)."""
    return -(logprobs_full.exp() * logprobs_full).sum(dim=-1)
