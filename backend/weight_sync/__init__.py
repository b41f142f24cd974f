"""Weight sync: push a trainer's parameters into a running inference server.

One sequence for every engine, the one vLLM's native weight-transfer API defines:

1. ``POST /init_weight_transfer_engine {"init_info": {master_address, master_port,
   rank_offset, world_size}}``: the server joins a private group. The trainer is rank 0
   and hosts a :class:`torch.distributed.TCPStore` at ``master_address:master_port``;
   every rank builds its process group on ``PrefixStore(group_name, store)``. The group
   is created directly (``ProcessGroupGloo``/``ProcessGroupNCCL``), so the default process
   group and any other distributed state are never touched. Extra ``init_info`` keys:
   ``backend`` (``gloo``/``nccl``), ``timeout_s``, ``group_name`` (a fresh store prefix
   per group), ``probe`` (both sides broadcast one warm-up element before the call
   returns; sent only to a server whose ``/weight_info`` says ``init_probe``).
2. ``POST /start_weight_update``: the engine finishes its running batch and pauses.
3. Per bucket: ``POST /update_weights {"update_info": {names, dtype_names, shapes,
   packed: true, packed_buffer_size_bytes}}`` while the trainer broadcasts the bucket as
   one flat ``uint8`` tensor: the tensors' raw bytes concatenated in ``names`` order, no
   padding (vLLM's packed layout, so the same bucket feeds vLLM's consumer).
4. ``POST /finish_weight_update {"weight_version": N}``: the server finishes loading,
   reports any load error, resets caches and resumes.

Transport: gloo on CPU, NCCL on GPU. Group setup and every collective are bounded by
``timeout_s`` (collectives are polled until their bytes have landed, without spinning), the
trainer watches the HTTP call alongside the collective, and a failed group is aborted, never
shut down: a dead peer never hangs either side, nor takes its process down (see
:mod:`.groups`). ``sync(..., dtype=torch.bfloat16)`` sends floating-point weights cast.

Speed (the hf engine; vLLM gets the plain sequence above):

* the server keeps its parameters in one flat buffer (:func:`flatten_parameters`), so a
  bucket whose names match it is received in place, with no copy;
* it advertises ``ordered_updates`` in ``/weight_info``; the trainer then tags each
  bucket with ``bucket_index`` and keeps two buckets on the wire, announcing the next
  one while the current one is in flight (the server posts receives in index order);
* a trainer that calls :func:`flatten_parameters` on its model once (before building the
  optimizer; training is bit-identical) sends buckets straight from its parameters,
  without packing them into a buffer first.

Modules, one job each: :mod:`.wire` (dtype names, bucket specs, packing),
:mod:`.layout` (flat parameter buffers), :mod:`.groups` (store, group, broadcast),
:mod:`.receiver` (the server side), :mod:`.client` (the trainer side). ``wire`` and
``groups`` import only torch, so vLLM's worker can use them; names are re-exported here
lazily, so importing one of them never pulls in the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from backend.errors import WeightSyncError

if TYPE_CHECKING:
    from backend.weight_sync.client import SyncStats, WeightSyncClient
    from backend.weight_sync.groups import (
        DEFAULT_TIMEOUT_S,
        STORE_PREFIX,
        abort_group,
        broadcast,
        close_group,
        group_device,
        host_store,
        join_store,
        open_group,
        wait_work,
    )
    from backend.weight_sync.layout import BufferPool, FlatLayout, flatten_parameters
    from backend.weight_sync.receiver import WeightReceiver
    from backend.weight_sync.wire import (
        DEFAULT_BUCKET_BYTES,
        DTYPES,
        BucketSpec,
        contiguous_view,
        dtype_from_name,
        dtype_name,
        needs_cast,
        pack_bucket,
        plan_buckets,
        sent_dtype,
        spec_of,
        unpack_bucket,
    )

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("DEFAULT_BUCKET_BYTES", "DTYPES", "BucketSpec", "contiguous_view", "dtype_from_name", "dtype_name",
         "needs_cast", "pack_bucket", "plan_buckets", "sent_dtype", "spec_of", "unpack_bucket"),
        "backend.weight_sync.wire",
    ),
    **dict.fromkeys(("BufferPool", "FlatLayout", "flatten_parameters"), "backend.weight_sync.layout"),
    **dict.fromkeys(
        ("DEFAULT_TIMEOUT_S", "STORE_PREFIX", "abort_group", "broadcast", "close_group", "group_device",
         "host_store", "join_store", "open_group", "wait_work"),
        "backend.weight_sync.groups",
    ),
    "WeightReceiver": "backend.weight_sync.receiver",
    **dict.fromkeys(("SyncStats", "WeightSyncClient"), "backend.weight_sync.client"),
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'backend.weight_sync' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["WeightSyncError", *sorted(_LAZY)]
