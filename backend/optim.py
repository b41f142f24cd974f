"""The optimizer and learning-rate schedule of ``[trainer.args]``."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from backend.config import MultimodalRLConfig


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warmup over
    ``warmup`` steps, then constant, or decayed linearly / by a half cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def make_optimizer(
    params: Iterable[torch.nn.Parameter], config: MultimodalRLConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``params`` and its schedule (:func:`lr_factor`), as the config says."""
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup=config.warmup_steps, total=config.max_steps, kind=config.lr_scheduler_type),
    )
    return optimizer, scheduler
