"""``crafter``: play the Crafter survival game (Hafner 2021) from its frames, one action a turn.

Each turn the model sees the game frame (a PIL RGB image of ``size`` x ``size``; with
``image_only_mode = false`` also a short text status) and replies with one of the 17
actions. The reply is parsed leniently (case, spaces/hyphens for underscores, the first
action name in the reply); an unparseable reply plays ``noop`` and costs ``format_penalty``.

Reward of a turn = the sum of its parts: ``achievements`` (+1 per achievement unlocked for
the first time this episode), ``format`` (``-format_penalty`` or 0) and, with
``health_reward``, ``health`` (health change / 10, as Crafter's own reward). Turn info:
``action``, ``parsed`` (exact/fuzzy/none), ``unlocked`` (names), ``health``. The episode
summary has ``achievement/<name>`` = 1.0/0.0 for all 22 achievements.

Seeds: eval episodes use the fixed seeds ``EVAL_SEED_BASE + i``; training seeds are drawn
from ``[0, train_seed_pool)`` (below ``EVAL_SEED_BASE``) by a generator keyed by
``(seed, step)``, so the splits are disjoint and deterministic.

The ``crafter`` package is an optional extra, imported only when an env is made.
"""

from __future__ import annotations

import copy
import random
import re
import threading
from typing import Any

import numpy as np
from PIL import Image

from environments.base import Episode, MultiTurnEnvironment, Score, Transition

#: Crafter's actions, in its action-index order (crafter/data.yaml `actions`)
ACTIONS: tuple[str, ...] = (
    "noop", "move_left", "move_right", "move_up", "move_down", "do", "sleep",
    "place_stone", "place_table", "place_furnace", "place_plant",
    "make_wood_pickaxe", "make_stone_pickaxe", "make_iron_pickaxe",
    "make_wood_sword", "make_stone_sword", "make_iron_sword",
)

#: Crafter's 22 achievements (crafter/data.yaml `achievements`)
ACHIEVEMENTS: tuple[str, ...] = (
    "collect_coal", "collect_diamond", "collect_drink", "collect_iron", "collect_sapling",
    "collect_stone", "collect_wood", "defeat_skeleton", "defeat_zombie", "eat_cow", "eat_plant",
    "make_iron_pickaxe", "make_iron_sword", "make_stone_pickaxe", "make_stone_sword",
    "make_wood_pickaxe", "make_wood_sword", "place_furnace", "place_plant", "place_stone",
    "place_table", "wake_up",
)

EVAL_SEED_BASE = 1 << 30
#: freshly reset games kept for the next episodes of the same seed (a step's seeds, and the eval seeds)
WORLD_CACHE = 64

_ACTION_HELP = {
    "noop": "do nothing",
    "move_left": "move (or turn) left",
    "move_right": "move (or turn) right",
    "move_up": "move (or turn) up",
    "move_down": "move (or turn) down",
    "do": "act on the facing tile: collect a material, drink water, eat, attack",
    "sleep": "sleep (restores energy)",
    "place_stone": "place stone (needs 1 stone)",
    "place_table": "place a table (needs wood)",
    "place_furnace": "place a furnace (needs stone, near a table)",
    "place_plant": "plant a sapling on grass",
    "make_wood_pickaxe": "near a table, needs wood",
    "make_stone_pickaxe": "near a table, needs wood and stone",
    "make_iron_pickaxe": "near a table and furnace, needs wood, coal, iron",
    "make_wood_sword": "near a table, needs wood",
    "make_stone_sword": "near a table, needs wood and stone",
    "make_iron_sword": "near a table and furnace, needs wood, coal, iron",
}

# Longest names first so "make_wood_pickaxe" wins over a shorter name at the same place.
_ACTION_RE = re.compile(
    r"(?<![a-z0-9])(" + "|".join(sorted([*ACTIONS, "no_op"], key=len, reverse=True)) + r")(?![a-z0-9])"
)
_THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def parse_action(reply: str) -> tuple[str | None, str]:
    """The action named in ``reply`` and how it was found: ``exact``, ``fuzzy`` or ``none``.

    Case is ignored and spaces/hyphens count as underscores; a reasoning block
    (``<think>...</think>``) is skipped so an action mentioned while thinking is not taken.
    """
    text = _THINK_RE.sub(" ", reply.lower())
    norm = re.sub(r"[\s\-]+", "_", text.strip())
    if norm.strip("_.!`'\"") in ACTIONS:
        return norm.strip("_.!`'\""), "exact"
    m = _ACTION_RE.search(re.sub(r"[\s\-]+", "_", text))
    if not m:
        return None, "none"
    name = "noop" if m.group(1) == "no_op" else m.group(1)
    return name, "fuzzy"


def _import_crafter() -> Any:
    try:
        import crafter
    except ImportError as e:
        raise ImportError(
            'the crafter environment needs the `crafter` package: pip install -e ".[crafter]"'
        ) from e
    return crafter


class CrafterEnv(MultiTurnEnvironment):
    """Crafter, one action per turn, rewarded by newly unlocked achievements."""

    id = "crafter"

    def __init__(
        self,
        size: int = 64,
        episode_length: int = 50,
        image_only_mode: bool = True,
        health_reward: bool = False,
        format_penalty: float = 0.1,
        seed: int = 0,
        train_seed_pool: int = EVAL_SEED_BASE,
        system_prompt: str | None = None,
    ) -> None:
        if not 16 <= size <= 1024:
            raise ValueError(f"size must be between 16 and 1024, got {size}")
        if episode_length < 1:
            raise ValueError(f"episode_length must be >= 1, got {episode_length}")
        if not 1 <= train_seed_pool <= EVAL_SEED_BASE:
            raise ValueError(f"train_seed_pool must be between 1 and {EVAL_SEED_BASE}, got {train_seed_pool}")
        if format_penalty < 0:
            raise ValueError(f"format_penalty must be >= 0, got {format_penalty}")
        self._crafter = _import_crafter()
        # The list in the prompt must match the package's action indices.
        if tuple(self._crafter.constants.actions) != ACTIONS:
            raise RuntimeError(f"unexpected crafter actions: {self._crafter.constants.actions}")
        self.size = size
        self.max_turns = episode_length
        self.image_only_mode = image_only_mode
        self.health_reward = health_reward
        self.format_penalty = format_penalty
        self.seed = seed
        self.train_seed_pool = train_seed_pool
        self._system_prompt = system_prompt
        # freshly reset games of recent seeds (see new_game), oldest first
        self._worlds: dict[int, tuple[Any, np.ndarray]] = {}
        self._seed_locks: dict[int, threading.Lock] = {}
        self._cache_lock = threading.Lock()

    # --- seeds ----------------------------------------------------------------------------

    def train_seeds(self, step: int, n: int) -> list[int]:
        rng = random.Random(f"crafter/{self.seed}/{step}")
        return [rng.randrange(self.train_seed_pool) for _ in range(n)]

    def eval_seeds(self, n: int) -> list[int]:
        return [EVAL_SEED_BASE + i for i in range(n)]

    # --- prompts --------------------------------------------------------------------------

    def system_prompt(self) -> str:
        if self._system_prompt is not None:
            return self._system_prompt
        actions = "\n".join(f"- {a}: {_ACTION_HELP[a]}" for a in ACTIONS)
        seen = "the game frame" if self.image_only_mode else "the game frame and a short status"
        return (
            "You play Crafter, a 2D survival game seen from above. You are the player in the "
            "centre of the map view; your inventory is shown below it. Unlock achievements: "
            "collect wood, place a table, make tools, collect stone, coal and iron, drink water, "
            "eat, sleep, defeat zombies. Keep health, food, drink and energy up.\n"
            f"Each turn you see {seen}. Reply with exactly one action name from this list:\n"
            f"{actions}"
        )

    def _observation(self, game: Any, frame: np.ndarray) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image", "image": Image.fromarray(frame)}]
        if not self.image_only_mode:
            content.append({"type": "text", "text": status_text(game)})
        return [{"role": "user", "content": content}]

    # --- play -----------------------------------------------------------------------------

    def new_game(self, seed: int) -> tuple[Any, list[dict[str, Any]]]:
        """A fresh game of ``seed``. World generation takes ~1 s of GIL-bound Python, and a
        GRPO group plays one seed several times, so the freshly reset game of each recent seed
        is kept and later episodes of that seed start from a deep copy (~2 ms; the copy
        carries the world's random state, so it plays exactly as a newly generated one)."""
        with self._cache_lock:
            seed_lock = self._seed_locks.setdefault(seed, threading.Lock())
        with seed_lock:  # the first episode of a seed generates it; the others wait, then copy
            kept = self._worlds.get(seed)
            if kept is None:
                game = self._crafter.Env(
                    area=(64, 64), view=(9, 9), size=(self.size, self.size), reward=True,
                    length=self.max_turns, seed=seed,
                )
                frame = game.reset()
                with self._cache_lock:
                    self._worlds[seed] = (copy.deepcopy(game), frame.copy())
                    while len(self._worlds) > WORLD_CACHE:
                        old = next(iter(self._worlds))
                        del self._worlds[old]
                        self._seed_locks.pop(old, None)
            else:
                game, frame = copy.deepcopy(kept[0]), kept[1].copy()
        return game, self._observation(game, frame)

    def reset(self, seed: int) -> Episode:
        episode = super().reset(seed)
        episode.info["unlocked"] = []
        episode.info["health"] = int(episode.game._player.health)
        return episode

    def play(self, episode: Episode, reply: str) -> Transition:
        action, parsed = parse_action(reply)
        taken = action or "noop"
        health_before = episode.info["health"]
        frame, _, done, info = episode.game.step(ACTIONS.index(taken))
        unlocked = [
            a for a in ACHIEVEMENTS if info["achievements"].get(a, 0) > 0 and a not in episode.info["unlocked"]
        ]
        episode.info["unlocked"].extend(unlocked)
        health = int(info["inventory"]["health"])
        episode.info["health"] = health
        parts = {
            "achievements": float(len(unlocked)),
            "format": -self.format_penalty if action is None else 0.0,
        }
        if self.health_reward:
            parts["health"] = (health - health_before) / 10
        return Transition(
            observation=None if done else self._observation(episode.game, frame),
            score=Score(reward=sum(parts.values()), parts=parts),
            done=bool(done),
            info={"action": taken, "parsed": parsed, "unlocked": unlocked, "health": health},
        )

    def summary(self, episode: Episode) -> dict[str, float]:
        out = super().summary(episode)
        unlocked = set(episode.info.get("unlocked", ()))
        out["achievements"] = float(len(unlocked))
        out.update({f"achievement/{a}": float(a in unlocked) for a in ACHIEVEMENTS})
        return out


def status_text(game: Any) -> str:
    """Vitals, inventory, the facing tile and the nearest of each thing in view, as text."""
    # Crafter exposes no public state API; the world and player are read directly (cheap).
    player, world = game._player, game._world
    inv = player.inventory
    vitals = ", ".join(f"{k} {inv[k]}/9" for k in ("health", "food", "drink", "energy"))
    items = ", ".join(f"{k} {v}" for k, v in inv.items() if k not in ("health", "food", "drink", "energy") and v)
    px, py = int(player.pos[0]), int(player.pos[1])
    material, obj = world[(px + player.facing[0], py + player.facing[1])]
    facing = type(obj).__name__.lower() if obj is not None else (material or "nothing")
    # The local view is 9 wide and 7 tall (two rows show the inventory), centred on the player.
    nearest: dict[str, tuple[int, int]] = {}
    for dy in range(-3, 4):
        for dx in range(-4, 5):
            if dx == dy == 0:
                continue
            m, o = world[(px + dx, py + dy)]
            for name in (m, type(o).__name__.lower() if o is not None else None):
                if name and name not in ("grass", "path", "sand") and (
                    name not in nearest or abs(dx) + abs(dy) < sum(map(abs, nearest[name]))
                ):
                    nearest[name] = (dx, dy)
    near = ", ".join(f"{k} {_offset(*v)}" for k, v in sorted(nearest.items(), key=lambda kv: sum(map(abs, kv[1]))))
    return (
        f"Status: {vitals}. Inventory: {items or 'empty'}. Facing: {facing}. "
        f"Nearby: {near or 'nothing of note'}."
    )


def _offset(dx: int, dy: int) -> str:
    parts = []
    if dx:
        parts.append(f"{abs(dx)} {'right' if dx > 0 else 'left'}")
    if dy:
        parts.append(f"{abs(dy)} {'down' if dy > 0 else 'up'}")
    return "(" + ", ".join(parts) + ")"


def make_crafter(**kwargs: Any) -> CrafterEnv:
    """The ``crafter`` environment with ``[env.args]`` (registered by :mod:`environments`)."""
    return CrafterEnv(**kwargs)
