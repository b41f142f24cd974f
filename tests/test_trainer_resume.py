"""``vlmrl train`` against a real ``vlmrl serve``: killed after a checkpoint, then ``--resume``."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from tests.serverproc import ServerProc, free_port
from tests.trainproc import TOKEN, colors_tiny_config, kill_group, start_trainer

from backend.config import load_config
from backend.envs import build_env
from backend.rundir import RunDirectory, read_jsonl


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path)]


def test_resume_after_killing_the_trainer_continues_from_the_last_checkpoint(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    port = free_port()
    cfg = colors_tiny_config(tmp_path / "cfg.toml", port=port, output_dir=tmp_path / "runs", run_name="resume",
                             max_steps=8, save_every=3, batch_size=8, micro_batch_size=8)
    rd = RunDirectory(tmp_path / "runs" / "resume")
    server = ServerProc(cfg, port, tmp_path / "server.log", TOKEN)
    log = tmp_path / "trainer.log"
    try:
        server.wait_healthy()
        first = start_trainer(cfg, log)
        try:
            deadline = time.monotonic() + 300
            # kill once a step after the first checkpoint is logged (so resume must drop it)
            while not (rd.checkpoint(3) / "COMPLETE").exists() or max(_steps(rd.metrics), default=0) < 4:
                assert first.poll() is None, f"trainer exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no checkpoint in time:\n{log.read_text()[-3000:]}"
                time.sleep(0.02)
        finally:
            kill_group(first)
        ckpt = rd.latest_checkpoint()
        assert ckpt is not None
        resumed_at = int(ckpt.name)
        assert resumed_at in (3, 6)
        killed_steps = _steps(rd.metrics)
        assert max(killed_steps) > resumed_at  # lines past the checkpoint exist before the resume

        second = start_trainer(cfg, log, "--resume")
        try:
            code = second.wait(timeout=300)
        finally:
            kill_group(second)
        out = log.read_text()
        assert code == 0, out[-3000:]
        assert f"resumed from {ckpt} at step {resumed_at}" in out
        assert f"step {resumed_at + 1}/8 " in out.split("resumed from", 1)[1]
        assert f"step {resumed_at}/8 " not in out.split("resumed from", 1)[1]
        # one metrics line per step, no duplicates; rollouts likewise (8 per step)
        assert _steps(rd.metrics) == list(range(1, 9))
        per_step = Counter(_steps(rd.rollouts))
        assert per_step == {s: 8 for s in range(1, 9)}, per_step
        # the example order is restored: every step trained on the environment's examples for
        # that step (as an uninterrupted run would), none replayed or skipped across the resume
        conf = load_config(cfg)
        env = build_env(conf.env.id, conf.env.args)
        want = {s: sorted((e.id, e.answer) for e in env.train_examples(s, conf.trainer.args.prompts_per_step)
                          for _ in range(conf.trainer.args.rollouts_per_step)) for s in range(1, 9)}
        got: dict[int, list[tuple[str, object]]] = {}
        for r in read_jsonl(rd.rollouts):
            got.setdefault(r["step"], []).append((r["example_id"], r["answer"]))
        assert {s: sorted(v) for s, v in got.items()} == want
        for step in (3, 6, 8):
            assert (rd.checkpoint(step) / "COMPLETE").exists()
        state = json.loads((rd.checkpoint(8) / "trainer_state.json").read_text())
        assert state["step"] == 8
        assert "weights updated to version 8" in server.log()
    finally:
        server.stop()
