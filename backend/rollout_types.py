"""The rollout record that flows from the rollout client to adapters and the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Rollout:
    """One sampled completion of one prompt, scored.

    ``messages`` are the prompt in the processor's chat format (image parts hold PIL
    images, in the same order as ``images``). ``completion_ids`` and
    ``behavior_logprobs`` come from the server, one per generated token, so the trainer
    never re-tokenises a completion.
    """

    example_id: str
    group: int  # index of the prompt within the step; rollouts of a group share a prompt
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    completion: str
    completion_ids: list[int]
    behavior_logprobs: list[float]
    finish_reason: str = "stop"
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    advantage: float | None = None
    answer: Any = None
    step: int = 0
    index: int = 0  # index within the step
    weight_version: int | None = None  # the server's weights that sampled it (0: its start weights)

    def __post_init__(self) -> None:
        if len(self.completion_ids) != len(self.behavior_logprobs):
            raise ValueError(
                f"rollout {self.example_id}: {len(self.completion_ids)} completion ids but "
                f"{len(self.behavior_logprobs)} logprobs"
            )
