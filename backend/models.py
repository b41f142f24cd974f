"""Resolving model names and loading models/processors.

A model is one of: ``builtin:tiny-<family>`` or ``builtin:small-qwen3-vl`` (built once,
offline, into a cache directory and reused), a local directory (used as is), or a hub id (left to transformers, so users
with a hub keep working; with ``HF_HUB_OFFLINE`` set it must already be in the HF cache).
Every failure is a one-line :class:`ModelError` naming the model.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from backend.contract import ENV_MODEL_CACHE
from backend.errors import ModelError

BUILTIN_PREFIX = "builtin:"

#: builtin name -> tiny family
BUILTINS: dict[str, str] = {
    "tiny-qwen3-vl": "qwen3-vl",
    "tiny-qwen2.5-vl": "qwen2.5-vl",
    "tiny-qwen2-vl": "qwen2-vl",
    "tiny-llava": "llava",
    "small-qwen3-vl": "qwen3-vl",
}
#: builtin name -> size (backend.tiny.SIZES) where it is not "tiny"
BUILTIN_SIZES: dict[str, str] = {"small-qwen3-vl": "small"}

#: config.model_type -> family name used across vlmrl (adapters, tiny builder)
MODEL_TYPE_FAMILY: dict[str, str] = {
    "qwen3_vl": "qwen3-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen2_vl": "qwen2-vl",
    "llava": "llava",
}

_DTYPES = ("float32", "bfloat16", "float16")


def model_cache_dir() -> Path:
    """Where builtin models are built: ``$VLMRL_CACHE_DIR`` or ``~/.cache/vlmrl/models``."""
    env = os.environ.get(ENV_MODEL_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlmrl" / "models"


def builtin_dir(name: str, seed: int = 0) -> Path:
    """The cache directory of builtin ``name`` (e.g. ``tiny-qwen3-vl``) for the current builder."""
    from backend.tiny import BUILDER_VERSION

    return model_cache_dir() / f"{name}-v{BUILDER_VERSION}-s{seed}"


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(model: str) -> str:
    """A loadable name or path for ``model`` (builds builtin models on first use)."""
    model = model.strip()
    if model.startswith(BUILTIN_PREFIX):
        name = model[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ModelError(f"unknown builtin model {model!r}; choose one of "
                             + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
        return str(_ensure_builtin(name))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model {model!r}: directory has no config.json (not a Hugging Face model)")
        return str(path)
    if model.startswith(("/", "./", "../", "~")) or path.suffix in (".json", ".safetensors"):
        raise ModelError(f"model {model!r}: no such directory")
    if _hf_offline() and not _in_hf_cache(model):
        raise ModelError(f"model {model!r} is not a local directory and not in the Hugging Face cache, "
                         "and HF_HUB_OFFLINE is set; download it first or use builtin:tiny-qwen3-vl")
    return model


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    try:
        got = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id syntax and the like: certainly not cached
        return False
    return isinstance(got, str)


def _ensure_builtin(name: str, seed: int = 0) -> Path:
    """Build builtin ``name`` once; concurrent callers wait on a lock and reuse the result."""
    from backend.tiny import build_tiny, read_provenance

    target = builtin_dir(name, seed)
    if read_provenance(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    with open(lock, "a") as fh:
        # The lock saves a second process from building the same model for nothing; the
        # atomic rename inside build_tiny keeps the directory whole even without it.
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if read_provenance(target) is None:
                build_tiny(BUILTINS[name], target, seed=seed, warmup=True, progress=True,
                           size=BUILTIN_SIZES.get(name, "tiny"))
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return target


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def load_model_and_processor(model: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load ``(model, processor)`` with the Auto classes; the model is in eval mode on ``device``.

    Padding side is left to callers (left for generation, either for scoring).
    """
    path = resolve_model(model)
    torch_dtype = _torch_dtype(dtype)
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        net = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
        net.to(device)
        net.eval()
    except ModelError:
        raise
    except Exception as e:  # transformers raises many types; the user needs one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"cannot load model {model!r} ({path}): {type(e).__name__}: {msg}") from e
    return net, processor


def enable_gradient_checkpointing(model: Any) -> list[Any]:
    """Turn on transformers' gradient checkpointing; returns the layers that checkpoint.

    transformers checkpoints a ``GradientCheckpointingLayer`` only while that layer is in
    training mode. The trainer keeps the model in eval mode (no dropout: the server samples
    without it), so :class:`layers_training` flips just these layers (not their submodules,
    whose dropout stays off) around the loss's forward.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "set [trainer.args] gradient_checkpointing = false")
    # transformers 5.24 renamed it activation_checkpointing_enable; the vLLM 0.33 env has 5.20
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ModelError(f"{type(model).__name__} has no checkpointable layers; "
                         "set [trainer.args] gradient_checkpointing = false")
    return layers


class layers_training:
    """Put ``layers`` (only those modules, not their children) in training mode for a while."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers

    def __enter__(self) -> None:
        for m in self.layers:
            m.training = True

    def __exit__(self, *exc: object) -> None:
        for m in self.layers:
            m.training = False


def model_family(model_or_config: Any) -> str:
    """The vlmrl family (``qwen3-vl``, ``qwen2.5-vl``, ``qwen2-vl``, ``llava``, ...) of a model,
    a config, a ``config.json`` dict, or a model name/path (its config is read)."""
    obj = model_or_config
    if isinstance(obj, (str, Path)):
        obj = _read_config(str(obj))
    if hasattr(obj, "config") and not isinstance(obj, dict):
        obj = obj.config
    model_type = obj.get("model_type") if isinstance(obj, dict) else getattr(obj, "model_type", None)
    if not model_type:
        raise ModelError(f"cannot tell the model family of {model_or_config!r}: no model_type")
    return MODEL_TYPE_FAMILY.get(model_type, model_type.replace("_", "-"))


def _read_config(model: str) -> dict[str, Any]:
    import json

    path = Path(resolve_model(model))
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"model {model!r}: cannot read config.json: {e}") from None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path)).to_dict()
    except Exception as e:
        raise ModelError(f"model {model!r}: cannot load its config: {type(e).__name__}") from e
