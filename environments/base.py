"""The environment API: prompts with images, and rewards for completions.

Environments import neither ``backend`` nor ``vlmrl_tui``. A prompt is a list of chat
messages in the Hugging Face processor format: ``content`` is a list of parts, each
``{"type": "image", "image": PIL.Image}`` or ``{"type": "text", "text": str}``.

Two kinds of environment:

* :class:`Environment` (single turn): ``train_examples``/``eval_examples`` give prompts,
  ``score`` rewards one completion.
* :class:`MultiTurnEnvironment` (a game played over turns). The contract:

  - ``train_seeds(step, n)`` / ``eval_seeds(n)``: deterministic episode seeds; the eval
    seeds are fixed and disjoint from every training seed. The same seed always starts
    the same episode, so a GRPO group is ``group_size`` episodes of one seed.
  - ``reset(seed) -> Episode``: builds a fresh game (one per episode, never shared, so
    episodes may run concurrently in threads). ``episode.messages`` is the prompt of the
    first turn: the system message, if any, and the first observation (a user message).
    Resets can be slow (world generation), and every method is plain synchronous code:
    an asyncio caller runs ``reset``/``step`` in a thread pool.
  - ``step(episode, reply) -> Transition``: plays the model's reply for this turn. It
    appends the reply (an assistant message) and, unless the episode ended, the next
    observation (a user message) to ``episode.messages``, so ``episode.messages`` is
    always the whole conversation with every turn's image, and the next prompt when
    ``not episode.done``. ``Transition.score`` is this turn's reward with its parts;
    ``Transition.info`` holds per-turn facts (e.g. the parsed action). ``step`` on a
    finished episode raises. An episode ends when the game says so or after
    ``max_turns`` replies.
  - ``truncated(episode)``: the caller stopped the episode early (context full); the
    environment may give a final score for the partial episode (default: none).
  - ``episode.reward`` / ``episode.parts`` sum the turns' rewards and parts (the per-turn
    ones stay in ``episode.transitions``); ``summary(episode)`` gives flat float metrics
    of a finished episode (e.g. ``achievement/collect_wood`` = 1.0) for success rates.
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


@dataclass
class Transition:
    """The outcome of one turn."""

    #: messages to append after the reply (the next observation); None once done
    observation: list[dict[str, Any]] | None
    score: Score
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """One episode: its game, the conversation so far and the turns played."""

    env_id: str
    seed: int
    #: the environment's game object (one per episode; only its environment touches it)
    game: Any
    messages: list[dict[str, Any]]
    transitions: list[Transition] = field(default_factory=list)
    done: bool = False
    #: episode-level facts the environment keeps up to date (e.g. achievements so far)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def turn(self) -> int:
        """Replies played so far."""
        return len(self.transitions)

    @property
    def reward(self) -> float:
        """Sum of the turns' rewards."""
        return sum(t.score.reward for t in self.transitions)

    @property
    def parts(self) -> dict[str, float]:
        """Each reward part summed over the turns."""
        total: dict[str, float] = {}
        for t in self.transitions:
            for k, v in t.score.parts.items():
                total[k] = total.get(k, 0.0) + v
        return total

    @property
    def images(self) -> list[Image.Image]:
        """The conversation's images, in order of appearance."""
        return Example(id="", messages=self.messages).images


class MultiTurnEnvironment(ABC):
    """A game played over turns (see the module docstring for the contract)."""

    #: registry name
    id: str = ""
    #: an episode ends after this many replies at the latest
    max_turns: int = 1

    @abstractmethod
    def train_seeds(self, step: int, n: int) -> list[int]:
        """``n`` training episode seeds for ``step`` (deterministic)."""

    @abstractmethod
    def eval_seeds(self, n: int) -> list[int]:
        """The first ``n`` held-out seeds (fixed, disjoint from all training seeds)."""

    @abstractmethod
    def system_prompt(self) -> str | None:
        """The system message of every episode (rules, reply format), or None."""

    @abstractmethod
    def new_game(self, seed: int) -> tuple[Any, list[dict[str, Any]]]:
        """A fresh game for ``seed`` and its first observation (messages)."""

    @abstractmethod
    def play(self, episode: Episode, reply: str) -> Transition:
        """Apply ``reply`` to ``episode.game``; :meth:`step` does the bookkeeping."""

    def truncated(self, episode: Episode) -> Score | None:
        """The caller stops ``episode`` before it is done (its next prompt would not fit the
        model's context): a final score for what was played, added to the last turn, or None.
        Games that reward every turn need nothing here; environments that score only at the
        end (a verifiers rubric) score the partial episode."""
        return None

    def summary(self, episode: Episode) -> dict[str, float]:
        """Flat metrics of an episode (override to add game-specific ones)."""
        return {"turns": float(episode.turn), "reward": episode.reward}

    def reset(self, seed: int) -> Episode:
        """Start the episode of ``seed``: a new game, the first prompt in ``messages``."""
        game, observation = self.new_game(seed)
        messages: list[dict[str, Any]] = []
        system = self.system_prompt()
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.extend(observation)
        return Episode(env_id=self.id, seed=seed, game=game, messages=messages)

    def step(self, episode: Episode, reply: str) -> Transition:
        """Play ``reply`` as this turn's move; extend the conversation; return the turn."""
        if episode.done:
            raise RuntimeError(f"episode {self.id}/{episode.seed} is over ({episode.turn} turns)")
        tr = self.play(episode, reply)
        if episode.turn + 1 >= self.max_turns and not tr.done:
            tr = Transition(observation=None, score=tr.score, done=True, info=tr.info)
        if tr.done:
            tr.observation = None
        episode.messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        if tr.observation:
            episode.messages.extend(tr.observation)
        episode.transitions.append(tr)
        episode.done = tr.done
        return tr
