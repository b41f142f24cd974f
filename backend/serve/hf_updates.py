"""The hf engine's pauses and weight updates: check, receive (in place or staged), swap in.

A mixin of :class:`backend.serve.hf_engine.HFEngine`, kept apart so the generation loop
and the update protocol each read on their own. The engine's generation thread calls
:meth:`WeightUpdates._apply_swap` after every batch, so a staged update's weights go in
between two batches and never under a running one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from backend.errors import RequestError
from backend.weight_sync.layout import FlatLayout
from backend.weight_sync.receiver import WeightReceiver
from backend.weight_sync.wire import dtype_name

log = logging.getLogger("vlmrl.serve")


class WeightUpdates:
    """Pausing, ``/start_weight_update`` .. ``/finish_weight_update`` and ``/weight_info`` on the hf engine."""

    model: Any
    layout: FlatLayout | None
    receiver: WeightReceiver
    weight_version: int
    updating: bool
    dirty_reason: str | None
    _params: dict[str, torch.Tensor]
    _cv: threading.Condition
    _running: bool
    _swap: int | None
    _pause_reasons: set[str]
    _abort: threading.Event

    @property
    def paused(self) -> bool:
        with self._cv:
            return bool(self._pause_reasons)

    def pause(self, reason: str = "admin", mode: str = "wait") -> None:
        """Stop starting batches. ``wait``: finish the running one first; ``abort``: end it
        now (its sequences finish with reason "abort"); ``keep``: return at once."""
        if mode not in ("wait", "abort", "keep"):
            raise RequestError(f"pause mode must be wait, abort or keep, got {mode!r}")
        with self._cv:
            self._pause_reasons.add(reason)
            if mode == "keep":
                return
            if mode == "abort":
                self._abort.set()
            try:
                while self._running:
                    self._cv.wait()
            finally:
                self._abort.clear()

    def resume(self, reason: str = "admin") -> None:
        with self._cv:
            self._pause_reasons.discard(reason)
            self._cv.notify_all()

    @property
    def swap_pending(self) -> bool:
        """A finished update waits for the running batch to end before its weights go in."""
        with self._cv:
            return self._swap is not None

    def check_weight(self, name: str, shape: list[int]) -> str | None:
        """Why ``name`` with ``shape`` cannot be loaded, or None."""
        p = self._params.get(name)
        if p is None:
            return f"unknown parameter {name!r}"
        if list(p.shape) != list(shape):
            return f"parameter {name!r} has shape {list(p.shape)}, update has {list(shape)}"
        return None

    def load_weights(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors into the model (called on the loader thread while paused)."""
        with torch.no_grad():
            for name, t in named:
                self._params[name].copy_(t)

    def weight_info(self) -> dict[str, Any]:
        seen: set[int] = set()
        params = []
        for name, p in self.model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            params.append({"name": name, "dtype": dtype_name(p.dtype), "shape": list(p.shape)})
        return {"weight_version": self.weight_version, "parameters": params, "updating": self.updating,
                "ordered_updates": True, "swap_pending": self.swap_pending, "init_probe": True,
                "flat_parameters": self.layout is not None,
                "group": {"joined": self.receiver.ready, "rank": self.receiver.rank,
                          "world_size": self.receiver.world_size, "backend": self.receiver.backend,
                          "buckets_posted": self.receiver.posted}}

    def begin_update(self) -> None:
        """``/start_weight_update``. Idle engine: hold new batches and receive in place.
        Generating: receive into buffers (staged) and keep generating; the swap waits for
        the batch to end (:meth:`end_update`), so the trainer never waits for a generation."""
        if not self.receiver.ready:
            raise RequestError("no weight-transfer group: call /init_weight_transfer_engine first",
                               status=409, code="no_group")
        with self._cv:
            while self._swap is not None and self._running:  # the previous update's swap first
                self._cv.wait()
            staged = self._running
            if not staged:
                self._pause_reasons.add("update")
        self.receiver.start(staged=staged)
        self.updating = True

    def end_update(self, version: int) -> list[str]:
        """``/finish_weight_update``: on success the new weights serve every batch that starts
        from now on (swapped in at once, or right after the running batch when staged)."""
        errors = self.receiver.finish()
        self.updating = False
        if errors:
            self.receiver.discard_staged()
            if self.receiver.loaded_any:
                self.dirty_reason = f"the last update failed ({errors[0]})"
            else:
                self.resume("update")
            return errors
        with self._cv:
            self._swap = int(version)
            if not self._running:
                self._apply_swap()
        return []

    def _apply_swap(self) -> None:
        """Swap staged weights in and take the new version (caller holds ``_cv``, no batch runs)."""
        version, self._swap = self._swap, None
        if version is None:
            return
        r = self.receiver
        t0 = time.monotonic()
        errors = r.apply_staged() if r.staged else []
        if errors:
            log.error("weight update %d failed while swapping in: %s", version, "; ".join(errors[:5]))
            self.dirty_reason = f"the last update failed ({errors[0]})"
        else:
            self.weight_version = version
            self.dirty_reason = None
            log.info("weights updated to version %d (%d buckets, %.1f MB, %s)", version, r.buckets, r.bytes / 1e6,
                     f"staged, swapped in {time.monotonic() - t0:.3f}s" if r.staged else f"{r.in_place} in place")
        self._pause_reasons.discard("update")
        self._cv.notify_all()

    def abort_update(self, why: str) -> None:
        """A broken transfer: stay paused if some weights already changed, else resume."""
        self.receiver.wait_loaded()
        self.receiver.discard_staged()
        self.updating = False
        if self.receiver.loaded_any:
            self.dirty_reason = why
        else:
            self.resume("update")
