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
        if engine is None or not getattr(self, "_weight_update_active", False):
            return False
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            try:
                engine.finish_weight_update()
            finally:
                engine.reset_weight_update_target()
                self._weight_update_active = False  # type: ignore[attr-defined]
        return True
