"""The multi-turn environment contract, on a tiny game: bookkeeping done by the base class."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from environments import Environment, MultiTurnEnvironment, make_env
from environments.base import Episode, Score, Transition


class CountDown(MultiTurnEnvironment):
    """Say numbers counting down from the seed; the game ends at 0; 1 point per right number."""

    id = "countdown"

    def __init__(self, max_turns: int, system: str | None = "Count down.") -> None:
        self.max_turns = max_turns
        self.system = system

    def train_seeds(self, step: int, n: int) -> list[int]:
        return [1 + (step * n + i) % 5 for i in range(n)]

    def eval_seeds(self, n: int) -> list[int]:
        return [100 + i for i in range(n)]

    def system_prompt(self) -> str | None:
        return self.system

    def _obs(self, k: int) -> list[dict[str, Any]]:
        img = Image.new("RGB", (8, 8), (k % 256, 0, 0))
        return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": str(k)}]}]

    def new_game(self, seed: int) -> tuple[Any, list[dict[str, Any]]]:
        return {"k": seed}, self._obs(seed)

    def play(self, episode: Episode, reply: str) -> Transition:
        game = episode.game
        right = float(reply.strip() == str(game["k"] - 1))
        game["k"] -= 1
        done = game["k"] <= 0
        return Transition(self._obs(game["k"]), Score(right, {"right": right, "turn": 1.0}), done, {"k": game["k"]})


def test_max_turns_ends_an_episode_the_game_would_continue() -> None:
    env = CountDown(max_turns=2)
    ep = env.reset(10)
    assert [m["role"] for m in ep.messages] == ["system", "user"] and len(ep.images) == 1
    first = env.step(ep, "9")
    assert not first.done and first.observation is not None and ep.turn == 1
    last = env.step(ep, "7")
    assert last.done and last.observation is None and ep.done
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ep.reward == 1.0 and ep.parts == {"right": 1.0, "turn": 2.0}
    assert [t.score.reward for t in ep.transitions] == [1.0, 0.0]
    assert env.summary(ep) == {"turns": 2.0, "reward": 1.0}
    with pytest.raises(RuntimeError):
        env.step(ep, "6")


def test_the_game_ends_an_episode_before_max_turns_and_episodes_are_independent() -> None:
    env = CountDown(max_turns=10, system=None)
    a, b = env.reset(2), env.reset(2)
    assert [m["role"] for m in a.messages] == ["user"]
    env.step(a, "1")
    assert b.game == {"k": 2} and b.turn == 0
    tr = env.step(a, "0")
    assert tr.done and a.turn == 2 and a.reward == 2.0
    assert [p["text"] for m in a.messages if m["role"] == "user" for p in m["content"] if p["type"] == "text"] == [
        "2", "1"
    ]


def test_the_registry_tells_the_two_kinds_apart() -> None:
    assert isinstance(make_env("colors"), Environment)
    assert isinstance(make_env("crafter", {"episode_length": 3}), MultiTurnEnvironment)


def test_the_trainer_builds_both_kinds_and_names_what_is_wrong() -> None:
    from backend.envs import build_env
    from backend.errors import ConfigError

    assert build_env("colors", {}).id == "colors"
    assert isinstance(build_env("crafter", {"episode_length": 3}), MultiTurnEnvironment)
    with pytest.raises(ConfigError, match=r"env\.id: 'nope' is neither a built-in environment .* nor an importable"):
        build_env("nope", {})
    with pytest.raises(ConfigError, match=r"env: cannot build environment 'colors'"):
        build_env("colors", {"no_such_arg": 1})
