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

Transport: gloo on CPU, NCCL on GPU. Every collective has a timeout, and the trainer
watches the HTTP call alongside the collective, so a dead peer never hangs either side.

Speed (the hf engine; vLLM gets the plain sequence above):

* the server keeps its parameters in one flat buffer (:func:`flatten_parameters`), so a
  bucket whose names match it is received in place, with no copy;
* it advertises ``ordered_updates`` in ``/weight_info``; the trainer then tags each
  bucket with ``bucket_index`` and keeps two buckets on the wire, announcing the next
  one while the current one is in flight (the server posts receives in index order);
* a trainer that calls :func:`flatten_parameters` on its model once (before building the
  optimizer; training is bit-identical) sends buckets straight from its parameters,
  without packing them into a buffer first.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import httpx
import torch
import torch.distributed as dist

from backend import contract
from backend.errors import VlmrlError

log = logging.getLogger("vlmrl.weight_sync")

STORE_PREFIX = "vlmrl/weight-sync"
DEFAULT_BUCKET_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 300.0
# dtypes a bucket may carry, by the name vLLM uses (``str(dtype)`` without "torch.").
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
        "uint8", "bool", "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}


class WeightSyncError(VlmrlError):
    """A weight sync failed (peer gone, timeout, rejected request, load error)."""


# --------------------------------------------------------------------------- buckets


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the ``dtype_names`` vocabulary)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; ``ValueError`` for anything else."""
    try:
        return _DTYPES[name]
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


def plan_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into buckets of at most ``bucket_bytes`` each.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError("bucket_bytes must be > 0")
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    cur: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def spec_of(items: Sequence[tuple[str, torch.Tensor]]) -> BucketSpec:
    """The :class:`BucketSpec` of a list of named tensors."""
    return BucketSpec([n for n, _ in items], [t.dtype for _, t in items], [list(t.shape) for _, t in items])


def pack_bucket(items: Sequence[tuple[str, torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
    """Copy ``items``' bytes, in order, into ``out`` (a flat uint8 tensor); return the used view."""
    off = 0
    with torch.no_grad():
        for _, t in items:
            flat = t.detach().contiguous().view(-1).view(torch.uint8)
            n = flat.numel()
            out[off : off + n].copy_(flat, non_blocking=False)
            off += n
    return out[:off]


def unpack_bucket(buf: torch.Tensor, spec: BucketSpec) -> list[tuple[str, torch.Tensor]]:
    """Views of ``buf`` as the named tensors of ``spec`` (no copy)."""
    out: list[tuple[str, torch.Tensor]] = []
    off = 0
    for name, dtype, shape, n in zip(spec.names, spec.dtypes, spec.shapes, spec.sizes):
        out.append((name, buf[off : off + n].view(dtype).view(shape)))
        off += n
    return out


def contiguous_view(items: Sequence[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor | None:
    """A flat uint8 view of ``items`` when they already lie back to back in one storage on
    ``device`` (e.g. parameters flattened by :func:`flatten_parameters`): no packing copy."""
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


# --------------------------------------------------------------------------- groups


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def _is_loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def host_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store (``port=0`` picks a free port; read it from ``.port``)."""
    return dist.TCPStore(host, port, world_size, True, _timeout(timeout_s), wait_for_workers=False)


def join_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A client of rank 0's store (retries the connection until ``timeout_s``)."""
    return dist.TCPStore(host, port, world_size, False, _timeout(timeout_s))


def open_group(
    backend: str,
    store: dist.Store,
    rank: int,
    world_size: int,
    timeout_s: float,
    *,
    master_address: str = "127.0.0.1",
    prefix: str = STORE_PREFIX,
) -> dist.ProcessGroup:
    """Create a private process group on ``store`` (blocks until every rank joined).

    The group is built directly on a :class:`~torch.distributed.PrefixStore`, never
    through ``init_process_group``, so it neither needs nor disturbs a default group.
    """
    pstore = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _timeout(timeout_s)
        if _is_loopback(master_address):
            dev = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
        else:
            dev = dist.ProcessGroupGloo.create_default_device()
        opts._devices = [dev]
        return dist.ProcessGroupGloo(pstore, rank, world_size, opts)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise WeightSyncError("backend 'nccl' needs a CUDA device; use 'gloo' on CPU")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _timeout(timeout_s)
        return dist.ProcessGroupNCCL(pstore, rank, world_size, opts)
    raise WeightSyncError(f"unknown weight-sync backend {backend!r} (expected 'gloo' or 'nccl')")


def broadcast(pg: dist.ProcessGroup, tensor: torch.Tensor, src: int = 0) -> Any:
    """Start a broadcast of ``tensor`` from ``src`` on ``pg``; returns the work handle."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    return pg.broadcast([tensor], opts)


def close_group(pg: dist.ProcessGroup | None) -> None:
    """Release a group's resources (best effort: a broken peer must not raise here)."""
    if pg is None:
        return
    for meth in ("shutdown", "abort"):
        fn = getattr(pg, meth, None)
        if fn is None:
            continue
        try:
            fn()
            return
        except Exception:  # noqa: BLE001 - already failing; nothing more to do
            continue


def group_device(backend: str) -> torch.device:
    """Where buffers for ``backend`` live."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- server side


class WeightReceiver:
    """Server side of the sequence, engine-agnostic.

    ``load`` copies a list of named tensors into the model; it is called on a loader
    thread, in order, while the next bucket is received. Errors (an unknown name, a
    shape mismatch, a failing load) are collected and reported by :meth:`finish`; the
    receiver keeps taking part in every broadcast so the trainer never hangs.
    """

    def __init__(self, load: Callable[[list[tuple[str, torch.Tensor]]], None], *, backend: str = "gloo") -> None:
        self.load = load
        self.backend = backend
        self.pg: dist.ProcessGroup | None = None
        self.store: dist.Store | None = None
        self.rank = -1
        self.world_size = 0
        self.timeout_s = DEFAULT_TIMEOUT_S
        self._pool: BufferPool | None = None
        self._loader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-loader")
        self._inflight = threading.Semaphore(3)  # buffers receiving or waiting to be loaded
        self._stats_lock = threading.Lock()
        self._pending: list[cf.Future[None]] = []
        self._errors: list[str] = []
        self._lock = threading.Lock()  # init vs init
        self._turn = threading.Condition(threading.RLock())  # one bucket at a time, in order
        self._next_index = 0
        self._failed: str | None = None
        self.buckets = 0
        self.bytes = 0
        self.in_place = 0
        self.loaded_any = False

    @property
    def ready(self) -> bool:
        return self.pg is not None

    def init(self, init_info: Any) -> dict[str, Any]:
        """Join the trainer's group (``init_info`` as vLLM's NCCL backend takes it)."""
        if not isinstance(init_info, dict):
            raise ValueError("init_info must be an object")
        try:
            addr = str(init_info["master_address"])
            port = int(init_info["master_port"])
            world = int(init_info["world_size"])
            offset = int(init_info.get("rank_offset", 1))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"init_info needs master_address, master_port, world_size, rank_offset: {e}") from None
        backend = str(init_info.get("backend", self.backend))
        timeout_s = float(init_info.get("timeout_s", DEFAULT_TIMEOUT_S))
        prefix = str(init_info.get("group_name") or STORE_PREFIX)
        if not 1 <= offset < world:
            raise ValueError(f"rank_offset {offset} must be in [1, world_size={world})")
        if not 0 < port < 65536:
            raise ValueError(f"master_port {port} out of range")
        with self._lock:
            self.close()
            t0 = time.monotonic()
            store = join_store(addr, port, world, timeout_s)
            pg = open_group(backend, store, offset, world, timeout_s, master_address=addr, prefix=prefix)
            dev = group_device(backend)
            probe = torch.zeros(1, dtype=torch.int64, device=dev)
            if init_info.get("probe"):  # the trainer warms the new group up with one element
                broadcast(pg, probe).wait()
            self.pg, self.store, self.rank, self.world_size = pg, store, offset, world
            self.backend, self.timeout_s = backend, timeout_s
            self._pool = BufferPool(dev)
            log.info("joined weight-sync group %s:%d as rank %d/%d (%s) in %.2fs",
                     addr, port, offset, world, backend, time.monotonic() - t0)
            return {"rank": offset, "world_size": world, "backend": backend, "probe": int(probe.item())}

    def start(self) -> None:
        """Begin an update: forget the previous one's counters and errors."""
        self.wait_loaded()
        with self._turn:
            self._next_index = 0
            self._failed = None
        self._errors = []
        self.buckets = 0
        self.bytes = 0
        self.in_place = 0
        self.loaded_any = False

    def receive(self, update_info: Any, known: Callable[[str, list[int]], str | None] | None = None,
                layout: FlatLayout | None = None) -> dict[str, Any]:
        """Receive one flat bucket (blocks for the broadcast) and queue its load.

        ``known(name, shape)`` returns an error message for a tensor the model cannot
        take (checked before loading). When ``layout`` maps the bucket exactly onto the
        model's flat parameters, the bucket is received in place (no buffer, no copy).
        An ``update_info["bucket_index"]`` (0, 1, ... within an update) lets a trainer
        announce the next bucket while the current one is still on the wire: calls then
        wait for their turn. Raises ``ValueError`` for an unparseable ``update_info``
        (nothing is received then) and :class:`WeightSyncError` when the collective fails
        (the group is closed; the trainer must init again).
        """
        index = update_info.get("bucket_index") if isinstance(update_info, dict) else None
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise ValueError(f"bucket_index must be a non-negative int, got {index!r}")
        try:
            spec = BucketSpec.from_update_info(update_info)
        except ValueError as e:
            if index is not None:
                self._fail(f"bucket {index} was rejected: {e}")
            raise
        with self._turn:
            if index is not None:
                self._wait_turn(index)
            if self.pg is None or self._pool is None:
                raise WeightSyncError("no weight-transfer group: call /init_weight_transfer_engine first")
            try:
                # Post the receive; the next bucket may post its own right behind it, so two
                # buckets can be on the wire at once (gloo/NCCL keep posting order).
                post = self._post_receive(self.pg, self._pool, spec, layout)
            except BaseException as e:
                self._failed = f"bucket {self._next_index} failed: {e}"
                raise
            finally:
                self._next_index += 1
                self._turn.notify_all()
        return self._complete(spec, known, *post)

    def _wait_turn(self, index: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self._next_index != index:
            if self._failed:
                raise WeightSyncError(f"bucket {index} not received: {self._failed}")
            if self.pg is None:
                raise WeightSyncError(f"bucket {index} not received: the weight-transfer group was closed")
            if index < self._next_index:
                raise ValueError(f"bucket_index {index} was already received in this update")
            left = deadline - time.monotonic()
            if left <= 0:
                raise WeightSyncError(f"bucket {index} waited {self.timeout_s:.0f}s for bucket {self._next_index}")
            self._turn.wait(min(left, 1.0))

    def _fail(self, why: str) -> None:
        with self._turn:
            self._failed = why
            self._turn.notify_all()

    def _post_receive(self, pg: dist.ProcessGroup, pool: BufferPool, spec: BucketSpec,
                      layout: FlatLayout | None) -> tuple[Any, torch.Tensor | None, torch.Tensor, BufferPool]:
        """Start receiving ``spec``'s bucket: in place when ``layout`` maps it, else into a buffer."""
        region = layout.region(spec) if layout is not None else None
        if region is not None and region.device == group_device(self.backend):
            self.loaded_any = True  # the model changes as the bytes arrive
            return broadcast(pg, region), None, region, pool
        self._inflight.acquire()
        buf = pool.get(spec.nbytes)
        view = buf[: spec.nbytes]
        try:
            return broadcast(pg, view), buf, view, pool
        except BaseException:
            self._inflight.release()
            pool.put(buf)
            raise

    def _complete(self, spec: BucketSpec, known: Callable[[str, list[int]], str | None] | None, work: Any,
                  buf: torch.Tensor | None, view: torch.Tensor, pool: BufferPool) -> dict[str, Any]:
        """Wait for a posted receive, then check the names and queue the copy into the model."""
        try:
            work.wait()
            if view.is_cuda:  # NCCL's wait only orders streams; "received" must mean received
                torch.cuda.current_stream(view.device).synchronize()
        except Exception as e:  # noqa: BLE001 - any collective failure ends the group
            if buf is not None:
                self._inflight.release()
                pool.put(buf)
            self._fail(f"receiving a bucket failed: {e}")
            self.close()
            raise WeightSyncError(f"receiving a bucket of {spec.nbytes} bytes failed: {e}") from e
        with self._stats_lock:
            self.buckets += 1
            self.bytes += spec.nbytes
            if buf is None:
                self.in_place += 1
        if buf is None:
            return {"received": spec.nbytes, "tensors": len(spec.names), "errors": [], "in_place": True}
        problems: list[str] = []
        skip: set[str] = set()
        if known is not None:
            for name, shape in zip(spec.names, spec.shapes):
                msg = known(name, shape)
                if msg:
                    problems.append(msg)
                    skip.add(name)
        with self._stats_lock:
            self._errors.extend(problems)
        if len(skip) == len(spec.names):
            self._inflight.release()
            pool.put(buf)
        else:
            self.loaded_any = True
            with self._stats_lock:
                self._pending.append(self._loader.submit(self._load, view, spec, skip, buf, pool))
        return {"received": spec.nbytes, "tensors": len(spec.names), "errors": problems, "in_place": False}

    def _load(self, view: torch.Tensor, spec: BucketSpec, skip: set[str], buf: torch.Tensor, pool: BufferPool) -> None:
        try:
            self.load([(n, t) for n, t in unpack_bucket(view, spec) if n not in skip])
        except Exception as e:  # noqa: BLE001 - reported by finish()
            self._errors.append(f"loading {len(spec.names)} tensors ({spec.names[0]}, ...) failed: {e}")
        finally:
            pool.put(buf)
            self._inflight.release()

    def wait_loaded(self) -> None:
        """Block until every queued bucket is loaded."""
        with self._stats_lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def finish(self) -> list[str]:
        """Finish loading; return the errors of this update (empty when all went in)."""
        self.wait_loaded()
        errors, self._errors = self._errors, []
        return errors

    def close(self) -> None:
        """Leave the group (safe to call twice); wakes calls waiting for their turn."""
        pg, self.pg = self.pg, None
        close_group(pg)
        self.store = None
        if self._pool is not None:
            self._pool.clear()
        with self._turn:
            self._turn.notify_all()

    def shutdown(self) -> None:
        self.close()
        self._loader.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- trainer side


@dataclass
class SyncStats:
    """What one :meth:`WeightSyncClient.sync` did."""

    seconds: float
    bytes: int
    buckets: int
    tensors: int
    version: int
    broadcast_seconds: float  # wall time from the first broadcast to the last one done

    def as_dict(self) -> dict[str, float | int]:
        return {
            "seconds": self.seconds, "bytes": self.bytes, "buckets": self.buckets,
            "tensors": self.tensors, "version": self.version, "broadcast_seconds": self.broadcast_seconds,
        }


class WeightSyncClient:
    """Trainer side: rank 0 of a private group with the server's ranks.

    ``backend`` is ``"gloo"`` (CPU) or ``"nccl"`` (GPU); ``port=None`` lets the store pick
    a free port. Parameters go in flat buckets of ``bucket_bytes``; every wait is bounded
    by ``timeout_s``.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        backend: str = "gloo",
        host: str = "127.0.0.1",
        port: int | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        server_ranks: int = 1,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise WeightSyncError(f"unknown weight-sync backend {backend!r} (expected 'gloo' or 'nccl')")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.backend = backend
        self.host = host
        self.port = port or 0
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = float(timeout_s)
        self.server_ranks = int(server_ranks)
        self.world_size = 1 + self.server_ranks
        self.pg: dist.ProcessGroup | None = None
        self.store: dist.TCPStore | None = None
        self.pipelined = False
        self._generation = 0
        self._http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                                  headers=self._headers())
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-pack")
        self._buffers: BufferPool | None = None

    def _headers(self) -> dict[str, str]:
        return {contract.TOKEN_HEADER: f"Bearer {self.token}"} if self.token else {}

    # -- HTTP
    def _post(self, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self._http.post(route, json=body or {})
        except httpx.HTTPError as e:
            raise WeightSyncError(f"POST {route} failed: {e}") from e
        if r.status_code != 200:
            raise WeightSyncError(f"POST {route} answered {r.status_code}: {_error_text(r)}")
        try:
            data = r.json()
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {"result": data}

    def weight_info(self) -> dict[str, Any]:
        """The server's ``/weight_info`` (proves the server is up and the token accepted).

        An engine without this route (404/405) gives ``{}``; anything else but 200 raises.
        """
        try:
            r = self._http.get(contract.ROUTE_WEIGHT_INFO)
        except httpx.HTTPError as e:
            raise WeightSyncError(f"GET {contract.ROUTE_WEIGHT_INFO} failed: {e}") from e
        if r.status_code in (404, 405):
            return {}
        if r.status_code != 200:
            raise WeightSyncError(f"GET {contract.ROUTE_WEIGHT_INFO} answered {r.status_code}: {_error_text(r)}")
        try:
            data = r.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _wait(self, what: str, target: Any, http: cf.Future[Any] | None) -> None:
        """Wait for ``target`` (a future or a collective's work) without polling; fail early
        if the server's HTTP call fails first; give up after ``timeout_s`` without progress."""
        ev = threading.Event()
        if isinstance(target, cf.Future):
            done: Callable[[], bool] = target.done
            target.add_done_callback(lambda _f: ev.set())
        else:
            done = target.is_completed
            target.get_future().add_done_callback(lambda _f: ev.set())
        if http is not None:
            http.add_done_callback(lambda _f: ev.set())
        deadline = time.monotonic() + self.timeout_s
        while not done():
            if http is not None and http.done():
                exc = http.exception()
                if exc is not None:
                    self._break()
                    raise WeightSyncError(f"{what}: server side failed: {exc}") from exc
                http = None  # answered fine; only the target is left
                ev.clear()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                self._break()
                raise WeightSyncError(f"{what}: no progress within {self.timeout_s:.0f}s (peer gone?)")
            ev.wait(min(left, 0.5))

    def _check_ack(self, acks: list[cf.Future[Any]], i: int, n: int) -> None:
        """Wait for the server's answer about bucket ``i`` and raise if it failed."""
        if i < 0:
            return
        self._wait(f"bucket {i + 1}/{n} acknowledgement", acks[i], None)
        if acks[i].exception() is not None:
            self._break()
            raise WeightSyncError(f"bucket {i + 1}/{n}: {acks[i].exception()}")

    def _break(self) -> None:
        """Forget a group whose peer failed (a fresh :meth:`init` is needed)."""
        pg, self.pg = self.pg, None
        # Closing a gloo group with a collective still pending can block; let it time out.
        _spawn(close_group, pg)

    # -- lifecycle
    def init(self) -> "WeightSyncClient":
        """Host the store, ask the server to join, build the group, warm it up."""
        if self.pg is not None:
            return self
        info = self.weight_info()  # fails fast on a bad token or a dead server
        # The hf engine orders concurrent /update_weights calls by bucket_index, so the next
        # bucket can be announced while one is on the wire; vLLM gets one call at a time.
        self.pipelined = bool(info.get("ordered_updates"))
        probe = bool(info.get("init_probe"))
        if self.store is None:
            self.store = host_store(self.host, self.port, self.world_size, self.timeout_s)
            self.port = self.store.port
        # A fresh key prefix per group: a re-init on the same store never reads stale keys.
        self._generation += 1
        group_name = f"{STORE_PREFIX}/{os.getpid()}/{self._generation}"
        init_info = {
            "master_address": self.host, "master_port": self.port, "rank_offset": 1,
            "world_size": self.world_size, "backend": self.backend, "timeout_s": self.timeout_s,
            "group_name": group_name, "probe": probe,
        }
        http = _spawn(self._post, contract.ROUTE_INIT_WEIGHT_TRANSFER, {"init_info": init_info})
        store = self.store
        group = _spawn(open_group, self.backend, store, 0, self.world_size, self.timeout_s,
                       master_address=self.host, prefix=group_name)
        self._wait("joining the weight-sync group", group, http)
        pg = group.result()
        self.pg = pg
        if probe:  # first collective on a new group costs extra: pay it here, not in a sync
            work = broadcast(pg, torch.full((1,), 7, dtype=torch.int64, device=group_device(self.backend)))
            self._wait("warm-up broadcast", work, http)
            work.wait()
        self._wait("init request", http, None)
        http.result()
        self._buffers = BufferPool(group_device(self.backend), pin=self.backend == "gloo")
        log.info("weight sync ready: %s group on %s:%d, world %d", self.backend, self.host, self.port, self.world_size)
        return self

    def reconnect(self, timeout_s: float | None = None) -> "WeightSyncClient":
        """Join the server again after it restarted or the group broke: drop the old group,
        retry :meth:`init` until the server answers (at most ``timeout_s``)."""
        if self.pg is not None:
            self._break()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                return self.init()
            except WeightSyncError as e:
                if time.monotonic() >= deadline:
                    raise WeightSyncError(f"re-joining the server: {e}") from e
                log.info("weight sync: server not ready to re-join (%s); retrying", e)
                time.sleep(1.0)

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        """Push ``named_tensors`` as weight version ``version``; raise on any failure."""
        if self.pg is None or self._buffers is None:
            self.init()
        assert self._buffers is not None
        t0 = time.monotonic()
        buckets = plan_buckets(list(named_tensors), self.bucket_bytes)
        # Refuse what the wire format cannot carry before anything moves: gloo can block in
        # a broadcast of such a tensor (complex64 on torch 2.14) until the group times out.
        for items in buckets:
            for name, t in items:
                try:
                    dtype_from_name(dtype_name(t.dtype))
                except (ValueError, KeyError) as e:
                    raise WeightSyncError(f"{name}: {e}") from None
        self._post(contract.ROUTE_START_WEIGHT_UPDATE)
        pool = self._buffers
        b_seconds = 0.0
        nbytes = ntensors = 0

        device = group_device(self.backend)

        def pack(items: list[tuple[str, torch.Tensor]]) -> tuple[BucketSpec, torch.Tensor | None, torch.Tensor]:
            spec = spec_of(items)
            view = contiguous_view(items, device)
            if view is not None:
                return spec, None, view
            buf = pool.get(spec.nbytes)
            return spec, buf, pack_bucket(items, buf)

        specs = [spec_of(items) for items in buckets]

        def announce(i: int) -> cf.Future[Any]:
            info = specs[i].update_info()
            if self.pipelined:
                info["bucket_index"] = i
            return _spawn(self._post, contract.ROUTE_UPDATE_WEIGHTS, {"update_info": info})

        acks: list[cf.Future[Any]] = []
        # Pipelined (hf engine): up to two buckets on the wire, the next one announced ahead.
        # Otherwise (vLLM): one call and one broadcast at a time.
        depth = 2 if self.pipelined else 1
        inflight: deque[tuple[int, Any, torch.Tensor | None, float, BucketSpec]] = deque()
        t_wire: float | None = None  # first broadcast's start: wire time = until the last one ends

        def retire() -> None:
            nonlocal b_seconds, nbytes, ntensors, t_wire
            j, work, buf, tb, spec = inflight.popleft()
            what = f"bucket {j + 1}/{len(buckets)}"
            self._wait(f"broadcasting {what}", work, acks[j])
            try:
                work.wait()
                if device.type == "cuda":  # NCCL's wait only orders streams; the buffer is reused next
                    torch.cuda.current_stream(device).synchronize()
            except Exception as e:  # noqa: BLE001
                self._break()
                raise WeightSyncError(f"broadcasting {what} failed: {e}") from e
            b_seconds = time.monotonic() - (t_wire if t_wire is not None else tb)
            if buf is not None:
                pool.put(buf)
            nbytes += spec.nbytes
            ntensors += len(spec.names)
            if not self.pipelined:
                self._check_ack(acks, j, len(buckets))

        try:
            nxt = self._pool.submit(pack, buckets[0]) if buckets else None
            if self.pipelined and buckets:
                acks.append(announce(0))
            for i in range(len(buckets)):
                assert nxt is not None
                spec, buf, flat = nxt.result()
                # Pack the next bucket while this one is on the wire.
                nxt = self._pool.submit(pack, buckets[i + 1]) if i + 1 < len(buckets) else None
                if not self.pipelined:
                    acks.append(announce(i))
                if self.pg is None:
                    raise WeightSyncError("weight-sync group closed")
                if t_wire is None:
                    t_wire = time.monotonic()
                inflight.append((i, broadcast(self.pg, flat), buf, time.monotonic(), spec))
                if self.pipelined and i + 1 < len(buckets):
                    acks.append(announce(i + 1))  # the server posts its receive right behind this one
                while len(inflight) >= depth:
                    retire()
                if self.pipelined:
                    self._check_ack(acks, i - depth, len(buckets))
            while inflight:
                retire()
            for j in range(len(acks)):
                self._check_ack(acks, j, len(buckets))
        except WeightSyncError:
            raise
        except Exception as e:  # noqa: BLE001
            self._break()
            raise WeightSyncError(f"weight sync failed: {e}") from e
        self._post(contract.ROUTE_FINISH_WEIGHT_UPDATE, {"weight_version": int(version)})
        return SyncStats(time.monotonic() - t0, nbytes, len(buckets), ntensors, int(version), b_seconds)

    def close(self) -> None:
        """Leave the group, stop the store, close HTTP (safe to call twice)."""
        pg, self.pg = self.pg, None
        close_group(pg)
        self.store = None
        self._http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "WeightSyncClient":
        return self.init()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spawn(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future[Any]:
    """Run ``fn`` on a daemon thread (a stuck collective must not block interpreter exit)."""
    fut: cf.Future[Any] = cf.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            fut.set_exception(e)

    threading.Thread(target=run, name=f"weight-sync-{getattr(fn, '__name__', 'task')}", daemon=True).start()
    return fut


def _error_text(r: httpx.Response) -> str:
    """The server's error message from a JSON error body, else the raw text."""
    try:
        data = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data))
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return str(data)[:500]
