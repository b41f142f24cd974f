"""Adapter for LLaVA-style models: one ``<image>`` placeholder per image.

The processor resizes every image to the vision tower's size and expands each ``<image>``
into ``image_seq_length`` tokens; ``pixel_values`` is ``(images, C, H, W)`` across the
batch (LLaVA-NeXT: ``(images, patches, C, H, W)`` with ``image_sizes`` (images, 2)).
"""

from __future__ import annotations

from backend.adapters.base import ProcessorAdapter, PromptEncoding


class LlavaAdapter(ProcessorAdapter):
    name = "llava"
    model_types = ("llava", "llava_next")

    def image_token_id(self) -> int:
        tid = getattr(self.processor, "image_token_id", None)
        if tid is None:
            tid = getattr(self.model_config, "image_token_index", None) or self.tokenizer.convert_tokens_to_ids(
                "<image>"
            )
        return int(tid)

    def check_prompt_text(self, text: str, n_images: int) -> None:
        """One ``<image>`` placeholder per image.

        transformers 5.24's processor refuses a mismatch, 5.20's (the vLLM 0.33 environment)
        expands one placeholder for two images without a word, and the token count alone
        cannot tell (16 tokens are a multiple of 2 images): count the placeholders instead.
        """
        token = getattr(self.processor, "image_token", None) or "<image>"
        n = text.count(token)
        if n != n_images:
            raise ValueError(f"{n} {token} placeholder(s) in the prompt for {n_images} image(s)")

    def check_images(self, enc: PromptEncoding, n_images: int) -> str | None:
        pv = enc.image_kwargs.get("pixel_values")
        n_tokens = int((enc.input_ids == self.image_token_id()).sum())
        got = 0 if pv is None else int(pv.shape[0])
        if got != n_images:
            return f"{n_images} image(s) but pixel_values for {got}"
        if n_images and (n_tokens == 0 or n_tokens % n_images):
            return f"{n_tokens} image tokens for {n_images} image(s) (does the prompt place every image?)"
        if not n_images and n_tokens:
            return f"{n_tokens} image tokens but no images"
        return None
