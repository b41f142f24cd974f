"""Private process groups for weight sync: rendezvous store, group, broadcast, wait, teardown.

Each group is built directly on a :class:`~torch.distributed.PrefixStore`, never through
``init_process_group``, so it neither needs nor disturbs a default group (vLLM's workers
and an FSDP trainer keep their own). Imports only torch and :mod:`backend.errors`: vLLM's
worker (:mod:`backend.vllm_ext.engine`) joins groups with it.

Failure behaviour (NCCL in particular; API and environment names checked in torch
2.14.1+cu130's ``torch/include/torch/csrc/distributed/c10d/{ProcessGroupNCCL,NCCLUtils,
Utils}.hpp``, ``torch/_C/_distributed_c10d.pyi`` and ``strings lib/libtorch_cuda.so``; the
wheel ships no ``.cpp``, so defaults and control flow were read in recent upstream
``ProcessGroupNCCL.cpp``/``NCCLUtils.cpp``, whose log messages the 2.14.1 binary carries
verbatim; the GPU behaviour itself is what ``benchmarks/gpu_smoke.py`` checks):

* setup is bounded: :func:`open_group` creates the NCCL communicator eagerly and waits for
  a one-element warm-up broadcast, both within ``timeout_s`` (torch otherwise creates it
  lazily inside the first collective, where nothing bounds the wait);
* a collective is waited for by polling :func:`wait_work` (never a blocking ``wait()``
  or a CUDA synchronize that a dead peer would hold forever), under ``timeout_s``;
* a broken group is torn down with :func:`abort_group` (``abort()``: ``ncclCommAbort``
  ends kernels stuck on a dead peer); :func:`close_group` (``shutdown()``, which flushes
  and so blocks on a dead peer) is for a normal close only;
* our NCCL group runs without torch's watchdog and heartbeat monitor (see
  :data:`NCCL_GROUP_ENV`), so a dead peer becomes a :class:`WeightSyncError` in the thread
  that waits, never a SIGABRT of the whole process.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from backend.errors import WeightSyncError

log = logging.getLogger("vlmrl.weight_sync")

STORE_PREFIX = "vlmrl/weight-sync"
DEFAULT_TIMEOUT_S = 300.0
# wait_work's sleep between polls: short at first (a bucket often finishes within a few
# ms), doubling up to POLL_MAX_S, so a long wait costs ~50 wake-ups a second, not a core.
POLL_MIN_S = 0.001
POLL_MAX_S = 0.02

# Environment read by the ProcessGroupNCCL constructor, per group (ProcessGroupNCCL.cpp:
# ``blockingWait_ = getCvarBool(TORCH_NCCL_BLOCKING_WAIT, false)``, ``asyncErrorHandling_ =
# getCvarInt(TORCH_NCCL_ASYNC_ERROR_HANDLING, 3 /*SkipCleanUp*/)``; the HeartbeatMonitor
# constructor, run by the PG constructor, reads the last two). Set only while our group is
# constructed (:func:`nccl_group_env`), so vLLM's and FSDP's groups keep their own settings.
NCCL_GROUP_ENV: dict[str, str] = {
    # No watchdog thread for this group ("TORCH_NCCL_BLOCKING_WAIT is enabled, NO watchdog
    # thread is created."), hence no heartbeat monitor either (the watchdog starts it) and
    # no work list to clean up (workEnqueue skips it in blocking-wait mode). Errors and
    # timeouts then surface only in the thread that waits (is_completed()/wait() raise),
    # which is the only place we want them: torch's watchdog would, on a failure, raise the
    # process-wide static ``shouldDump_`` that PG 0's monitor (vLLM's or FSDP's group) turns
    # into a dump and, TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC (480 s) later, a LOG(FATAL) abort.
    "TORCH_NCCL_BLOCKING_WAIT": "1",
    # ErrorHandlingMode (ProcessGroupNCCL.hpp): 0 NoHandling, 1 TearDown, 2 CleanUpOnly,
    # 3 SkipCleanUp (the default: tear the process down without aborting communicators).
    # CleanUpOnly aborts the communicators and leaves the process up, should a torch
    # version start a watchdog for this group after all.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    # Default true: a monitor that finds the watchdog stuck for the heartbeat timeout calls
    # terminateProcess() (LOG(FATAL) -> abort). Never for this group.
    "TORCH_NCCL_ENABLE_MONITORING": "0",
    # Default true: flight-recorder dumps to disk on a timeout, and for PG uid 0 (ours, in a
    # trainer without other NCCL groups) reacting to other groups' dump signals. Not ours.
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}
# Nonblocking communicator init (``ProcessGroupNCCL.Options().config.blocking = 0``: the
# first priority in ProcessGroupNCCL::useNonblocking(), before TORCH_NCCL_USE_COMM_NONBLOCKING;
# unset it is NCCL_CONFIG_UNDEF_INT and torch uses blocking mode). In blocking mode a peer
# that never joins leaves ncclCommInitRankConfig waiting forever, beyond anyone's reach;
# in nonblocking mode the communicator exists at once, torch polls its readiness (for at
# most TORCH_NCCL_NONBLOCKING_TIMEOUT, default 1800 s, read once per process) and
# abort() can end it.
NCCL_NONBLOCKING_INIT = True

_env_lock = threading.Lock()


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
    ``Options().config.blocking`` (ncclConfig_t, pybind ``NCCLConfig.blocking``) checked
    on 2.14.1+cu130.
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
    if NCCL_NONBLOCKING_INIT:
        opts.config.blocking = 0
    return opts


@contextlib.contextmanager
def nccl_group_env() -> Iterator[None]:
    """Apply :data:`NCCL_GROUP_ENV` while a ProcessGroupNCCL is constructed, then restore.

    Under a lock, so two of our groups built at once never restore each other's values.
    Other threads reading the environment meanwhile (another library building its own group
    at the same moment) would see ours: the constructor leaves no other way to choose.
    """
    with _env_lock:
        saved = {k: os.environ.get(k) for k in NCCL_GROUP_ENV}
        os.environ.update(NCCL_GROUP_ENV)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


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
    device: torch.device | None = None,
) -> Any:
    """Create a private process group on ``store``; returns once every rank joined.

    Every rank must call this (NCCL: each takes part in a warm-up broadcast). A peer that
    never joins gives a :class:`WeightSyncError` within about ``timeout_s``. ``device``:
    the CUDA device of an NCCL group (default: the calling thread's current device).
    """
    pstore = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        # The gloo constructor connects every pair itself, bounded by the options' timeout.
        try:
            return dist.ProcessGroupGloo(pstore, rank, world_size, _group_options(backend, timeout_s, master_address))
        except Exception as e:  # noqa: BLE001 - rendezvous failures come as several types
            raise WeightSyncError(f"joining the gloo group as rank {rank}/{world_size} failed: {e}") from e
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise WeightSyncError("backend 'nccl' needs a CUDA device; use 'gloo' on CPU")
        dev = device if device is not None else group_device("nccl")
        with nccl_group_env():
            pg = dist.ProcessGroupNCCL(pstore, rank, world_size, _group_options(backend, timeout_s, master_address))
        _connect_nccl(pg, dev, rank, world_size, timeout_s)
        return pg
    raise WeightSyncError(f"unknown weight-sync backend {backend!r} (expected 'gloo' or 'nccl')")


def _connect_nccl(pg: Any, device: torch.device, rank: int, world_size: int, timeout_s: float) -> None:
    """Create ``pg``'s communicator now and prove it with a warm-up broadcast, in ``timeout_s``.

    ``eager_connect_single_device`` (Backend API; ProcessGroupNCCL::eagerConnectSingleDevice
    calls initNCCLComm) exchanges the NCCL unique id through the store; with nonblocking
    init it returns before the communicator is ready, and the warm-up broadcast waits for
    it. Both run on a helper thread: in torch they hold the communicator's lock while they
    wait, so the only bound we have is to stop waiting, abort and report.
    """
    deadline = time.monotonic() + timeout_s
    started: cf.Future[Any] = cf.Future()

    def connect() -> None:
        try:
            with torch.cuda.device(device):  # threads start on device 0
                pg.eager_connect_single_device(device)
                started.set_result(broadcast(pg, torch.zeros(1, dtype=torch.uint8, device=device)))
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            started.set_exception(e)

    threading.Thread(target=connect, name="weight-sync-nccl-connect", daemon=True).start()
    what = f"creating the NCCL communicator as rank {rank}/{world_size} on {device}"
    try:
        work = started.result(timeout=max(0.0, deadline - time.monotonic()))
    except cf.TimeoutError:
        # The helper may hold the communicator's lock until torch's nonblocking timeout:
        # abort from yet another thread so that nothing here waits for it.
        threading.Thread(target=abort_group, args=(pg,), name="weight-sync-abort", daemon=True).start()
        raise WeightSyncError(f"{what}: not done within {timeout_s:.3g}s (a peer never joined?)") from None
    except Exception as e:  # noqa: BLE001
        abort_group(pg)
        raise WeightSyncError(f"{what} failed: {e}") from e
    try:
        wait_work(work, max(0.0, deadline - time.monotonic()), f"{what}: warm-up broadcast")
    except WeightSyncError:
        abort_group(pg)
        raise


def broadcast(pg: Any, tensor: torch.Tensor, src: int = 0) -> Any:
    """Start a broadcast of ``tensor`` from ``src`` on ``pg``; returns the work handle."""
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    return pg.broadcast([tensor], opts)


def wait_work(work: Any, timeout_s: float, what: str, *, watch: cf.Future[Any] | None = None,
              watch_what: str = "the other side") -> None:
    """Block until a collective's ``work`` has finished, for at most ``timeout_s``.

    Finished means the data has landed: ``is_completed()`` is the GPU kernel's end event
    for NCCL (WorkNCCL::isCompleted, "checks if the NCCL operation has completed on the GPU
    in its own NCCL stream. Non-blocking"), the transfer itself for gloo. A GPU work's
    future completes when the work is enqueued, so it only wakes the first poll; then the
    wait sleeps 1 ms doubling to 20 ms between polls (woken early by ``watch`` or the
    future), instead of spinning a core. ``watch`` is a concurrent call (the server's HTTP
    request) whose failure ends the wait early. Raises :class:`WeightSyncError` on failure or
    timeout; the caller then aborts the group.
    """
    wake = threading.Event()
    work.get_future().add_done_callback(lambda _f: wake.set())
    if watch is not None:
        watch.add_done_callback(lambda _f: wake.set())
    deadline = time.monotonic() + timeout_s
    delay = POLL_MIN_S
    while not work.is_completed():
        if watch is not None and watch.done():
            exc = watch.exception()
            if exc is not None:
                raise WeightSyncError(f"{what}: {watch_what} failed: {exc}") from exc
            watch = None  # answered fine; only the work is left
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise WeightSyncError(f"{what}: not done within {timeout_s:.3g}s (peer gone?)")
        if wake.wait(min(delay, left)):
            wake.clear()
            delay = POLL_MIN_S  # gloo's future marks completion just before is_completed() does
        else:
            delay = min(delay * 2, POLL_MAX_S)
    try:
        work.wait()  # raises the collective's error; NCCL: orders the current stream after it
    except Exception as e:  # noqa: BLE001 - any collective failure
        raise WeightSyncError(f"{what} failed: {e}") from e


def abort_group(pg: Any) -> None:
    """Tear down a group after a failure, at once: ``abort()``, never ``shutdown()``.

    ``abort()`` (ncclCommAbort) ends kernels stuck on a dead peer; gloo's returns at once
    and its pending work fails at its own timeout. The group object is then kept alive on a
    timer thread for that timeout: dropping the last reference runs its destructor, which
    (gloo) waits for pending work to end: measured 4.9 s for a 5 s group on torch 2.14.1,
    blocking whichever thread happened to drop it. Best effort: never raises.
    """
    if pg is None:
        return
    try:
        pg.abort()
    except Exception as e:  # noqa: BLE001 - already failing; nothing more to do
        log.warning("weight sync: aborting the group failed: %s", e)
    try:
        linger_s = float(pg.options._timeout.total_seconds()) + 1.0  # Backend.options, private _timeout
    except Exception:  # noqa: BLE001 - no timeout known (not a torch group): nothing pending to outlive
        return
    threading.Thread(target=_outlive, args=(pg, linger_s), name="weight-sync-aborted-group", daemon=True).start()


def _outlive(pg: Any, seconds: float) -> None:
    """Hold an aborted group until its pending work has failed; its destructor then runs
    here (Thread.run drops its arguments on this thread) and returns at once."""
    time.sleep(seconds)
    del pg


def close_group(pg: Any) -> None:
    """Leave a healthy, idle group (normal close): ``shutdown()``, which flushes pending work
    and destroys the communicators, so it waits for the peers and must never be used on a
    broken group (use :func:`abort_group`). Falls back to ``abort()`` if shutdown fails."""
    if pg is None:
        return
    try:
        pg.shutdown()
    except Exception as e:  # noqa: BLE001
        log.warning("weight sync: shutting the group down failed (%s); aborting it", e)
        abort_group(pg)


def group_device(backend: str) -> torch.device:
    """Where buffers for ``backend`` live (NCCL: the calling thread's current CUDA device)."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
