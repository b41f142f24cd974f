"""Crafter episodes through the server: episodes/s and turns/s, against the game alone.

In one run, alternating rounds:

* ``server``: ``vlmrl serve`` (hf engine, the tiny Qwen3-VL, one torch thread) runs in a
  subprocess; this process plays ``--seeds`` x ``--group`` Crafter episodes of
  ``--turns`` replies with ``RolloutClient.collect_episodes`` (every turn one chat request
  with the whole conversation, all its frames), as the trainer does each step.
* ``game``: the same episodes with the game alone, on a new environment (so its worlds are
  generated again, once per seed): ``reset`` and one ``step`` per turn with a fixed reply,
  in a thread pool of asyncio's default size, no model (what the environment costs).

Prints the median and spread (min-max) of each over ``--rounds``, the share of a server
round the game alone would take, and the load average before and after (figures taken
under load flatter neither side only if both ran under the same load: they alternate).

    python benchmarks/crafter_episodes.py                      # 2 seeds x 4 episodes x 8 turns, 3 rounds
    python benchmarks/crafter_episodes.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tomli_w  # noqa: E402

from backend.models import resolve_model  # noqa: E402
from backend.net import free_port  # noqa: E402
from backend.rollout import RolloutClient, wait_for_health  # noqa: E402
from backend.sampling import banned_token_ids  # noqa: E402
from environments import make_env  # noqa: E402


def _server(tmp: Path, model: str, port: int) -> subprocess.Popen[bytes]:
    cfg = {
        "model": model, "env": {"id": "crafter"},
        "inference": {"engine": "hf", "gpus": 0, "host": "127.0.0.1", "port": port,
                      "args": {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 16}, "dtype": "float32"}},
        "trainer": {"args": {"torch_threads": 1}},
    }
    path = tmp / "serve.toml"
    path.write_text(tomli_w.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp / "server.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", "serve", str(path)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _game_round(env: Any, seeds: list[int], group: int, turns: int, workers: int) -> float:
    """The same episodes with the game alone (reset + ``turns`` steps each), in a thread pool."""

    def play(seed: int) -> None:
        ep = env.reset(seed)
        for _ in range(turns):
            if ep.done:
                break
            env.step(ep, "move_left")

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(play, [s for s in seeds for _ in range(group)]))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny-qwen3-vl")
    ap.add_argument("--seeds", type=int, default=2, help="episode seeds per round (GRPO groups)")
    ap.add_argument("--group", type=int, default=4, help="episodes per seed")
    ap.add_argument("--turns", type=int, default=8, help="replies per episode")
    ap.add_argument("--size", type=int, default=64, help="frame size in pixels")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()

    load_before = os.getloadavg()
    model = resolve_model(a.model)
    from transformers import AutoProcessor

    banned = banned_token_ids(AutoProcessor.from_pretrained(model).tokenizer)
    env = make_env("crafter", {"episode_length": a.turns, "size": a.size})
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = _server(Path(d), model, port)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, 300, proc=proc)
            server_s: list[float] = []
            game_s: list[float] = []
            turns_played: list[int] = []
            workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio.to_thread's default pool size
            with RolloutClient(url, banned_ids=banned, max_concurrent=a.seeds * a.group) as client:
                client.collect_episodes(env, env.train_seeds(0, 1), 1, max_tokens=a.max_tokens, step=0)  # warm-up
                for r in range(a.rounds):
                    seeds = env.train_seeds(r + 1, a.seeds)
                    t0 = time.perf_counter()
                    eps = client.collect_episodes(env, seeds, a.group, temperature=1.0, max_tokens=a.max_tokens,
                                                  step=r + 1, max_context=4096)
                    server_s.append(time.perf_counter() - t0)
                    turns_played.append(sum(len(e.turns) for e in eps))
                    # a new env: its worlds are generated again, as the server round's were
                    game = make_env("crafter", {"episode_length": a.turns, "size": a.size})
                    game_s.append(_game_round(game, seeds, a.group, a.turns, workers))
                    print(f"round {r + 1}: server {server_s[-1]:.2f}s ({turns_played[-1]} turns), "
                          f"game alone {game_s[-1]:.2f}s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    load_after = os.getloadavg()
    n_eps = a.seeds * a.group

    def fig(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f})"

    eps_s = [n_eps / s for s in server_s]
    turns_s = [t / s for t, s in zip(turns_played, server_s)]
    share = [g / s for g, s in zip(game_s, server_s)]
    print(f"\n{n_eps} episodes x {a.turns} turns, {a.size}px frames, tiny Qwen3-VL, hf engine, {a.rounds} rounds")
    print(f"server:  {fig(eps_s)} episodes/s, {fig(turns_s)} turns/s, {fig(server_s)} s/round")
    print(f"game alone: {fig(game_s)} s/round; share of a server round: {fig(share)}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    if a.json is not None:
        a.json.write_text(json.dumps({"episodes_per_s": eps_s, "turns_per_s": turns_s, "server_s": server_s,
                                      "game_s": game_s, "load_before": load_before, "load_after": load_after,
                                      "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
