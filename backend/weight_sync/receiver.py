"""Server side of weight sync: join the trainer's group, receive buckets, load them in order."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from backend.errors import WeightSyncError
from backend.weight_sync.groups import (
    DEFAULT_TIMEOUT_S,
    STORE_PREFIX,
    abort_group,
    broadcast,
    group_device,
    join_store,
    open_group,
    wait_work,
)
from backend.weight_sync.layout import BufferPool, FlatLayout
from backend.weight_sync.wire import BucketSpec, unpack_bucket

log = logging.getLogger("vlmrl.weight_sync")


class WeightReceiver:
    """Server side of the sequence, engine-agnostic.

    ``load`` copies a list of named tensors into the model; it is called on a loader
    thread, in order, while the next bucket is received. Errors (an unknown name, a
    shape mismatch, a failing load) are collected and reported by :meth:`finish`; the
    receiver keeps taking part in every broadcast so the trainer never hangs.

    A *staged* update (``start(staged=True)``) changes nothing in the model: its buckets
    stay in their buffers until :meth:`apply_staged`, so the engine can go on generating
    with the old weights during the whole transfer and swap them in between two batches
    (at the cost of one more copy of the weights in memory while it lasts).
    """

    def __init__(self, load: Callable[[list[tuple[str, torch.Tensor]]], None], *, backend: str = "gloo") -> None:
        self.load = load
        self.backend = backend
        self.pg: Any = None
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
        self.staged = False
        self._staging: list[tuple[torch.Tensor, BucketSpec, set[str], torch.Tensor]] = []
        self.peer = "the trainer"  # named in errors, once a group is joined

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
            dev = group_device(backend)
            pg = open_group(backend, store, offset, world, timeout_s, master_address=addr, prefix=prefix, device=dev)
            probe = torch.zeros(1, dtype=torch.int64, device=dev)
            if init_info.get("probe"):  # the trainer warms the new group up with one element
                try:
                    wait_work(broadcast(pg, probe), timeout_s, "the warm-up broadcast")
                except WeightSyncError:
                    abort_group(pg)
                    raise
            self.pg, self.store, self.rank, self.world_size = pg, store, offset, world
            self.peer = f"the trainer (rank 0 of the group at {addr}:{port})"
            self.backend, self.timeout_s = backend, timeout_s
            self._pool = BufferPool(dev)
            log.info("joined weight-sync group %s:%d as rank %d/%d (%s) in %.2fs",
                     addr, port, offset, world, backend, time.monotonic() - t0)
            return {"rank": offset, "world_size": world, "backend": backend, "probe": int(probe.item())}

    def start(self, staged: bool = False) -> None:
        """Begin an update: forget the previous one's counters and errors. ``staged``: keep
        the buckets until :meth:`apply_staged` instead of loading them as they come."""
        self.wait_loaded()
        self.discard_staged()
        self.staged = staged
        with self._turn:
            self._next_index = 0
            self._failed = None
        self._errors = []
        self.buckets = 0
        self.bytes = 0
        self.in_place = 0
        self.loaded_any = False

    @property
    def posted(self) -> int:
        """Buckets of this update whose receive was posted (received, or on the wire now)."""
        return self._next_index

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
                self.close()  # a collective that cannot even be posted: the group is broken
                raise WeightSyncError(f"receiving a bucket of {spec.nbytes} bytes from {self.peer} failed: {e}") from e
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
        region = layout.region(spec) if layout is not None and not self.staged else None
        if region is not None and region.device == group_device(self.backend):
            self.loaded_any = True  # the model changes as the bytes arrive
            return broadcast(pg, region), None, region, pool
        if not self.staged:  # staged buffers are all held until the swap
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
            # Until the bytes have landed (NCCL: the kernel's end event), polling: a blocking
            # wait or a CUDA synchronize would never return if the trainer died mid-bucket.
            wait_work(work, self.timeout_s, f"receiving a bucket of {spec.nbytes} bytes from {self.peer}")
        except WeightSyncError as e:  # any collective failure ends the group
            self._fail(f"receiving a bucket failed: {e}")
            self.close()  # abort first: the buffer below may still be a kernel's target until then
            if buf is not None:
                self._release(buf, pool)
            raise
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
            self._release(buf, pool)
        elif self.staged:
            with self._stats_lock:
                self._staging.append((view, spec, skip, buf))
        else:
            self.loaded_any = True
            with self._stats_lock:
                self._pending.append(self._loader.submit(self._load, view, spec, skip, buf, pool))
        return {"received": spec.nbytes, "tensors": len(spec.names), "errors": problems, "in_place": False}

    def _release(self, buf: torch.Tensor, pool: BufferPool) -> None:
        if not self.staged:
            self._inflight.release()
        pool.put(buf)

    def _copy_in(self, view: torch.Tensor, spec: BucketSpec, skip: set[str]) -> str | None:
        """Load one bucket's tensors but those in ``skip`` (refused on arrival); the error, if any."""
        try:
            self.load([(n, t) for n, t in unpack_bucket(view, spec) if n not in skip])
        except Exception as e:  # noqa: BLE001 - reported, never raised: the transfer goes on
            return f"loading {len(spec.names)} tensors ({spec.names[0]}, ...) failed: {e}"
        return None

    def _load(self, view: torch.Tensor, spec: BucketSpec, skip: set[str], buf: torch.Tensor, pool: BufferPool) -> None:
        try:
            error = self._copy_in(view, spec, skip)
            if error:
                self._errors.append(error)  # reported by finish()
        finally:
            self._release(buf, pool)

    def apply_staged(self) -> list[str]:
        """Load every held bucket into the model, in order (the caller makes sure nothing
        runs the model meanwhile); return the load errors."""
        with self._stats_lock:
            staging, self._staging = self._staging, []
        errors: list[str] = []
        try:
            for view, spec, skip, _ in staging:
                if errors:  # after a failure the model is inconsistent anyway: stop copying
                    break
                self.loaded_any = True
                error = self._copy_in(view, spec, skip)
                if error:
                    errors.append(error)
        finally:
            self._give_back(staging)
        return errors

    def discard_staged(self) -> None:
        """Drop held buckets (an update that failed or was replaced): the model keeps its weights."""
        with self._stats_lock:
            staging, self._staging = self._staging, []
        self._give_back(staging)

    def _give_back(self, staging: list[tuple[torch.Tensor, BucketSpec, set[str], torch.Tensor]]) -> None:
        if self._pool is not None:
            for _, _, _, buf in staging:
                self._pool.put(buf)

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
        """Leave the group (safe to call twice); wakes calls waiting for their turn.

        Always an abort: the server never knows whether the trainer is still there (a new
        init usually means it died or broke the group), and a shutdown would wait for it.
        """
        pg, self.pg = self.pg, None
        abort_group(pg)
        self.store = None
        if self._pool is not None:
            self._pool.clear()
        with self._turn:
            self._turn.notify_all()

    def shutdown(self) -> None:
        self.close()
        self._loader.shutdown(wait=False, cancel_futures=True)
