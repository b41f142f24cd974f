"""An in-process trainer on the tiny model, as the trainer, precision and LoRA tests build it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from backend.adapters import adapter_for
from backend.config import MultimodalRLConfig
from backend.trainer import MultimodalGRPOTrainer
from environments import make_env


def load_tiny(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model in eval mode, processor)`` of the model directory ``path``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval(), AutoProcessor.from_pretrained(path)


def tiny_cfg(**kw: Any) -> MultimodalRLConfig:
    """Small steps: 2 prompts x 4 completions of 4 tokens, one micro-batch, 3 steps (``kw`` overrides)."""
    base: dict[str, Any] = dict(learning_rate=3e-4, max_steps=3, batch_size=8, micro_batch_size=8,
                                rollouts_per_step=4, max_tokens=4, temperature=1.0, seed=0)
    base.update(kw)
    return MultimodalRLConfig(**base)


def tiny_trainer(path: Path, cfg: MultimodalRLConfig, model: Any = None, **kw: Any) -> MultimodalGRPOTrainer:
    """A trainer on the colours environment for the model at ``path`` (or ``model``, with ``path``'s
    processor); ``kw`` go to :class:`MultimodalGRPOTrainer`."""
    loaded, processor = load_tiny(path)
    model = loaded if model is None else model
    adapter = adapter_for(model.config, processor=processor, max_length=1024)
    return MultimodalGRPOTrainer(model, processor, adapter, cfg, env=make_env("colors", {}), log=lambda s: None,
                                 **kw)
