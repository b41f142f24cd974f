"""Training precision: what the weights are stored in, what the forward computes in, how updates land.

``[trainer.args] dtype`` is the compute dtype. In float32 everything is float32. In
bfloat16/float16 a plain optimizer step on low-precision weights rounds most updates away
(at lr 1e-5 one AdamW step on a bf16 model changed ~16% of the weights: an update below
half a bf16 ulp of the weight is lost), so ``low_precision_update`` chooses one of two
correct schemes:

* ``fp32-master`` (default): the model's parameters stay float32 (the master weights),
  the forward and backward run under :func:`torch.autocast` in the compute dtype, the
  optimizer state is float32; float16 adds dynamic loss scaling. 16 bytes per parameter
  (+ autocast's transient low-precision weight copies).
* ``stochastic-rounding`` (bfloat16 only): parameters, gradients and AdamW moments are
  bfloat16 (8 bytes per parameter); each update is computed in float32 and rounded to
  bfloat16 stochastically, so it is kept in expectation
  (:class:`backend.optim.StochasticRoundingAdamW`).

The weights sent to the inference server are in the compute dtype either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How the trainer stores, computes and updates (see the module docstring)."""

    param_dtype: torch.dtype  # what the model's parameters are stored in
    compute_dtype: torch.dtype  # forward/backward, and the weights sent to the server
    stochastic_rounding: bool = False

    @property
    def autocast(self) -> bool:
        """Whether the forward runs under autocast (master weights wider than the compute dtype)."""
        return self.param_dtype != self.compute_dtype

    @property
    def loss_scaling(self) -> bool:
        """float16 gradients underflow without a loss scale; bfloat16's range needs none."""
        return self.autocast and self.compute_dtype == torch.float16

    @property
    def param_dtype_name(self) -> str:
        return _name(self.param_dtype)

    def forward_context(self, device: torch.device | str) -> ContextManager[Any]:
        """The context the model's forward runs in (autocast to the compute dtype, or nothing)."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.compute_dtype)

    def describe(self) -> str:
        """One line for the trainer's log."""
        if not self.autocast and not self.stochastic_rounding:
            return f"{_name(self.compute_dtype)} weights and optimizer"
        if self.stochastic_rounding:
            return "bfloat16 weights and AdamW state, updates rounded stochastically"
        scale = " with loss scaling" if self.loss_scaling else ""
        return f"fp32 master weights, {_name(self.compute_dtype)} autocast{scale}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_of(dtype: str, low_precision_update: str = "fp32-master") -> Precision:
    """The :class:`Precision` of ``[trainer.args] dtype`` and ``low_precision_update``."""
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    compute = _DTYPES[dtype]
    if compute == torch.float32:
        return Precision(torch.float32, torch.float32)
    if low_precision_update == "stochastic-rounding":
        if compute != torch.bfloat16:
            raise ValueError("stochastic-rounding needs dtype bfloat16")
        return Precision(torch.bfloat16, torch.bfloat16, stochastic_rounding=True)
    if low_precision_update != "fp32-master":
        raise ValueError(f"unknown low_precision_update {low_precision_update!r}")
    return Precision(torch.float32, compute)


def stochastic_round_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write float32 ``source`` into bfloat16 ``target``, rounding stochastically.

    Each value rounds up to the next bfloat16 with probability equal to its distance from
    the one below, measured in bfloat16 ulps, so the rounding is unbiased: adding random
    integers below 2**16 to the float32 bit pattern and truncating the low 16 bits.
    ``source`` is overwritten (it is a temporary of the caller).
    """
    if target.dtype != torch.bfloat16 or source.dtype != torch.float32:
        raise TypeError(f"stochastic rounding goes float32 -> bfloat16, not {source.dtype} -> {target.dtype}")
    bits = source.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    bits.add_(noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000: keep sign, exponent, 7 mantissa bits
    target.copy_(source)  # exact: the dropped bits are zero


__all__ = ["Precision", "precision_of", "stochastic_round_"]
