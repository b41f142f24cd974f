"""Flat parameter buffers: buckets that go on the wire and land without a copy."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from backend.weight_sync.wire import BucketSpec


@dataclass
class FlatLayout:
    """Parameters re-homed into one flat uint8 buffer, in ``named_parameters`` order."""

    buffer: torch.Tensor
    entries: dict[str, tuple[int, torch.dtype, list[int]]]  # name -> (byte offset, dtype, shape)

    def region(self, spec: BucketSpec) -> torch.Tensor | None:
        """The slice of :attr:`buffer` that ``spec`` maps onto exactly (same names in the same
        order, same dtypes and shapes), or None. A bucket landing there needs no copy."""
        first = self.entries.get(spec.names[0])
        if first is None:
            return None
        start = off = first[0]
        for name, dtype, shape, n in zip(spec.names, spec.dtypes, spec.shapes, spec.sizes):
            e = self.entries.get(name)
            if e is None or e[0] != off or e[1] != dtype or e[2] != list(shape):
                return None
            off += n
        return self.buffer[start:off]


def flatten_parameters(module: torch.nn.Module) -> FlatLayout:
    """Move ``module``'s parameters into one flat buffer (each ``param.data`` becomes a view).

    Values, devices, dtypes and ``requires_grad`` are unchanged. Buckets of these
    parameters then go on the wire without packing (trainer) and land in place without a
    copy (server). Parameters must share one device.
    """
    params = list(module.named_parameters())
    if not params:
        raise ValueError("module has no parameters")
    device = params[0][1].device
    if any(p.device != device for _, p in params):
        raise ValueError("parameters are on several devices; cannot flatten")
    offsets: list[int] = []
    total = 0
    for _, p in params:
        total = -(-total // p.element_size()) * p.element_size()  # align to the element size
        offsets.append(total)
        total += p.numel() * p.element_size()
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    entries: dict[str, tuple[int, torch.dtype, list[int]]] = {}
    with torch.no_grad():
        for (name, p), off in zip(params, offsets):
            n = p.numel() * p.element_size()
            view = flat[off : off + n].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            entries[name] = (off, p.dtype, list(p.shape))
    return FlatLayout(flat, entries)


def try_flatten(module: torch.nn.Module) -> tuple[FlatLayout | None, str | None]:
    """:func:`flatten_parameters` where it can be done: ``(layout, None)``, or ``(None, why)``.

    Flattening needs a second copy of the weights for a moment: skipped on a GPU without
    that room, and for parameters spread over several devices.
    """
    params = list(module.parameters())
    if params and params[0].device.type == "cuda":
        nbytes = sum(p.numel() * p.element_size() for p in params)
        free, _ = torch.cuda.mem_get_info(params[0].device)
        if free < 1.2 * nbytes:
            return None, f"{free / 1e9:.1f} GB free on {params[0].device}"
    try:
        return flatten_parameters(module), None
    except ValueError as e:
        return None, str(e)


class BufferPool:
    """Reusable flat uint8 buffers (no page-faulting a fresh 64 MB block per bucket)."""

    def __init__(self, device: torch.device | str = "cpu", pin: bool = False) -> None:
        self.device = torch.device(device)
        self.pin = pin and self.device.type == "cpu" and torch.cuda.is_available()
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (call :meth:`put` with it when done)."""
        with self._lock:
            for i, b in enumerate(self._free):
                if b.numel() >= nbytes:
                    return self._free.pop(i)
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device, pin_memory=self.pin)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel())
            del self._free[:-3]  # keep the three largest

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
