"""Adapters for Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

The processor expands each image's ``<|image_pad|>`` into ``t*h*w / merge**2`` tokens
between ``<|vision_start|>`` and ``<|vision_end|>``; ``pixel_values`` holds every image's
patches concatenated, ``(sum_i t_i*h_i*w_i, C*T*P*P)``, and ``image_grid_thw`` (images, 3)
says how to split them, so images of different sizes and several images per prompt
concatenate without padding. ``mm_token_type_ids`` (B, L) marks image tokens for M-RoPE:
the completion and the padding are text (0).

The rollouts of a group share their images: :meth:`QwenVLAdapter.forward` runs the
vision tower once per distinct image and hands the features to every sequence that
shows it (``mm_encoder_outputs``); values and gradients are those of the plain forward.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from backend.adapters.base import MultimodalBatch, ProcessorAdapter, PromptEncoding
from backend.distributed import is_sharded


class QwenVLAdapter(ProcessorAdapter):
    """Shared logic of the Qwen-VL families (register a subclass per family)."""

    token_keys: ClassVar[tuple[str, ...]] = ("mm_token_type_ids",)

    def image_token_id(self) -> int:
        tid = getattr(self.processor, "image_token_id", None)
        if tid is None:
            tid = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return int(tid)

    def check_images(self, enc: PromptEncoding, n_images: int) -> str | None:
        grid = enc.image_kwargs.get("image_grid_thw")  # (images, 3)
        n_tokens = int((enc.input_ids == self.image_token_id()).sum())
        if grid is None:
            return None if n_tokens == 0 and n_images == 0 else (
                f"{n_tokens} image tokens but the processor returned no image_grid_thw for {n_images} image(s)"
            )
        if grid.shape[0] != n_images:
            return f"{n_images} image(s) but {grid.shape[0]} image grids (does the prompt place every image?)"
        merge = int(getattr(getattr(self.processor, "image_processor", None), "merge_size", 2))
        expected = int(grid.prod(dim=-1).sum()) // (merge * merge)
        if n_tokens != expected:
            return f"{n_tokens} image tokens in the prompt, {expected} expected from image_grid_thw"
        return None

    def forward(self, model: Any, batch: MultimodalBatch, **kwargs: Any) -> Any:
        inputs = self.model_inputs(batch)
        idx = batch.image_index  # (images,)
        pv, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        base = getattr(model, "model", None)
        if (
            idx is None or pv is None or grid is None or int(idx.max()) + 1 == idx.numel()
            or not hasattr(base, "get_image_features") or not _takes_encoder_outputs(model)
            or is_sharded(model)  # FSDP2 gathers parameters in the root's forward: no side entrance
        ):
            return model(**inputs, **kwargs)
        # the first slot of each distinct image, in distinct-image order
        first: dict[int, int] = {}
        for slot, u in enumerate(idx.tolist()):
            first.setdefault(u, slot)
        order = [first[u] for u in range(len(first))]
        chunks = pv.split(grid.prod(dim=-1).tolist())  # per image: (t*h*w, C*T*P*P)
        feats = base.get_image_features(torch.cat([chunks[s] for s in order]), grid[order], return_dict=True)
        expand = idx.tolist()
        feats.pooler_output = tuple(feats.pooler_output[u] for u in expand)  # per image slot
        deep = getattr(feats, "deepstack_features", None)
        if deep is not None:  # Qwen3-VL: per layer, per image
            feats.deepstack_features = [tuple(layer[u] for u in expand) for layer in deep]
        inputs.pop("pixel_values")
        return model(**inputs, mm_encoder_outputs={"image": feats}, **kwargs)


def _takes_encoder_outputs(model: Any) -> bool:
    try:
        return "mm_encoder_outputs" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class Qwen2VLAdapter(QwenVLAdapter):
    name = "qwen2-vl"
    model_types = ("qwen2_vl",)


class Qwen25VLAdapter(QwenVLAdapter):
    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)


class Qwen3VLAdapter(QwenVLAdapter):
    name = "qwen3-vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")

