"""The crafter environment on the real `crafter` package: seeds, turns, parsing, rewards.

World generation takes 1-2 s a reset, so the tests share a few episodes.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from environments import MultiTurnEnvironment, make_env
from environments.base import Episode
from environments.crafter import ACHIEVEMENTS, ACTIONS, EVAL_SEED_BASE, CrafterEnv, parse_action

_MOVES = {(-1, 0): "move_left", (1, 0): "move_right", (0, -1): "move_up", (0, 1): "move_down"}


def _env(**args: Any) -> CrafterEnv:
    env = make_env("crafter", {"episode_length": 20, **args})
    assert isinstance(env, CrafterEnv) and isinstance(env, MultiTurnEnvironment)
    return env


def _frame(ep: Episode, i: int = 0) -> bytes:
    return np.asarray(ep.images[i]).tobytes()


@pytest.fixture(scope="module")
def env() -> CrafterEnv:
    return _env()


@pytest.fixture(scope="module")
def first_frames(env: CrafterEnv) -> dict[int, bytes]:
    return {s: _frame(env.reset(s)) for s in (11, 12)}


def test_actions_match_the_installed_package() -> None:
    import crafter

    assert tuple(crafter.constants.actions) == ACTIONS and len(ACTIONS) == 17
    assert tuple(crafter.constants.achievements) == ACHIEVEMENTS and len(ACHIEVEMENTS) == 22


def test_importing_environments_does_not_import_crafter() -> None:
    code = "import sys, environments; assert 'crafter' in environments.available(); print('crafter' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_crafter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "crafter", None)  # what an environment without the package sees
    with pytest.raises(ImportError, match=r'pip install -e "\.\[crafter\]"'):
        make_env("crafter")


def test_bad_args() -> None:
    with pytest.raises(ValueError, match="size"):
        make_env("crafter", {"size": 4})
    with pytest.raises(ValueError, match="episode_length"):
        make_env("crafter", {"episode_length": 0})
    with pytest.raises(TypeError):
        make_env("crafter", {"length": 5})


def test_reset_is_deterministic_per_seed(env: CrafterEnv, first_frames: dict[int, bytes]) -> None:
    again = env.reset(11)
    assert _frame(again) == first_frames[11]
    assert first_frames[11] != first_frames[12]
    img = again.images[0]
    assert img.size == (64, 64) and img.mode == "RGB"
    assert again.messages[0]["role"] == "system" and "make_iron_sword" in again.messages[0]["content"][0]["text"]
    # image_only_mode: the observation is the frame alone
    assert [p["type"] for p in again.messages[1]["content"]] == ["image"]


def test_resets_in_threads_match_serial_resets(env: CrafterEnv, first_frames: dict[int, bytes]) -> None:
    with ThreadPoolExecutor(2) as pool:
        eps = list(pool.map(env.reset, [12, 11]))
    assert [_frame(e) for e in eps] == [first_frames[12], first_frames[11]]
    assert eps[0].game is not eps[1].game


def test_episode_runs_to_done_at_episode_length() -> None:
    env = _env(episode_length=4, size=32)
    ep = env.reset(5)
    replies = ["move_left", "Move Right.", "what now?", "noop"]
    for i, reply in enumerate(replies):
        assert not ep.done
        tr = env.step(ep, reply)
        assert tr.done == (i == 3)
        assert tr.score.reward == pytest.approx(sum(tr.score.parts.values()))
    assert ep.done and ep.turn == 4 and tr.observation is None
    assert [t.info["action"] for t in ep.transitions] == ["move_left", "move_right", "noop", "noop"]
    assert [t.info["parsed"] for t in ep.transitions] == ["exact", "exact", "none", "exact"]
    # the unparseable reply played noop and paid the format penalty
    assert ep.transitions[2].score.parts["format"] == -0.1
    assert ep.parts["format"] == pytest.approx(-0.1) and ep.reward == pytest.approx(-0.1)
    # system, first frame, then reply/frame pairs; no frame after the last reply
    roles = [m["role"] for m in ep.messages]
    assert roles == ["system", "user"] + ["assistant", "user"] * 3 + ["assistant"]
    assert ep.messages[-1]["content"] == [{"type": "text", "text": "noop"}]
    assert len(ep.images) == 4 and ep.images[0].size == (32, 32)
    with pytest.raises(RuntimeError, match="over"):
        env.step(ep, "noop")
    summary = env.summary(ep)
    assert summary["turns"] == 4.0 and summary["achievements"] == 0.0
    assert {k for k in summary if k.startswith("achievement/")} == {f"achievement/{a}" for a in ACHIEVEMENTS}


@pytest.mark.parametrize(
    "reply,action,how",
    [
        ("do", "do", "exact"),
        ("  MOVE_LEFT\n", "move_left", "exact"),
        ("Move left.", "move_left", "exact"),
        ("place-table", "place_table", "exact"),
        ("I will make wood pickaxe now", "make_wood_pickaxe", "fuzzy"),
        ("Action: make_stone_sword, then sleep", "make_stone_sword", "fuzzy"),
        ("<think>maybe sleep</think> move up", "move_up", "exact"),
        ("<think>sleep?</think> I go move_down", "move_down", "fuzzy"),
        ("no-op", "noop", "fuzzy"),
        ("Let me do it", "do", "fuzzy"),
        ("doing nothing", None, "none"),
        ("movement", None, "none"),
        ("", None, "none"),
    ],
)
def test_parse_action(reply: str, action: str | None, how: str) -> None:
    assert parse_action(reply) == (action, how)


def _path_to_tree(game: Any) -> tuple[list[str], str] | None:
    """Moves to a free tile next to a tree, then the move that turns to face the tree."""
    world, start = game._world, tuple(int(v) for v in game._player.pos)
    prev: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        pos = queue.popleft()
        for d, move in _MOVES.items():
            nxt = (pos[0] + d[0], pos[1] + d[1])
            material, obj = world[nxt]
            if material == "tree":
                moves = []
                at = pos
                while prev[at] is not None:
                    at, m = prev[at]  # type: ignore[misc]
                    moves.append(m)
                return moves[::-1], move
            if nxt not in prev and obj is None and material in ("grass", "sand", "path") and len(prev) < 400:
                prev[nxt] = (pos, move)
                queue.append(nxt)
    return None


def test_collecting_wood_is_rewarded_once() -> None:
    env = _env(episode_length=60)
    for seed in range(3):
        ep = env.reset(seed)
        plan = _path_to_tree(ep.game)
        if plan is None or len(plan[0]) > 30:
            continue
        moves, face = plan
        for m in [*moves, face]:
            tr = env.step(ep, m)
            assert tr.score.parts["achievements"] == 0
        tr = env.step(ep, "do")
        if "collect_wood" not in tr.info["unlocked"]:
            continue  # a creature stepped in the way; the next seed
        assert tr.score.parts["achievements"] == 1.0 and tr.score.reward == 1.0
        wood = ep.game._player.inventory["wood"]
        again = env.step(ep, "do")  # more wood, no new achievement
        assert ep.game._player.inventory["wood"] in (wood, wood + 1)
        assert again.score.parts["achievements"] == 0 and again.info["unlocked"] == []
        assert ep.parts["achievements"] == 1.0 and ep.info["unlocked"] == ["collect_wood"]
        summary = env.summary(ep)
        assert summary["achievement/collect_wood"] == 1.0 and summary["achievements"] == 1.0
        assert summary["achievement/place_table"] == 0.0
        return
    pytest.fail("no seed in 0..2 let the scripted player collect wood")


def test_text_mode_adds_a_status_and_health_reward_is_a_part() -> None:
    env = _env(image_only_mode=False, health_reward=True)
    ep = env.reset(11)
    content = ep.messages[1]["content"]
    assert [p["type"] for p in content] == ["image", "text"]
    text = content[1]["text"]
    assert "health 9/9" in text and "Inventory: empty" in text and "Facing:" in text
    assert "status" in ep.messages[0]["content"][0]["text"]
    tr = env.step(ep, "noop")
    assert set(tr.score.parts) == {"achievements", "format", "health"}
    assert tr.observation is not None and tr.observation[0]["content"][1]["text"].startswith("Status:")


def test_seeds_are_deterministic_and_the_splits_disjoint(env: CrafterEnv) -> None:
    train = {s for step in range(50) for s in env.train_seeds(step, 16)}
    assert env.train_seeds(3, 16) == _env().train_seeds(3, 16)
    assert env.train_seeds(3, 16) != env.train_seeds(4, 16)
    assert env.train_seeds(3, 16) != _env(seed=1).train_seeds(3, 16)
    assert max(train) < EVAL_SEED_BASE and len(train) > 700
    evals = env.eval_seeds(100)
    assert evals == env.eval_seeds(100) and evals[:10] == env.eval_seeds(10)
    assert not train & set(evals)
    assert set(_env(train_seed_pool=5).train_seeds(0, 50)) <= set(range(5))


def test_later_episodes_of_a_seed_start_from_a_copy_that_plays_as_a_new_world() -> None:
    """The world of a seed is generated once per env; its copies are independent and play
    exactly like a world generated afresh (same frames, rewards, achievements)."""
    moves = ["move_left", "do", "do", "move_up", "do", "move_right", "do", "noop"]
    cached = CrafterEnv(episode_length=len(moves))
    a, b = cached.reset(3), cached.reset(3)  # b starts from a copy of the world a was generated with
    assert a.game is not b.game and a.game._world is not b.game._world
    fresh = CrafterEnv(episode_length=len(moves)).reset(3)  # another env: generated again

    def play(env: CrafterEnv, ep: Episode) -> list[tuple[bytes, float, tuple[str, ...]]]:
        out = []
        for m in moves:
            tr = env.step(ep, m)
            frame = tr.observation[0]["content"][0]["image"].tobytes() if tr.observation else b""
            out.append((frame, tr.score.reward, tuple(tr.info["unlocked"])))
        return out

    first = play(cached, a)
    assert play(cached, b) == first  # a's moves did not touch b's world
    assert play(cached, fresh) == first
    assert cached.reset(3).images[0].tobytes() == a.images[0].tobytes()  # the kept world is still pristine
