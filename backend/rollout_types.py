"""The rollout record that flows from the rollout client to adapters and the run directory,
the protocol of what produces rollouts, and the examples a step leaves out.

A step's rollouts come as a :class:`StepRollouts` (a list of rollouts, as before) whose
``dropped`` names the examples left out of the step: the server refused them for their own
content (a broken, empty or oversized image, a prompt too long: :data:`EXAMPLE_ERROR_CODES`)
or the client could not encode their images. :class:`DropWatch` is the trainer's side: it
logs each drop and stops a run whose steps keep losing every example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Iterable, Protocol, Sequence

from PIL import Image

from backend.errors import VlmrlError
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
    #: the server's count of the prompt's tokens (chat template with the generation prompt,
    #: image tokens expanded: ``usage.prompt_tokens``), None when it does not say; an
    #: episode's counts are on its turns (``Turn.prompt_tokens``)
    prompt_tokens: int | None = None

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


#: server error codes (``error.code`` of a 4xx) that blame the example, not the run's set-up
#: (unlike model_not_found, invalid_value, bad tokens): its group is dropped, the step goes on
EXAMPLE_ERROR_CODES = frozenset({"invalid_image", "image_too_large", "too_many_images", "prompt_too_long",
                                 "invalid_prompt"})
#: steps in a row that lose every example before the run stops (a broken dataset)
MAX_EMPTY_STEPS = 3


class RolloutError(VlmrlError):
    """A rollout request failed for good (bad request, or retries exhausted). ``code``: the
    server's error code of a 4xx (``invalid_image`` too for an image the client cannot encode),
    ``status`` its HTTP status, ``detail`` the message without the request's name."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.detail = code, status, detail or message


@dataclass(frozen=True)
class DroppedExample:
    """An example left out of its step (its whole group): no rollout of it is trained on."""

    example_id: str
    group: int
    index: int  # the index its group's first rollout would have had in the step
    reason: str  # what the server (or the client) said, without the example's name
    code: str | None = None  # the error code: invalid_image, image_too_large, prompt_too_long, ...


class StepRollouts(list[Rollout]):
    """A step's rollouts (a plain list of them) and the examples left out of it (``dropped``)."""

    def __init__(self, rollouts: Iterable[Rollout] = (), dropped: Iterable[DroppedExample] = ()) -> None:
        super().__init__(rollouts)
        self.dropped = list(dropped)

    @classmethod
    def of(cls, groups: Iterable[list[Rollout] | DroppedExample]) -> "StepRollouts":
        """Each group's rollouts in order, or its drop."""
        groups = list(groups)
        return cls([r for g in groups if not isinstance(g, DroppedExample) for r in g],
                   [g for g in groups if isinstance(g, DroppedExample)])


def dropped_of(rollouts: Sequence[Rollout]) -> list[DroppedExample]:
    """The examples left out of the step of ``rollouts`` (none for a plain list)."""
    return list(getattr(rollouts, "dropped", ()))


async def or_drop(coro: Coroutine[Any, Any, list[Rollout]], example_id: str, group: int,
                  index: int) -> list[Rollout] | DroppedExample:
    """The rollouts ``coro`` gives, or the drop of its example when it failed for the example's
    own content (an error code in :data:`EXAMPLE_ERROR_CODES`); any other error is raised."""
    try:
        return await coro
    except RolloutError as e:
        if e.code not in EXAMPLE_ERROR_CODES:
            raise
        return DroppedExample(example_id, group, index, e.detail, e.code)


class DropWatch:
    """Logs each dropped example (``step S: dropped example X: reason``) and counts the steps
    in a row that lost every example; :meth:`check` stops the run after ``limit`` of them."""

    def __init__(self, log: Callable[[str], None], limit: int = MAX_EMPTY_STEPS) -> None:
        self.log, self.limit = log, limit
        self.empty_in_a_row = 0
        self.last: DroppedExample | None = None

    def note(self, step: int, rollouts: Sequence[Rollout]) -> int:
        """Log the drops of ``step`` (whose rollouts are ``rollouts``); return how many."""
        drops = dropped_of(rollouts)
        for d in drops:
            self.log(f"step {step}: dropped example {d.example_id}: {d.reason}")
        if drops and not rollouts:
            self.empty_in_a_row += 1
            self.last = drops[-1]
            self.log(f"step {step}: all {len(drops)} examples were dropped: step skipped (no update), "
                     f"{self.empty_in_a_row} such step(s) in a row; the run stops at {self.limit}")
        elif rollouts:
            self.empty_in_a_row = 0
        return len(drops)

    def check(self) -> None:
        """Raise :class:`VlmrlError` once ``limit`` steps in a row lost every example."""
        if self.empty_in_a_row >= self.limit and self.last is not None:
            raise VlmrlError(
                f"{self.empty_in_a_row} steps in a row lost every example (the last: {self.last.example_id}: "
                f"{self.last.reason}): the environment's examples are broken; fix them (see the trainer log and "
                "the drop records in rollouts.jsonl) and start again")


class RolloutSource(Protocol):
    """Where rollouts come from: ``backend.rollout.RolloutClient`` or an in-process sampler."""

    #: True when it samples with the trainer's own model: the trainer then never asks for
    #: the next step's rollouts while it trains (they would come from half-updated weights).
    shares_model: bool

    def collect(
        self, env: Environment, examples: Sequence[Example], n: int, *, temperature: float, top_p: float,
        max_tokens: int, step: int, seed: int | None = None,
    ) -> list[Rollout]: ...  # a StepRollouts when it can leave examples out

    def collect_episodes(
        self, env: MultiTurnEnvironment, seeds: Sequence[int], n: int, *, temperature: float, top_p: float,
        max_tokens: int, step: int, max_context: int | None = None,
    ) -> list[Rollout]: ...
