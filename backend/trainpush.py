"""The trainer's weight push: send its weights to the server, gathering shards when the
model is sharded, and join the server again when it restarted.

Functions of a :class:`backend.trainer.MultimodalGRPOTrainer` (``tr``), apart from the
training loop so that each reads on its own.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Protocol

import torch

from backend import distributed as D


class WeightSink(Protocol):
    """Where weights go after an update: ``backend.weight_sync.WeightSyncClient``."""

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             dtype: torch.dtype | None = None, materialize: Callable[..., Any] | None = None) -> Any:
        """Push the weights as ``version`` (floating tensors cast to ``dtype`` when given, bucket
        by bucket, each bucket's items through ``materialize`` first); raise
        when it fails (``backend.errors.VlmrlError``)."""

    def reconnect(self, timeout_s: float | None = None) -> Any:
        """Join the server again after it restarted or the sync broke (it then holds its
        start weights; the trainer pushes its own next)."""


def gather_buckets(tr: Any, bucket_bytes: int, dtype: torch.dtype | None, done: int) -> None:
    """Gather the full weights bucket by bucket from bucket ``done`` on, as rank 0's sync
    does while it sends them (the same plan, so the same collectives in the same order)."""
    from backend.weight_sync import plan_buckets

    for items in plan_buckets(tr.named_weights(), bucket_bytes, dtype)[done:]:
        D.full_tensors([t for _, t in items])


def push(tr: Any) -> None:
    """Send the current weights as version ``step``; the server then holds them.

    Sharded: every rank gathers each bucket's full tensors as rank 0 packs it (and, if the
    sync fails half-way, the rest too, so the ranks stay in step), with one collective per
    group of tensors (:func:`backend.distributed.full_tensors`); memory above the shard is
    one bucket plus one gather buffer (at most 16 MB per rank)."""
    assert tr.weight_sync is not None
    # master weights are wider than what the server computes in
    dtype = tr.precision.compute_dtype if tr.precision.autocast else None
    with torch.no_grad():
        if tr.dist is None:
            extra = {"dtype": dtype} if dtype is not None else {}
            tr.weight_sync.sync(tr.named_weights(), version=tr.step, **extra)
        else:
            bucket_bytes = int(getattr(tr.weight_sync, "bucket_bytes"))
            D.broadcast_command(D.Command(D.CMD_PUSH, (bucket_bytes, dtype)), tr.dist)
            gathered = 0

            def materialize(items: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
                nonlocal gathered
                gathered += 1
                return list(zip([n for n, _ in items], D.full_tensors([t for _, t in items])))

            try:
                tr.weight_sync.sync(tr.named_weights(), version=tr.step, dtype=dtype, materialize=materialize)
            finally:
                gather_buckets(tr, bucket_bytes, dtype, gathered)
    tr.server_version = tr.step


def rejoin(tr: Any, why: str) -> None:
    """The server restarted or the sync group broke: wait for the server, join it
    again and push the current weights (raises if that fails too)."""
    assert tr.weight_sync is not None
    tr.log(f"trainer: {why}; re-joining the server and pushing the weights of step {tr.step}")
    t0 = time.perf_counter()
    tr.weight_sync.reconnect(tr.config.request_timeout_s)
    push(tr)
    tr.rejoins += 1
    tr.log(f"trainer: server holds the weights of step {tr.step} again ({time.perf_counter() - t0:.1f}s)")

