"""The learning proof: ``configs/colors-tiny.toml`` learns the colour task on CPU.

Through the real processes: ``vlmrl serve`` (hf engine) and ``vlmrl train`` (rollouts over
HTTP, GRPO, weight sync over gloo after every step). Mean reward starts near chance and
the mean of the last 10 steps reaches 0.9, in under 10 minutes on a 2-core machine; the
final checkpoint also scores >= 0.9 greedily on held-out prompts.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from serverproc import ServerProc, free_port
from trainproc import TOKEN, colors_tiny_config, kill_group, start_trainer

from backend.config import load_config
from backend.rundir import RunDirectory, read_jsonl

pytestmark = pytest.mark.slow

BUDGET_S = 600.0


# Measured through the real server with the shipped config (8 prompts x 8 completions):
# 7 of 8 runs reached the target; the eighth reached 0.98 and collapsed late. Server
# sampling is not seeded, so runs differ. The proof therefore allows one more seed before it
# fails, and prints every attempt so a second attempt is visible in the CI log.
SEEDS = (0, 1)


def _attempt(tmp_path: Path, seed: int) -> tuple[list[str], str]:
    """Run the shipped config once; return (failed criteria, summary line)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg_path = colors_tiny_config(tmp_path / "colors-tiny.toml", port=port, output_dir=tmp_path / "runs",
                                  run_name="colors-tiny", seed=seed)
    cfg = load_config(cfg_path)
    rd = RunDirectory(cfg.run_dir())
    log = tmp_path / "trainer.log"
    t0 = time.monotonic()
    server = ServerProc(cfg_path, port, tmp_path / "server.log", TOKEN)
    try:
        server.wait_healthy()
        trainer = start_trainer(cfg_path, log)
        try:
            code = trainer.wait(timeout=BUDGET_S)
        finally:
            kill_group(trainer)
        wall = time.monotonic() - t0
        out = log.read_text()
        assert code == 0, out[-4000:]
        server_log = server.log()
    finally:
        server.stop()

    metrics = list(read_jsonl(rd.metrics))
    rewards = [m["reward_mean"] for m in metrics]
    steps = cfg.trainer.args.max_steps
    # Plumbing must hold on every attempt: every step logged, every step synced.
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(m["sync_s"] > 0 for m in metrics)
    assert f"weights updated to version {steps}" in server_log
    assert wall < BUDGET_S, f"took {wall:.0f}s"
    first10, last10 = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])

    # held-out, greedy, from the final checkpoint
    from backend.evaluate import greedy_accuracy
    from backend.models import load_model_and_processor
    from environments import make_env

    ckpt = rd.latest_checkpoint()
    assert ckpt == rd.checkpoint(steps)
    model, processor = load_model_and_processor(str(ckpt))
    res = greedy_accuracy(model, processor, make_env(cfg.env.id, cfg.env.args), 64, max_tokens=4)
    summary = (f"colors-tiny seed {seed}: {steps} steps in {wall:.0f}s; reward first 10 {first10:.3f}, "
               f"last 10 {last10:.3f}; held-out greedy accuracy {res['accuracy']:.3f}; "
               f"median step {statistics.median(m['step_s'] for m in metrics):.2f}s")
    failed = []
    if first10 > 0.35:
        failed.append(f"starts above chance: {first10:.3f}")
    if last10 < 0.9:
        failed.append(f"did not learn: last 10 steps mean reward {last10:.3f}")
    if res["accuracy"] < 0.9:
        failed.append(f"held-out greedy accuracy {res['accuracy']:.3f}")
    return failed, summary


def test_colors_tiny_learns_from_rewards_through_server_and_weight_sync(tmp_path: Path, tiny_model_dir: Path) -> None:
    attempts = []
    for seed in SEEDS:
        failed, summary = _attempt(tmp_path / f"seed{seed}", seed)
        print("\n" + summary + ("" if not failed else "  FAILED: " + "; ".join(failed)))
        attempts.append((seed, failed))
        if not failed:
            return
    pytest.fail("no seed learned: " + " | ".join(f"seed {s}: {'; '.join(f)}" for s, f in attempts))
