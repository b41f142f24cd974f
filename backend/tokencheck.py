"""Do the server and the trainer see the same prompt? Image-token consistency.

A frequent silent failure in VLM RL: the inference server resizes images differently from
the trainer's processor (another ``max_pixels``/``min_pixels``, a different processor
config or chat template), so the prompt the policy sampled from is not the one the trainer
scores; at worst the model raises "image features and image tokens do not match", at best
the importance ratio quietly compares different sequences.

What the server counts: its ``usage.prompt_tokens`` is the length of the prompt it
generated from, i.e. the chat template with the generation prompt, tokenised, with every
image's placeholder expanded to its image tokens (the hf engine:
``len(HFEngine.prepare(...).prompt_ids)``; vLLM: ``len(RequestOutput.prompt_token_ids)``
of the processed multimodal prompt). The trainer's count is the same thing through its
adapter (:meth:`backend.adapters.base.ProcessorAdapter.encode_prompt`: chat template with
``add_generation_prompt=True``, then the processor on the text and the images), i.e.
exactly the prompt part of the sequence the trainer builds. The two are equal only when
both preprocess the same images the same way.

:func:`prompt_token_mismatch` compares one prompt; :func:`check_rollout_tokens` is what
the trainer runs on its first batch of rollouts that carry the server's count (one
rollout per distinct image shape), raising :class:`ImageTokenMismatch`.
"""

from __future__ import annotations

from typing import Any, Sequence

from backend.errors import VlmrlError
from backend.rollout_types import Rollout, image_counts

FIX = ("the server and trainer preprocess images differently — check inference max_pixels/min_pixels "
       "(vLLM: [inference.args] mm_processor_kwargs; hf engine: the model's processor config) against the "
       "trainer's processor settings, or the chat template")


class ImageTokenMismatch(VlmrlError):
    """The server counted another number of prompt tokens than the trainer's processor."""


def trainer_prompt_tokens(adapter: Any, messages: list[dict[str, Any]], images: Sequence[Any]) -> tuple[int, int | None]:
    """(prompt tokens, image tokens among them) as the trainer encodes ``messages`` with ``images``.

    ``adapter`` is a :class:`~backend.adapters.base.ProcessorAdapter` (what the trainer's batches
    are built with); the image-token count is None when the adapter knows no image token.
    Raises what the processor raises for a prompt it cannot encode.
    """
    enc = adapter.encode_prompt(messages, list(images))
    tid = adapter.image_token_id()
    n_img = int((enc.input_ids == tid).sum()) if tid is not None else None
    return enc.length, n_img


def processor_pixels(processor: Any) -> str:
    """The trainer processor's image-size limits, e.g. ``max_pixels 65536, min_pixels 1024`` ('' if unknown)."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)  # a dict, or transformers' SizeDict

    def get(*keys: str) -> Any:
        for k in keys:
            v = getattr(ip, k, None) or (size.get(k) if isinstance(size, dict) else getattr(size, k, None))
            if v:
                return v
        return None

    # Qwen-VL processors (they merge patches) keep max/min pixels as size's longest/shortest
    # "edge", in pixels; elsewhere (LLaVA's CLIP processor) an edge is a length: not shown
    qwen = getattr(ip, "merge_size", None) is not None
    hi = get("max_pixels", *(("longest_edge",) if qwen else ()))
    lo = get("min_pixels", *(("shortest_edge",) if qwen else ()))
    return ", ".join(f"{k} {v}" for k, v in (("max_pixels", hi), ("min_pixels", lo)) if isinstance(v, int))


def describe_images(n_img: int | None, images: Sequence[Any]) -> str:
    """``4 image tokens for a 64x64 image`` / ``... for 2 images: 64x64, 32x32`` / ``no image``."""
    sizes = [f"{im.size[0]}x{im.size[1]}" for im in images if hasattr(im, "size")]
    count = "image tokens" if n_img is None else f"{n_img} image tokens"
    if not images:
        return "no image"
    if len(sizes) == 1:
        return f"{count} for a {sizes[0]} image"
    return f"{count} for {len(images)} images: {', '.join(sizes)}"


def prompt_token_mismatch(adapter: Any, messages: list[dict[str, Any]], images: Sequence[Any],
                          server_tokens: int, example_id: str) -> str | None:
    """None when the trainer's ``adapter`` counts ``server_tokens`` prompt tokens for ``messages``
    (HF chat format, their PIL ``images`` exactly as sent), else a message naming ``example_id``,
    both counts, the image tokens and the image sizes, and what to check."""
    mine, n_img = trainer_prompt_tokens(adapter, messages, images)
    if mine == int(server_tokens):
        return None
    limits = processor_pixels(adapter.processor)
    limits = f"; trainer processor: {limits}" if limits else ""
    return (f"server counted {server_tokens} prompt tokens for example {example_id}, the trainer's processor "
            f"counts {mine} ({describe_images(n_img, images)}{limits}): {FIX}")


def first_turn(r: Rollout) -> tuple[list[dict[str, Any]], list[Any], int | None]:
    """(messages, images, server prompt tokens) of ``r``'s prompt: an episode's first turn."""
    if not r.is_episode:
        return r.messages, list(r.images), r.prompt_tokens
    t = r.turns[0]
    msgs = r.messages[: t.prompt_end]
    return msgs, list(r.images[: sum(image_counts(msgs))]), t.prompt_tokens


def check_rollout_tokens(adapter: Any, rollouts: Sequence[Rollout]) -> bool:
    """Compare the server's prompt-token count with the trainer's for one rollout per distinct
    image shape (an episode: its first turn, whose prompt and count are at hand; later turns'
    prompts hold the same kind of images). Returns True once something was compared (False:
    no rollout carries a count, or the adapter has no processor to encode with: nothing to
    check yet); raises :class:`ImageTokenMismatch` when the counts differ.

    A rollout the processor cannot encode is skipped here: the batch drops it with its reason.
    """
    if not hasattr(adapter, "encode_prompt"):
        return False
    seen: set[tuple[Any, ...]] = set()
    checked = False
    for r in rollouts:
        msgs, imgs, server = first_turn(r)
        if server is None:
            continue
        key = tuple((getattr(im, "size", None), getattr(im, "mode", None)) for im in imgs)
        if key in seen:
            continue
        try:
            problem = prompt_token_mismatch(adapter, msgs, imgs, server, r.example_id)
        except (ValueError, TypeError, RuntimeError):
            continue
        seen.add(key)
        checked = True
        if problem:
            raise ImageTokenMismatch(problem)
    return checked
