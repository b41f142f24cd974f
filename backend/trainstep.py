"""One optimizer step of :class:`~backend.trainer.MultimodalGRPOTrainer`, on one rank or several.

With ``beta == 0`` a sequence with zero advantage has zero gradient, so it is not forwarded
at all (most groups early and late in training); it still counts in the loss denominator, so
the update equals the one of the full batch. Per-token metrics (ir, entropy, clip/masked
fractions, KLs) are then those of the trained sequences.

Over several ranks (``trainer.dist``) each rank trains on its share of the step's rollouts
(:func:`backend.distributed.share`) with the global denominator, and FSDP's average of the
gradients (the losses scaled by the world size) is the gradient of the whole batch. Every forward/backward is a collective, so every rank runs as many micro-batches
as the busiest one: a rank with fewer runs "ghost" batches whose loss is multiplied by zero.
Metrics are reduced over ranks, so every rank returns the same ones.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from backend import distributed as D
from backend import records as rec
from backend.adapters.base import DroppedRollout, MultimodalBatch, ProcessorAdapter, iter_chunks
from backend.logprobs import token_logprobs
from backend.loss import LossStats, grpo_loss
from backend.models import layers_training
from backend.rollout_types import Rollout


# ``tr`` below is a MultimodalGRPOTrainer (backend/trainer.py imports this module, not the reverse)


def _ghost(tr: Any, candidates: Sequence[Rollout]) -> MultimodalBatch | None:
    """A one-sequence batch to run with zero weight (the first of ``candidates`` that encodes)."""
    for r in candidates:
        mb = tr.adapter.build_batch([r])
        if len(mb):
            return mb.to(tr.device)
    return None


def _reduce_stats(stats: LossStats, info: D.DistInfo | None) -> LossStats:
    if info is None:
        return stats
    (stats.tokens, stats.sequences, stats.ratio_sum, stats.clipped, stats.masked, stats.mismatch_kl_sum,
     stats.kl_sum, stats.entropy_sum) = D.all_sum(
        [stats.tokens, stats.sequences, stats.ratio_sum, stats.clipped, stats.masked, stats.mismatch_kl_sum,
         stats.kl_sum, stats.entropy_sum], info)
    stats.ratio_min, stats.ratio_max = D.all_min_max(stats.ratio_min, stats.ratio_max, info)
    stats.extra = {}  # per-rank extras have no agreed keys
    return stats


def grpo_step(tr: Any, rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """One optimizer step of ``tr`` on ``rollouts`` (advantages computed here). Returns metrics."""
    cfg = tr.config
    info = tr.dist
    t_start = time.perf_counter()
    tr.compute_advantages(rollouts)  # on every rank from all rollouts: groups span ranks
    mine = D.share(rollouts, info)
    dropped: list[DroppedRollout] = []
    todo: list[Rollout] = list(mine)
    valid: list[Rollout] = list(mine)
    denom_tokens = denom_seqs = None
    if cfg.beta == 0 and isinstance(tr.adapter, ProcessorAdapter):
        valid, dropped = tr.adapter.validate(mine)
        denom_tokens = sum(len(r.completion_ids) for r in valid)
        denom_seqs = len(valid)
        todo = [r for r in valid if r.advantage]
    batches: list[MultimodalBatch] = []
    for chunk in iter_chunks(todo, cfg.micro_batch_size):
        mb = tr.adapter.build_batch(chunk)
        dropped.extend(mb.dropped)
        if len(mb):
            batches.append(mb.to(tr.device))
    if denom_tokens is None or denom_seqs is None:
        denom_tokens = sum(mb.num_loss_tokens for mb in batches)
        denom_seqs = sum(len(mb) for mb in batches)
    denom_tokens, denom_seqs, n_dropped = (int(x) for x in D.all_sum([denom_tokens, denom_seqs, len(dropped)], info))
    runs = [(mb, 1.0) for mb in batches]
    if info is not None:
        missing = D.all_max(len(batches), info) - len(batches)
        ghost = _ghost(tr, [*valid, *rollouts]) if missing else None
        if missing and ghost is None:
            raise RuntimeError(f"rank {info.rank}: no rollout of the step can be encoded to keep the ranks in step")
        runs += [(ghost, 0.0)] * missing  # type: ignore[list-item]
    denom = float(denom_tokens if cfg.loss_agg == "token" else denom_seqs)
    scale = D.loss_scale(info)
    stats = LossStats()
    loss_sum = 0.0
    seq_tokens = 0
    tr.optimizer.zero_grad(set_to_none=True)
    t_batched = time.perf_counter()
    for mb, weight in runs:
        with tr.precision.forward_context(tr.device), layers_training(tr._ckpt_layers):
            logprobs, entropy = token_logprobs(tr.model, tr.adapter, mb, temperature=cfg.temperature, bias=tr.bias,
                                               with_entropy=True)
        ref_lp = None
        if tr.ref_model is not None:
            with torch.no_grad(), tr.precision.forward_context(tr.device):
                ref_lp, _ = token_logprobs(tr.ref_model, tr.adapter, mb, temperature=cfg.temperature, bias=tr.bias)
        out = grpo_loss(
            logprobs, mb.behavior_logprobs, mb.advantages, mb.loss_mask,
            clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
            mask_ratio_low=cfg.mask_ratio_low, mask_ratio_high=cfg.mask_ratio_high,
            ref_logprobs=ref_lp, beta=cfg.beta, agg=cfg.loss_agg, denominator=max(denom, 1.0), entropy=entropy,
        )
        loss = out.loss if weight * scale == 1.0 else out.loss * (weight * scale)
        (tr.scaler.scale(loss) if tr.scaler is not None else loss).backward()
        if weight:
            loss_sum += float(out.loss.detach())
            stats.merge(out.stats)
            seq_tokens += mb.num_tokens
    if tr.device.type == "cuda":
        torch.cuda.synchronize(tr.device)  # the backward's kernels count here, not in the optimizer's time
    t_backward = time.perf_counter()
    has_data = denom_seqs > 0
    if has_data and not runs:
        for p in tr.params:  # what a batch of zero advantages gives: AdamW still steps
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    if has_data and tr.scaler is not None:
        tr.scaler.unscale_(tr.optimizer)
    grad_norm = float(D.full_tensor(torch.nn.utils.clip_grad_norm_(tr.params, cfg.max_grad_norm))) if has_data else 0.0
    lr = tr.scheduler.get_last_lr()[0]  # the rate this step's update uses
    if has_data and tr.scaler is not None:
        tr.scaler.step(tr.optimizer)  # skips the update when the scale overflowed, then lowers it
        tr.scaler.update()
    elif has_data and math.isfinite(grad_norm):
        tr.optimizer.step()
    elif has_data:
        tr.log(f"step {tr.step + 1}: non-finite grad norm, update skipped")
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scheduler.step()
    tr.step += 1
    loss_sum, seq_tokens = D.all_sum([loss_sum, seq_tokens], info)
    stats = _reduce_stats(stats, info)
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    t_end = time.perf_counter()
    episodes = [len(r.turns) for r in rollouts if r.is_episode]
    extra = {rec.TURNS: sum(episodes) / len(episodes)} if episodes else {}
    return {
        rec.LOSS: loss_sum,
        rec.REWARD_MEAN: float(rewards.mean()) if len(rewards) else float("nan"),
        rec.REWARD_STD: float(rewards.std(unbiased=False)) if len(rewards) else float("nan"),
        **stats.summary(),
        rec.GRAD_NORM: grad_norm,
        rec.LR: lr,
        rec.NUM_ROLLOUTS: len(rollouts),
        rec.DROPPED: n_dropped,
        rec.LOSS_TOKENS: int(denom_tokens),
        rec.TRAINED_SEQUENCES: int(stats.sequences),
        rec.TOKENS: int(seq_tokens),
        rec.BATCH_S: t_batched - t_start,
        rec.FORWARD_BACKWARD_S: t_backward - t_batched,
        rec.OPTIMIZER_S: t_end - t_backward,
        **extra,
    }
