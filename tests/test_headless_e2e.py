"""The real thing end to end: ``vlmrl run configs/colors-tiny.toml`` with the real server and
trainer (tiny Qwen3-VL on CPU, real weight sync), leaving a complete run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from backend.config import read_toml
from backend.net import free_port
from tests.test_security import files_holding, run_token

ROOT = Path(__file__).resolve().parents[1]


def _processes_of(run_dir: Path) -> list[int]:
    """Live processes whose environment names this run directory (children of the run)."""
    needle = f"VLMRL_RUN_DIR={run_dir}".encode()
    out = []
    for p in psutil.process_iter():
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0") and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return out


@pytest.mark.timeout(900)
def test_vlmrl_run_colors_tiny_completes_and_leaves_a_full_run_directory(tmp_path: Path, tiny_cache_dir: Path) -> None:
    port = free_port()
    run_dir = tmp_path / "runs" / "e2e"
    with open(tmp_path / "run.out", "w") as out_f, open(tmp_path / "run.err", "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlmrl_tui.cli", "run", "configs/colors-tiny.toml", "trainer.args.max_steps=3",
             f"inference.port={port}", "--output-dir", str(tmp_path / "runs"), "--name", "e2e"],
            cwd=ROOT, stdout=out_f, stderr=err_f, text=True,
        )
    try:
        token = run_token(run_dir, lambda: proc.poll() is None)  # lives only in the children's environment
        proc.wait(timeout=840)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (tmp_path / "run.out").read_text(), (tmp_path / "run.err").read_text()
    assert proc.returncode == 0, out[-4000:] + err[-4000:]
    for step in (1, 2, 3):
        assert f"step {step}/3 reward=" in out
    assert "server: healthy" in out and "trainer: exited - exit code 0: training complete" in out
    assert "completed: 3/3 steps" in out

    # the resolved config both children ran
    resolved = read_toml(run_dir / "config.toml")
    assert resolved["trainer"]["args"]["max_steps"] == 3 and resolved["inference"]["port"] == port
    assert isinstance(resolved["trainer"]["args"]["sync_port"], int)

    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["exit_code"] == 0
    procs = info["processes"]
    assert procs["prepare"]["status"] == "exited"
    assert procs["server"]["status"] == "stopped" and procs["trainer"]["status"] == "exited"
    assert procs["trainer"]["exit_code"] == 0
    assert info["ports"] == {"server": port, "sync": resolved["trainer"]["args"]["sync_port"]}

    for name in ("prepare", "server", "trainer"):
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all("reward_mean" in m and "loss" in m for m in metrics)
    rollouts = (run_dir / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 3 * resolved["trainer"]["args"]["batch_size"]
    assert list((run_dir / "rollouts" / "1").glob("*.png"))
    assert (run_dir / "checkpoints" / "3" / "COMPLETE").exists()

    # nothing of the run is left
    assert not psutil.pid_exists(procs["server"]["pid"]) or psutil.Process(procs["server"]["pid"]).status() == "zombie"
    assert _processes_of(run_dir) == []

    # and attach shows the same finished run
    a = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "attach", str(run_dir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert a.returncode == 0 and "step 3/3" in a.stdout and "completed: 3/3 steps" in a.stdout

    # the token guarded the weight syncs of the whole run, and is written nowhere: no log, run.json,
    # metrics, rollouts, config copy or checkpoint holds it, nor what `vlmrl run` / `attach` printed
    assert len(token) >= 16
    assert files_holding(run_dir, token) == []
    assert token not in out + err + a.stdout + a.stderr


@pytest.mark.timeout(900)
def test_server_killed_mid_run_is_restarted_and_gets_the_trainers_weights_back(tmp_path: Path,
                                                                              tiny_cache_dir: Path) -> None:
    """kill -9 the server mid-run: the supervisor restarts it (start weights), the trainer
    re-joins, pushes its current weights and never trains on rollouts of the start weights."""
    port = free_port()
    steps = 30
    run_dir = tmp_path / "runs" / "restart"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmrl_tui.cli", "run", "configs/colors-tiny.toml", f"trainer.args.max_steps={steps}",
         f"inference.port={port}", "inference.restart_backoff_s=0", "--output-dir", str(tmp_path / "runs"),
         "--name", "restart"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 600
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before step 5"
            time.sleep(0.2)
        killed_at = len(metrics.read_text().splitlines())
        server_pid = json.loads((run_dir / "run.json").read_text())["processes"]["server"]["pid"]
        os.kill(server_pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=700)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert killed_at < steps, "the run finished before the server was killed"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["processes"]["server"]["restarts"] == 1
    trainer_log = (run_dir / "logs" / "trainer.log").read_text()
    assert "re-joining the server" in trainer_log and "server holds the weights of step" in trainer_log
    assert f"weights updated to version {steps}" in (run_dir / "logs" / "server.log").read_text()
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == list(range(1, steps + 1))
    # one step off-policy at most: no rollout came from the restarted server's start weights
    for ln in (run_dir / "rollouts.jsonl").read_text().splitlines():
        r = json.loads(ln)
        assert r["weight_version"] >= r["step"] - 2, r
