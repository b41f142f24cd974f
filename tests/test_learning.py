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


def test_colors_tiny_learns_from_rewards_through_server_and_weight_sync(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    cfg_path = colors_tiny_config(tmp_path / "colors-tiny.toml", port=port, output_dir=tmp_path / "runs",
                                  run_name="colors-tiny")
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
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    first10, last10 = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
    print(f"\ncolors-tiny: {steps} steps in {wall:.0f}s; reward first 10 {first10:.3f}, last 10 {last10:.3f}; "
          f"median step {statistics.median(m['step_s'] for m in metrics):.2f}s")
    assert first10 <= 0.35, f"starts above chance: {first10:.3f}"
    assert last10 >= 0.9, f"did not learn: last 10 steps mean reward {last10:.3f}"
    assert wall < BUDGET_S, f"took {wall:.0f}s"
    # every step went through the server with freshly synced weights
    assert all(m["sync_s"] > 0 for m in metrics)
    assert f"weights updated to version {steps}" in server_log

    # held-out, greedy, from the final checkpoint
    from backend.evaluate import greedy_accuracy
    from backend.models import load_model_and_processor
    from environments import make_env

    ckpt = rd.latest_checkpoint()
    assert ckpt == rd.checkpoint(steps)
    model, processor = load_model_and_processor(str(ckpt))
    res = greedy_accuracy(model, processor, make_env(cfg.env.id, cfg.env.args), 64, max_tokens=4)
    print(f"held-out greedy accuracy {res['accuracy']:.3f}")
    assert res["accuracy"] >= 0.9
