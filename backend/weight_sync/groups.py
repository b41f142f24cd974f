"""Private process groups for weight sync: rendezvous store, group, broadcast, teardown.

Each group is built directly on a :class:`~torch.distributed.PrefixStore`, never through
``init_process_group``, so it neither needs nor disturbs a default group (vLLM's workers
and an FSDP trainer keep their own). Imports only torch and :mod:`backend.errors`: vLLM's
worker (:mod:`backend.vllm_ext.engine`) joins groups with it.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

from backend.errors import WeightSyncError

STORE_PREFIX = "vlmrl/weight-sync"
DEFAULT_TIMEOUT_S = 300.0


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def _is_loopback(host: str) -> bool:
    try:
        return socket.gethostbyname(host).startswith("127.")
    except OSError:
        return False


def _group_options(backend: str, timeout_s: float, master_address: str) -> Any:
    """The options object of a ``ProcessGroupGloo``/``ProcessGroupNCCL`` built by hand.

    Private torch API: ``ProcessGroupGloo._Options`` with its ``_timeout`` and ``_devices``
    fields, and ``ProcessGroupNCCL.Options()._timeout``. Building a group without
    ``init_process_group`` (which would claim the process's one default group) has no
    public way to set the collective timeout or gloo's network device. Checked on torch
    2.13.0+cpu (vLLM's venv, no ProcessGroupNCCL there) and 2.14.1+cu130 (the trainer's).
    """
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _timeout(timeout_s)
        # A trainer on this machine is reached over loopback, whatever interface the
        # hostname resolves to.
        if _is_loopback(master_address):
            dev = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
        else:
            dev = dist.ProcessGroupGloo.create_default_device()
        opts._devices = [dev]
        return opts
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = _timeout(timeout_s)
    return opts


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
    """Create a private process group on ``store`` (blocks until every rank joined)."""
    pstore = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(pstore, rank, world_size, _group_options(backend, timeout_s, master_address))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise WeightSyncError("backend 'nccl' needs a CUDA device; use 'gloo' on CPU")
        return dist.ProcessGroupNCCL(pstore, rank, world_size, _group_options(backend, timeout_s, master_address))
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
