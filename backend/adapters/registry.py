"""The adapter registry: built-in adapters by name and ``model_type``, plus user ones.

``adapter_for(model.config, name=None, processor=processor)`` picks the adapter from the
model's ``model_type`` unless a name (``trainer.args.adapter``) is given. The built-in
adapters are listed here explicitly; a user's adapter joins with :func:`register_adapter`.
"""

from __future__ import annotations

from typing import Any

from backend.adapters.base import MultimodalAdapter, ProcessorAdapter
from backend.adapters.llava import LlavaAdapter
from backend.adapters.qwen import Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter
from backend.errors import ModelError

ADAPTERS: dict[str, type[MultimodalAdapter]] = {}


def register_adapter(cls: type[MultimodalAdapter]) -> type[MultimodalAdapter]:
    """Class decorator: make ``cls`` findable by its name and model types."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    ADAPTERS[cls.name] = cls
    return cls


for _builtin in (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, LlavaAdapter):
    register_adapter(_builtin)


def _model_type(model_config: Any) -> str | None:
    if model_config is None:
        return None
    if isinstance(model_config, str):
        return model_config
    if isinstance(model_config, dict):
        return model_config.get("model_type")
    return getattr(model_config, "model_type", None)


def adapter_class_for(model_config: Any, name: str | None = None) -> type[MultimodalAdapter]:
    """The adapter class named ``name``, else the one serving the config's ``model_type``."""
    if name:
        key = name.strip().lower().replace("_", "-")
        if key in ADAPTERS:
            return ADAPTERS[key]
        raise ModelError(f"unknown adapter {name!r}; available: {', '.join(sorted(ADAPTERS))}")
    mtype = _model_type(model_config)
    for cls in ADAPTERS.values():
        if mtype in cls.model_types:
            return cls
    served = sorted(t for c in ADAPTERS.values() for t in c.model_types)
    raise ModelError(
        f"no adapter for model_type {mtype!r} (served: {', '.join(served)}); "
        "set trainer.args.adapter or register one with backend.adapters.register_adapter"
    )


def adapter_for(model_config: Any, name: str | None = None, *, processor: Any, **kwargs: Any) -> MultimodalAdapter:
    """Build the adapter for a model: by ``name`` if given, else by ``model_config.model_type``.

    ``kwargs`` (e.g. ``max_length``) go to the adapter's constructor.
    """
    cls = adapter_class_for(model_config, name)
    if issubclass(cls, ProcessorAdapter):
        return cls(processor, model_config=model_config if not isinstance(model_config, str) else None, **kwargs)
    return cls(processor, **kwargs)  # type: ignore[call-arg]


def available_adapters() -> list[str]:
    return sorted(ADAPTERS)
