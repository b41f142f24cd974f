"""Trainer side of weight sync: rank 0 of a private group with the server's ranks."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import httpx
import torch
import torch.distributed as dist

from backend import contract
from backend.errors import WeightSyncError
from backend.net import error_message
from backend.threads import in_thread
from backend.weight_sync.groups import (
    DEFAULT_TIMEOUT_S,
    STORE_PREFIX,
    abort_group,
    broadcast,
    close_group,
    group_device,
    host_store,
    open_group,
    wait_work,
)
from backend.weight_sync.layout import BufferPool
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
)

log = logging.getLogger("vlmrl.weight_sync")


@dataclass
class SyncStats:
    """What one :meth:`WeightSyncClient.sync` did."""

    seconds: float
    bytes: int
    buckets: int
    tensors: int
    version: int
    broadcast_seconds: float  # from the first broadcast's start until the last one's bytes landed

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
            raise WeightSyncError(f"POST {route} answered {r.status_code}: {error_message(r.content)}")
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
            raise WeightSyncError(f"GET {contract.ROUTE_WEIGHT_INFO} answered {r.status_code}: {error_message(r.content)}")
        try:
            data = r.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _wait(self, what: str, target: Any, http: cf.Future[Any] | None) -> None:
        """Wait for ``target`` (a future, or a collective's work until its bytes have landed);
        fail early if the server's HTTP call fails first; give up after ``timeout_s`` without
        progress. A failure breaks the group (abort) before it is raised."""
        if not isinstance(target, cf.Future):
            try:
                wait_work(target, self.timeout_s, what, watch=http, watch_what="server side")
            except WeightSyncError:
                self._break()
                raise
            return
        ev = threading.Event()
        target.add_done_callback(lambda _f: ev.set())
        if http is not None:
            http.add_done_callback(lambda _f: ev.set())
        deadline = time.monotonic() + self.timeout_s
        while not target.done():
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
        """Abort a group whose peer failed, first thing (a fresh :meth:`init` is needed).

        ``abort``, never ``shutdown``: shutdown flushes pending work and would wait forever for
        a dead peer; abort ends NCCL kernels stuck on it before the buffers are reused.
        """
        pg, self.pg = self.pg, None
        abort_group(pg)

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
        http = in_thread(self._post, contract.ROUTE_INIT_WEIGHT_TRANSFER, {"init_info": init_info},
                         name="weight-sync-init")
        store = self.store
        device = group_device(self.backend)  # this thread's CUDA device, not the helper's
        group = in_thread(open_group, self.backend, store, 0, self.world_size, self.timeout_s,
                          master_address=self.host, prefix=group_name, device=device, name="weight-sync-group")
        try:
            self._wait("joining the weight-sync group", group, http)
        except WeightSyncError:
            # The server gave up first; a group that still forms later is nobody's: abort it.
            group.add_done_callback(lambda f: abort_group(f.result()) if f.exception() is None else None)
            raise
        pg = group.result()
        self.pg = pg
        if probe:  # first collective on a new group costs extra: pay it here, not in a sync
            work = broadcast(pg, torch.full((1,), 7, dtype=torch.int64, device=device))
            self._wait("warm-up broadcast", work, http)
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

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *,
             dtype: torch.dtype | None = None,
             materialize: Callable[[list[tuple[str, torch.Tensor]]], list[tuple[str, torch.Tensor]]] | None = None,
             ) -> SyncStats:
        """Push ``named_tensors`` as weight version ``version``; raise on any failure.

        ``dtype``: send floating-point tensors as this dtype (e.g. the server's bf16 while the
        trainer keeps fp32 master weights), cast bucket by bucket while packing.
        ``materialize``: called on each bucket's items just before they are packed, in bucket
        order (a sharded trainer gathers the full tensors there, one bucket at a time); the
        buckets are planned from the tensors' shapes and dtypes only.
        """
        if dtype is not None and (not dtype.is_floating_point or dtype_name(dtype) not in DTYPES):
            raise WeightSyncError(f"cannot send weights as {dtype}: expected a floating-point dtype among "
                                  f"{sorted(n for n, d in DTYPES.items() if d.is_floating_point)}")
        if self.pg is None or self._buffers is None:
            self.init()
        assert self._buffers is not None
        t0 = time.monotonic()
        buckets = plan_buckets(list(named_tensors), self.bucket_bytes, dtype)
        # Refuse what the wire format cannot carry before anything moves: gloo can block in
        # a broadcast of such a tensor (complex64 on torch 2.14) until the group times out.
        for items in buckets:
            for name, t in items:
                try:
                    dtype_from_name(dtype_name(sent_dtype(t, dtype)))
                except (ValueError, KeyError) as e:
                    raise WeightSyncError(f"{name}: {e}") from None
        self._post(contract.ROUTE_START_WEIGHT_UPDATE)
        pool = self._buffers
        b_seconds = 0.0
        nbytes = ntensors = 0

        device = group_device(self.backend)

        def pack(items: list[tuple[str, torch.Tensor]]) -> tuple[BucketSpec, torch.Tensor | None, torch.Tensor]:
            spec = spec_of(items, dtype)
            if materialize is not None:
                items = materialize(items)
            # Parameters already back to back go out as they lie, unless they must be cast.
            view = None if needs_cast(items, dtype) else contiguous_view(items, device)
            if view is not None:
                return spec, None, view
            buf = pool.get(spec.nbytes)
            return spec, buf, pack_bucket(items, buf, dtype)

        specs = [spec_of(items, dtype) for items in buckets]

        def announce(i: int) -> cf.Future[Any]:
            info = specs[i].update_info()
            if self.pipelined:
                info["bucket_index"] = i
            return in_thread(self._post, contract.ROUTE_UPDATE_WEIGHTS, {"update_info": info},
                             name="weight-sync-bucket")

        acks: list[cf.Future[Any]] = []
        # Pipelined (hf engine): up to two buckets on the wire, the next one announced ahead.
        # Otherwise (vLLM): one call and one broadcast at a time.
        depth = 2 if self.pipelined else 1
        inflight: deque[tuple[int, Any, torch.Tensor | None, float, BucketSpec]] = deque()
        t_wire: float | None = None  # first broadcast's start: wire time = until the last one ends

        def retire() -> None:
            nonlocal b_seconds, nbytes, ntensors
            j, work, buf, tb, spec = inflight.popleft()
            # Returns once the bytes have landed (NCCL: the kernel's end event, not the
            # enqueue), so the time below is the wire's and the buffer may be reused.
            self._wait(f"broadcasting bucket {j + 1}/{len(buckets)}", work, acks[j])
            b_seconds = time.monotonic() - (t_wire if t_wire is not None else tb)
            if buf is not None:
                pool.put(buf)
            nbytes += spec.nbytes
            ntensors += len(spec.names)
            if not self.pipelined:
                self._check_ack(acks, j, len(buckets))

        nxt: cf.Future[Any] | None = None
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
        except WeightSyncError as e:
            _settle(nxt)
            raise WeightSyncError(f"{e} (peer: the server at {self.base_url})") from e
        except Exception as e:  # noqa: BLE001
            _settle(nxt)
            self._break()
            raise WeightSyncError(f"weight sync failed: {e} (peer: the server at {self.base_url})") from e
        self._post(contract.ROUTE_FINISH_WEIGHT_UPDATE, {"weight_version": int(version)})
        return SyncStats(time.monotonic() - t0, nbytes, len(buckets), ntensors, int(version), b_seconds)

    def close(self) -> None:
        """Leave the group, stop the store, close HTTP (safe to call twice).

        A normal close (shutdown): a group that failed was already aborted by :meth:`_break`.
        """
        pg, self.pg = self.pg, None
        close_group(pg)
        self.store = None
        self._http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "WeightSyncClient":
        return self.init()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settle(fut: cf.Future[Any] | None) -> None:
    """Let a bucket being packed finish before the error goes up: its ``materialize`` may be
    in a collective the caller has to count (a sharded trainer keeps its ranks in step)."""
    if fut is not None:
        cf.wait([fut])
