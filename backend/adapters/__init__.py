"""Batch builders per VLM family: rollouts -> :class:`MultimodalBatch`.

``adapter_for(model.config, name=None, processor=processor)`` picks the adapter from the
model's ``model_type`` unless a name (``trainer.args.adapter``) is given.
"""

from backend.adapters.base import (
    DroppedRollout,
    MultimodalAdapter,
    MultimodalBatch,
    ProcessorAdapter,
    PromptEncoding,
)
from backend.adapters.llava import LlavaAdapter
from backend.adapters.qwen import Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter, QwenVLAdapter
from backend.adapters.registry import (
    ADAPTERS,
    adapter_class_for,
    adapter_for,
    available_adapters,
    register_adapter,
)

__all__ = [
    "ADAPTERS",
    "DroppedRollout",
    "LlavaAdapter",
    "MultimodalAdapter",
    "MultimodalBatch",
    "ProcessorAdapter",
    "PromptEncoding",
    "Qwen25VLAdapter",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "QwenVLAdapter",
    "adapter_class_for",
    "adapter_for",
    "available_adapters",
    "register_adapter",
]
