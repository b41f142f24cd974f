"""The optimizer and learning-rate schedule of ``[trainer.args]``."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from backend.config import MultimodalRLConfig
from backend.precision import Precision, precision_of, stochastic_round_

#: elements of one parameter updated at a time by :class:`StochasticRoundingAdamW`: bounds the
#: float32 temporaries of a step (~5 x 4 bytes each) whatever the largest parameter is
SR_CHUNK = 1 << 24

# torch.optim's own param-group and state keys (not vlmrl's metric names of the same spelling)
_LR, _STEP = "lr", "step"


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


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW for bfloat16 parameters whose updates are not rounded away.

    Parameters, gradients and both moments stay bfloat16 (8 bytes per parameter instead of
    16 with float32 master weights). Each step computes in float32, chunk by chunk
    (:data:`SR_CHUNK` elements, so temporaries stay small however large a parameter is),
    and writes the new weight and moments back with :func:`stochastic_round_`, which is
    unbiased: an update smaller than a bfloat16 ulp still moves the weight in expectation.
    (Nearest rounding would also freeze ``exp_avg_sq``: ``0.999 * v`` rounds back to ``v``.)
    Math as ``torch.optim.AdamW`` (decoupled weight decay, bias correction).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group[_LR], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"StochasticRoundingAdamW takes bfloat16 parameters, got {p.dtype}")
                state = self.state[p]
                if not state:
                    state[_STEP] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[_STEP] += 1
                t = float(state[_STEP])
                bc1 = 1.0 - beta1**t
                bc2_sqrt = math.sqrt(1.0 - beta2**t)
                for w, g, m, v in zip(*(_chunks(x) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))):
                    g32 = g.float()
                    m32 = m.float().lerp_(g32, 1.0 - beta1)
                    v32 = v.float().mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
                    del g32
                    w32 = w.float()
                    if wd:
                        w32.mul_(1.0 - lr * wd)
                    w32.addcdiv_(m32, v32.sqrt().div_(bc2_sqrt).add_(eps), value=-lr / bc1)
                    stochastic_round_(w, w32)
                    stochastic_round_(m, m32)
                    stochastic_round_(v, v32)
        return loss


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    """Flat views of ``t`` of at most :data:`SR_CHUNK` elements (writes go through to ``t``)."""
    flat = t.view(-1)
    return list(flat.split(SR_CHUNK))


def make_optimizer(
    params: Iterable[torch.nn.Parameter], config: MultimodalRLConfig, precision: Precision | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over ``params`` and its schedule (:func:`lr_factor`), as the config says.

    AdamW; :class:`StochasticRoundingAdamW` for bfloat16 weights with stochastic rounding.
    On CUDA the fused AdamW kernel is used: the default ``foreach`` implementation
    allocates temporaries the size of all parameters at once (~16 GiB for an 8B model in
    bfloat16), which is what runs an 80 GB card out of memory at the first step. On CPU
    torch's default (a loop over parameters) already has no such temporary.
    """
    params = list(params)
    if precision is None:
        precision = precision_of(config.dtype, config.low_precision_update)
    betas = (config.adam_beta1, config.adam_beta2)
    optimizer: torch.optim.Optimizer
    if precision.stochastic_rounding:
        optimizer = StochasticRoundingAdamW(params, lr=config.learning_rate, betas=betas,
                                            weight_decay=config.weight_decay)
    else:
        on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay,
                                      **({"fused": True} if on_cuda else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup=config.warmup_steps, total=config.max_steps, kind=config.lr_scheduler_type),
    )
    return optimizer, scheduler
