"""LoRA (peft) and vision-tower freezing for the trainer (``[trainer.args] lora``, ``freeze_vision``).

With LoRA the trainer's model is a ``peft.PeftModel``: its forward passes every keyword
(``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ``logits_to_keep``) to the
wrapped Hugging Face model, whose target ``Linear`` layers peft replaced in place, and
``generate`` reaches the wrapped model through peft's attribute forwarding.

The server gets **merged** weights (``W + alpha/r * B @ A``) under the base model's
Hugging Face names (:func:`merged_weights`), not the adapter: the weight sync sends named
full tensors into the engine's own parameters (hf engine and vLLM alike), so merged
tensors need nothing new on the server, while serving an adapter would need vLLM's LoRA
mode (slower kernels, max rank and adapter loading to configure) and a second path in the
hf engine. Only the adapted layers' weights are sent: every other weight is frozen, so
the server's start weights (what it holds after a restart too) already equal them.

Checkpoints hold the adapter only (peft's ``adapter_model.safetensors`` and
``adapter_config.json``); see :func:`save_adapter` and :func:`load_adapter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from backend.config import LoraSettings

#: attribute names of the vision encoder in the supported families (Qwen-VL: ``visual``,
#: LLaVA: ``vision_tower``; ``vision_model`` for other transformers VLMs)
VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a peft-wrapped model (has LoRA adapters)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def vision_tower(model: Any) -> torch.nn.Module | None:
    """The vision encoder of a VLM (the first module named as in :data:`VISION_TOWER_NAMES`)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES:
            return module
    return None


def freeze_vision_tower(model: Any) -> int:
    """Stop gradients into the vision tower (its LoRA adapters included); returns the parameters frozen.

    The multimodal projector stays trainable: it is what adapts the image features to the
    language model, and it is small.
    """
    tower = vision_tower(model)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision tower named {' or '.join(VISION_TOWER_NAMES)}")
    n = 0
    for p in tower.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            n += p.numel()
    return n


def apply_lora(model: Any, settings: LoraSettings, *, fp32_adapters: bool = True) -> Any:
    """Wrap ``model`` with LoRA adapters (peft ``get_peft_model``); only the adapters train.

    ``fp32_adapters``: adapters of a bfloat16/float16 model are kept in float32 (peft's
    ``autocast_adapter_dtype``); False keeps them in the model's dtype (stochastic rounding
    updates bfloat16 parameters only).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from backend.errors import ConfigError

        raise ConfigError(None, "trainer.args.lora", "needs peft: pip install -e '.[lora]'") from None
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=settings.target_modules)
    try:
        peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=fp32_adapters)
    except ValueError as e:  # e.g. "Target modules ... not found in the base model"
        from backend.errors import ConfigError

        raise ConfigError(None, "trainer.args.lora.target_modules", str(e).splitlines()[0]) from None
    return peft_model


def prepare_model(model: Any, lora: LoraSettings | None, freeze_vision: bool, *, fp32_adapters: bool = True) -> Any:
    """``model`` with LoRA applied (when ``lora``) and its vision tower frozen (when ``freeze_vision``)."""
    if lora is not None:
        model = apply_lora(model, lora, fp32_adapters=fp32_adapters)
    if freeze_vision:
        freeze_vision_tower(model)
    return model


def dropout_modules(model: Any) -> list[torch.nn.Module]:
    """The adapters' dropout modules (``[]`` without LoRA or with dropout 0).

    The trainer keeps the model in eval mode (the server samples without dropout) and puts
    only these in training mode around the loss's forward, so ``lora.dropout`` takes effect.
    """
    if not is_lora(model):
        return []
    return [d for _, layer in _lora_layers(model) for d in layer.lora_dropout.values()
            if isinstance(d, torch.nn.Dropout)]


def _lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """``(base module name, LoRA layer)`` for each adapted ``Linear`` of a peft model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


@torch.no_grad()
def merged_weights(model: Any, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapted layers' merged weights ``W + delta`` by the base model's names (``...q_proj.weight``).

    Computed one tensor at a time from peft's ``get_delta_weight`` (what ``merge_and_unload``
    adds), without touching the model; cast to ``dtype`` (the server's) as each is made, so
    float32 master weights do not double what a sync holds.
    """
    for name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        out = base.weight.detach()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A and not layer.merged:
                out = out + layer.get_delta_weight(adapter)
        yield f"{name}.weight", out.to(dtype) if dtype is not None else out


def save_adapter(model: Any, path: Path) -> None:
    """Write the adapter into ``path`` (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    # the base weights never change; peft would otherwise also save the base lm_head/embeddings
    # when they are targets (vocabulary x hidden: ~1.2 GB for an 8B model), so save adapters only
    model.save_pretrained(str(path), save_embedding_layers=False)


def load_adapter(model: Any, path: Path, device: torch.device | str) -> None:
    """Load the adapter saved by :func:`save_adapter` into ``model`` (same LoRA settings)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if not (path / ADAPTER_WEIGHTS).exists():
        raise RuntimeError(f"checkpoint {path}: no {ADAPTER_WEIGHTS} (saved without LoRA?)")
    weights = load_peft_weights(str(path), device=str(device))
    result = set_peft_model_state_dict(model, weights)
    expected = {k for k in model.state_dict() if "lora_" in k}
    missing = sorted(k for k in result.missing_keys if k in expected)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {path}: adapter missing {missing[:5]} unexpected {result.unexpected_keys[:5]}")


def has_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a LoRA checkpoint (holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def merged_model(base: Any, path: str | Path) -> Any:
    """``base`` (the run's model, loaded) with the adapter of checkpoint ``path`` merged in: a plain
    Hugging Face model, as ``vlmrl eval --checkpoint`` needs."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()


__all__ = ["apply_lora", "dropout_modules", "freeze_vision_tower", "has_adapter", "is_lora", "load_adapter",
           "merged_model", "merged_weights", "prepare_model",
           "save_adapter", "vision_tower"]
