"""The rollout record that flows from the rollout client to adapters and the run directory,
and the protocol of what produces rollouts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from PIL import Image

from environments.base import Environment, Episode, Example, MultiTurnEnvironment, Transition


def image_counts(messages: list[dict[str, Any]]) -> list[int]:
    """How many images each message holds (messages in the processor's chat format)."""
    return [sum(1 for p in m["content"] if p.get("type") == "image") if isinstance(m.get("content"), list) else 0
            for m in messages]


def episode_example_id(env_id: str, seed: int) -> str:
    """The example id of the episodes of ``seed`` (also the stem of their image files)."""
    return f"{env_id or 'episode'}-{seed}"


def episode_end_reason(env: MultiTurnEnvironment, episode: Episode) -> str:
    """Why a finished episode ended: ``max_turns`` (the cap) or ``done`` (the game)."""
    return "max_turns" if episode.turn >= env.max_turns else "done"


@dataclass
class Turn:
    """One model turn of an episode: what the server generated, and what the game made of it.

    ``prompt_end`` is how many messages of the episode's conversation formed this turn's
    prompt (the reply is message ``prompt_end``). ``prompt_tokens`` is the server's count
    of that prompt's tokens (images included), when it reports one.
    """

    prompt_end: int
    completion: str
    completion_ids: list[int]
    behavior_logprobs: list[float]
    finish_reason: str = "stop"
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if len(self.completion_ids) != len(self.behavior_logprobs):
            raise ValueError(f"turn: {len(self.completion_ids)} completion ids but "
                             f"{len(self.behavior_logprobs)} logprobs")

    @classmethod
    def played(cls, prompt_end: int, completion: str, ids: list[int], logprobs: list[float], finish: str,
               tr: Transition, prompt_tokens: int | None = None) -> "Turn":
        """The turn whose reply ``completion`` (``ids``/``logprobs``) the game answered with ``tr``."""
        return cls(prompt_end=prompt_end, completion=completion, completion_ids=ids, behavior_logprobs=logprobs,
                   finish_reason=finish, reward=float(tr.score.reward), reward_parts=dict(tr.score.parts),
                   info=dict(tr.info), prompt_tokens=prompt_tokens)


@dataclass
class Rollout:
    """One sampled completion of one prompt, scored (or one episode of a game, see ``turns``).

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
    #: an episode of a multi-turn environment: its model turns in order. ``messages`` is then
    #: the whole conversation (every turn's images), ``completion_ids``/``behavior_logprobs``
    #: the turns' ones concatenated, ``reward``/``reward_parts`` the episode's sums.
    turns: list[Turn] = field(default_factory=list)
    #: why an episode ended: "done" (the game), "max_turns", "context" (the next prompt would
    #: not fit ``max_model_len``); None for a single-turn rollout
    end_reason: str | None = None
    #: an episode's flat metrics from its environment (``MultiTurnEnvironment.summary``)
    summary: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.completion_ids) != len(self.behavior_logprobs):
            raise ValueError(
                f"rollout {self.example_id}: {len(self.completion_ids)} completion ids but "
                f"{len(self.behavior_logprobs)} logprobs"
            )

    @property
    def is_episode(self) -> bool:
        """True for an episode of a multi-turn environment."""
        return bool(self.turns)

    @classmethod
    def from_turns(cls, turns: list[Turn], **fields: Any) -> "Rollout":
        """An episode rollout: ids, logprobs, reward and parts from its ``turns``."""
        parts: dict[str, float] = {}
        for t in turns:
            for k, v in t.reward_parts.items():
                parts[k] = parts.get(k, 0.0) + v
        return cls(
            completion=turns[-1].completion if turns else "",
            finish_reason=turns[-1].finish_reason if turns else "stop",
            reward=sum(t.reward for t in turns), reward_parts=parts, **_joined(turns), **fields,
        )

    def keep_turns(self, n: int, end_reason: str) -> "Rollout":
        """This episode with its first ``n`` turns only (ids and logprobs too); its reward,
        parts and advantage stay the whole episode's."""
        return dataclasses.replace(self, end_reason=end_reason, **_joined(self.turns[:n]))


def _joined(turns: list[Turn]) -> dict[str, Any]:
    """``turns`` and their ids and logprobs concatenated, as Rollout fields."""
    return {"turns": list(turns), "completion_ids": [i for t in turns for i in t.completion_ids],
            "behavior_logprobs": [x for t in turns for x in t.behavior_logprobs]}


class RolloutSource(Protocol):
    """Where rollouts come from: ``backend.rollout.RolloutClient`` or an in-process sampler."""

    #: True when it samples with the trainer's own model: the trainer then never asks for
    #: the next step's rollouts while it trains (they would come from half-updated weights).
    shares_model: bool

    def collect(
        self, env: Environment, examples: Sequence[Example], n: int, *, temperature: float, top_p: float,
        max_tokens: int, step: int, seed: int | None = None,
    ) -> list[Rollout]: ...

    def collect_episodes(
        self, env: MultiTurnEnvironment, seeds: Sequence[int], n: int, *, temperature: float, top_p: float,
        max_tokens: int, step: int, max_context: int | None = None,
    ) -> list[Rollout]: ...
