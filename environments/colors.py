"""``colors``: name the colour of a solid (or noisy) image.

Each image is one of N base colours with per-image jitter; half get pixel noise.
Reward 1 when the first word of the completion is the colour's name (case and
punctuation ignored), else 0. Train and eval splits are disjoint by construction:
train examples come from seeds ``(seed, step, i)``, eval from ``(seed + 10**6, i)``.
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np
from PIL import Image

from environments.base import Environment, Example, Score

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "pink": (245, 150, 190),
    "brown": (120, 75, 35),
}

QUESTION = "What colour is this image? Answer with one word."

_WORD = re.compile(r"[a-z]+")


def first_word(text: str) -> str:
    """The first alphabetic word of ``text``, lower-cased ('' if none)."""
    m = _WORD.search(text.lower())
    return m.group(0) if m else ""


class ColorsEnv(Environment):
    """Colour naming with images of ``num_colors`` colours."""

    id = "colors"

    def __init__(
        self,
        num_colors: int = 5,
        image_size: int = 64,
        jitter: int = 20,
        noise_fraction: float = 0.5,
        noise_std: float = 12.0,
        seed: int = 0,
        system_prompt: str | None = None,
    ) -> None:
        if not 2 <= num_colors <= len(PALETTE):
            raise ValueError(f"num_colors must be between 2 and {len(PALETTE)}, got {num_colors}")
        if not 8 <= image_size <= 1024:
            raise ValueError(f"image_size must be between 8 and 1024, got {image_size}")
        if not 0 <= noise_fraction <= 1:
            raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
        self.colors = list(PALETTE)[:num_colors]
        self.image_size = image_size
        self.jitter = jitter
        self.noise_fraction = noise_fraction
        self.noise_std = noise_std
        self.seed = seed
        self.system_prompt = system_prompt

    def _example(self, key: tuple[int, ...], ex_id: str) -> Example:
        rng = random.Random("/".join(map(str, key)))
        name = rng.choice(self.colors)
        base = np.array(PALETTE[name], dtype=np.float32)
        color = base + np.array([rng.uniform(-self.jitter, self.jitter) for _ in range(3)], dtype=np.float32)
        arr = np.broadcast_to(color, (self.image_size, self.image_size, 3)).copy()
        noisy = rng.random() < self.noise_fraction
        if noisy:
            nrng = np.random.default_rng(rng.getrandbits(32))
            arr += nrng.normal(0.0, self.noise_std, size=arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append(
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTION}]}
        )
        return Example(id=ex_id, messages=messages, answer=name, info={"noisy": noisy})

    def train_examples(self, step: int, n: int) -> list[Example]:
        return [self._example((self.seed, step, i), f"train-{step}-{i}") for i in range(n)]

    def eval_examples(self, n: int) -> list[Example]:
        return [self._example((self.seed + 10**6, i), f"eval-{i}") for i in range(n)]

    def score(self, example: Example, completion: str) -> Score:
        word = first_word(completion)
        correct = float(word == example.answer)
        return Score(reward=correct, parts={"correct": correct, "is_color": float(word in PALETTE)})


def make_colors(**kwargs: Any) -> ColorsEnv:
    """The ``colors`` environment with ``[env.args]`` (registered by :mod:`environments`)."""
    return ColorsEnv(**kwargs)
