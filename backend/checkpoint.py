"""Checkpoints: ``checkpoints/<step>/`` holds everything a run needs to resume.

Weights and processor (Hugging Face format, so a checkpoint is also a model directory),
optimizer and scheduler (``optimizer.pt``), random generators (``rng.pt``) and
``trainer_state.json`` (step, config, run identity). A checkpoint is written into a
temporary folder and renamed into place with its ``COMPLETE`` marker inside, so a crash
mid-write never leaves a checkpoint that looks whole. Names: :mod:`backend.records`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from backend import records
from backend.rundir import RunDirectory, checkpoint_complete, write_json_atomic


def _numpy_rng_state() -> Any:
    try:
        import numpy as np

        return np.random.get_state()
    except ImportError:  # pragma: no cover
        return None


def _is_tied(model: Any, key: str) -> bool:
    """Whether ``key`` is a weight tied to another one (saved once, so missing on load).

    transformers keeps the tied names in the private ``_tied_weights_keys`` (a list in 4.x,
    a dict in 5.x); there is no public way to ask. Checked with transformers 5.19-5.24.
    """
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied and bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def save_checkpoint(run_dir: RunDirectory, model: Any, processor: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: records.TrainerState) -> Path:
    """Write ``checkpoints/<state.step>/`` (``state`` becomes its trainer_state.json)."""
    step = state.step
    final = run_dir.checkpoint(step)
    path = final.with_name(f".{final.name}.tmp")  # written whole, then renamed into place
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    model.save_pretrained(path)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(path)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               path / records.OPTIMIZER_STATE)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_rng_state()},
               path / records.RNG_STATE)
    write_json_atomic(path / records.TRAINER_STATE, state.to_json())
    (path / records.CHECKPOINT_MARKER).write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(path, final)
    return final


def load_checkpoint(path: str | Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: torch.device | str) -> int:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns its step."""
    path = Path(path)
    if not checkpoint_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {records.CHECKPOINT_MARKER})")
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f), device=str(device)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path}: missing {missing[:5]} unexpected {unexpected[:5]}")
    opt = torch.load(path / records.OPTIMIZER_STATE, map_location=device, weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / records.RNG_STATE, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("numpy") is not None:
        import numpy as np

        np.random.set_state(rng["numpy"])
    return read_trainer_state(path).step


def read_trainer_state(path: str | Path) -> records.TrainerState:
    """The ``trainer_state.json`` of a checkpoint."""
    file = Path(path) / records.TRAINER_STATE
    return records.TrainerState.from_json(json.loads(file.read_text()), source=str(file))
