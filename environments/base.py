"""The environment API: prompts with images, and rewards for completions.

Environments import neither ``backend`` nor ``vlmrl_tui``. A prompt is a list of chat
messages in the Hugging Face processor format: ``content`` is a list of parts, each
``{"type": "image", "image": PIL.Image}`` or ``{"type": "text", "text": str}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Example:
    """One prompt of an environment."""

    id: str
    messages: list[dict[str, Any]]
    answer: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        """The images of the prompt, in order of appearance."""
        return [
            part["image"]
            for msg in self.messages
            if isinstance(msg.get("content"), list)
            for part in msg["content"]
            if part.get("type") == "image"
        ]


@dataclass(frozen=True)
class Score:
    """A reward and its named parts (parts are logged, ``reward`` is trained on)."""

    reward: float
    parts: dict[str, float] = field(default_factory=dict)


class Environment(ABC):
    """A task: yields prompts and scores completions."""

    #: registry name
    id: str = ""

    @abstractmethod
    def train_examples(self, step: int, n: int) -> list[Example]:
        """``n`` training prompts for ``step`` (deterministic for the env's seed and step)."""

    @abstractmethod
    def eval_examples(self, n: int) -> list[Example]:
        """``n`` held-out prompts, disjoint from the training split."""

    @abstractmethod
    def score(self, example: Example, completion: str) -> Score:
        """Reward of ``completion`` for ``example``."""
