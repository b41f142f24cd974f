"""The training side of vlmrl: config, inference server, rollouts, weight sync, trainer.

Public names are imported lazily so that ``import backend`` (and the CLI) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MultimodalRLConfig": "backend.config",
    "VlmrlConfig": "backend.config",
    "load_config": "backend.config",
    "MultimodalBatch": "backend.adapters",
    "MultimodalAdapter": "backend.adapters",
    "MultimodalGRPOTrainer": "backend.trainer",
    "Rollout": "backend.rollout_types",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'backend' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


__all__ = sorted(_LAZY)
