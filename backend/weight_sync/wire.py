"""The weight-sync wire format: dtype names and flat buckets of named tensors.

A bucket is the named tensors' raw bytes concatenated in ``names`` order, no padding
(vLLM's packed layout); :class:`BucketSpec` is the ``update_info`` that announces it.
Imports only torch: vLLM's worker (:mod:`backend.vllm_ext.engine`) reads buckets with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

DEFAULT_BUCKET_BYTES = 64 << 20
# dtypes a bucket may carry, by the name vLLM uses (``str(dtype)`` without "torch.").
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
        "uint8", "bool", "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the ``dtype_names`` vocabulary)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; ``ValueError`` for anything else."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported dtype name {name!r}") from None


@dataclass
class BucketSpec:
    """What one flat bucket holds: names, dtypes and shapes, in packing order."""

    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[list[int]]

    @property
    def sizes(self) -> list[int]:
        """Byte size of each tensor."""
        return [math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes)]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def update_info(self) -> dict[str, Any]:
        """The ``update_info`` body of ``/update_weights`` (vLLM's packed format)."""
        return {
            "names": list(self.names),
            "dtype_names": [dtype_name(d) for d in self.dtypes],
            "shapes": [list(s) for s in self.shapes],
            "packed": True,
            "packed_buffer_size_bytes": self.nbytes,
            "packed_num_buffers": 1,
        }

    @classmethod
    def from_update_info(cls, info: Any) -> "BucketSpec":
        """Parse and validate an ``update_info`` mapping (``ValueError`` naming the problem)."""
        if not isinstance(info, dict):
            raise ValueError("update_info must be an object with names, dtype_names and shapes")
        names, dnames, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
        for key, val in (("names", names), ("dtype_names", dnames), ("shapes", shapes)):
            if not isinstance(val, list):
                raise ValueError(f"update_info.{key} must be a list")
        assert isinstance(names, list) and isinstance(dnames, list) and isinstance(shapes, list)
        if not names:
            raise ValueError("update_info.names is empty")
        if not len(names) == len(dnames) == len(shapes):
            raise ValueError(
                f"update_info lists differ in length: {len(names)} names, {len(dnames)} dtype_names, "
                f"{len(shapes)} shapes"
            )
        if info.get("packed") is False:
            raise ValueError("only packed updates are supported (one flat broadcast per call)")
        out_shapes: list[list[int]] = []
        for name, shape in zip(names, shapes):
            if not isinstance(name, str) or not name:
                raise ValueError(f"update_info.names holds a non-string or empty name: {name!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"shape of {name!r} must be a list of non-negative ints, got {shape!r}")
            out_shapes.append([int(d) for d in shape])
        spec = cls(list(names), [dtype_from_name(d) for d in dnames], out_shapes)
        declared = info.get("packed_buffer_size_bytes")
        if isinstance(declared, int) and declared < spec.nbytes:
            raise ValueError(
                f"packed_buffer_size_bytes={declared} is smaller than the bucket ({spec.nbytes} bytes); "
                "send one /update_weights call per flat bucket"
            )
        return spec


def sent_dtype(t: torch.Tensor, cast: torch.dtype | None) -> torch.dtype:
    """The dtype ``t`` goes on the wire as: ``cast`` for a floating-point tensor when given
    (e.g. fp32 master weights sent as the server's bf16), else its own."""
    return cast if cast is not None and t.is_floating_point() else t.dtype


def plan_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 dtype: torch.dtype | None = None) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into buckets of at most ``bucket_bytes`` each, counting each
    tensor at its size on the wire (floating-point tensors cast to ``dtype`` when given).

    A tensor larger than ``bucket_bytes`` gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be > 0")
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    cur: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = t.numel() * sent_dtype(t, dtype).itemsize
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def spec_of(items: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> BucketSpec:
    """The :class:`BucketSpec` of a list of named tensors (as sent: see :func:`sent_dtype`)."""
    return BucketSpec([n for n, _ in items], [sent_dtype(t, dtype) for _, t in items],
                      [list(t.shape) for _, t in items])


def needs_cast(items: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> bool:
    """Whether sending ``items`` as ``dtype`` changes any tensor's dtype."""
    return any(sent_dtype(t, dtype) != t.dtype for _, t in items)


def pack_bucket(items: Sequence[tuple[str, torch.Tensor]], out: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy ``items``' bytes, in order, into ``out`` (a flat uint8 tensor); return the used view.

    With ``dtype``, floating-point tensors are cast while copying, one tensor at a time:
    never a cast copy of the whole model.
    """
    off = 0
    with torch.no_grad():
        for _, t in items:
            to = sent_dtype(t, dtype)
            n = t.numel() * to.itemsize
            dst = out[off : off + n]
            if to == t.dtype:
                dst.copy_(t.detach().contiguous().view(-1).view(torch.uint8), non_blocking=False)
            elif dst.storage_offset() % to.itemsize == 0:
                dst.view(to).copy_(t.detach().reshape(-1))  # casts as it copies: no temporary
            else:  # no padding on the wire: an odd offset cannot be viewed as ``to``
                dst.copy_(t.detach().reshape(-1).to(to).view(torch.uint8))
            off += n
    return out[:off]


def unpack_bucket(buf: torch.Tensor, spec: BucketSpec) -> list[tuple[str, torch.Tensor]]:
    """Views of ``buf`` as the named tensors of ``spec`` (no copy).

    A tensor whose byte offset does not suit its dtype (mixed dtypes are packed without
    padding, e.g. a bf16 tensor after a one-byte one) is copied first.
    """
    out: list[tuple[str, torch.Tensor]] = []
    off = 0
    for name, dtype, shape, n in zip(spec.names, spec.dtypes, spec.shapes, spec.sizes):
        raw = buf[off : off + n]
        if raw.storage_offset() % dtype.itemsize:
            raw = raw.clone()
        out.append((name, raw.view(dtype).view(shape)))
        off += n
    return out


def contiguous_view(items: Sequence[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor | None:
    """A flat uint8 view of ``items`` when they already lie back to back in one storage on
    ``device`` (e.g. parameters flattened by :func:`~backend.weight_sync.layout.flatten_parameters`):
    no packing copy."""
    first = items[0][1]
    if first.device != device:
        return None
    storage = first.untyped_storage()
    base = storage.data_ptr()
    start = ptr = first.data_ptr()
    for _, t in items:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != base or t.data_ptr() != ptr:
            return None
        ptr += t.numel() * t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=device)
    out.set_(storage, start - base, (ptr - start,), (1,))
    return out
