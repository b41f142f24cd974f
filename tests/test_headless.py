"""Headless mode: dry run, Ctrl-C handling, failure output, attach, import hygiene.

The supervised runs here use the stand-in server/trainer (tests/fixtures/standins.py runs
a real plan through ``vlmrl_tui.headless.run_plan`` in a subprocess, so signals reach a
real process); the real tiny run end to end is in test_headless_e2e.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

from standins import alive, all_pids, make_plan, reports, wait_until  # noqa: E402

from vlmrl_tui.headless import HeadlessView, attach_headless, run_plan, step_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def _cli(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _start_standins(root: Path, grace: float, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(FIXTURES / "standins.py"), str(root), str(grace), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(root: Path) -> int:
    p = root / "runs" / "run" / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


SLOW_TRAINER = ("--trainer-arg", "--steps", "--trainer-arg", "400", "--trainer-arg", "--step-time",
                "--trainer-arg", "0.05")


def test_dry_run_prints_commands_and_environment_and_masks_the_token(tmp_path: Path) -> None:
    r = _cli("run", "configs/colors-tiny.toml", "--dry-run", "--output-dir", str(tmp_path / "runs"),
             "--name", "dry")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "vlmrl_tui.cli serve" in out and "vlmrl_tui.cli train" in out
    assert str(tmp_path / "runs" / "dry" / "config.toml") in out
    assert "NCCL_P2P_DISABLE=1" in out and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out and "weight-sync port" in out
    token_line = next(ln for ln in out.splitlines() if "VLMRL_RUN_TOKEN=" in ln)
    assert token_line.strip() == "VLMRL_RUN_TOKEN=******** (fresh per run)"
    assert "health   http://127.0.0.1:8000/health" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_reports_shell_variables_that_contradict_the_config(tmp_path: Path) -> None:
    env = dict(os.environ, NCCL_P2P_DISABLE="0")
    r = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "run", "configs/colors-tiny.toml", "--dry-run",
                        "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0
    assert "NCCL_P2P_DISABLE=0 in your shell contradicts the config (NCCL_P2P_DISABLE=1)" in r.stdout


def test_sigint_stops_both_children_within_grace_and_exits_130(tmp_path: Path) -> None:
    grace = 2.0
    p = _start_standins(tmp_path, grace, "--server-arg", "--ignore-sigterm", *SLOW_TRAINER)
    try:
        wait_until(lambda: _metrics(tmp_path) >= 2, timeout=30)
        pids = all_pids(tmp_path)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        wait_until(lambda: not alive(pids), timeout=grace + 5)
        took = time.monotonic() - t0
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    print(f"SIGINT: every process gone {took:.2f} s later (grace {grace:g} s, the server ignored SIGTERM)")
    assert took <= grace + 1.0, took
    assert p.returncode == 130, out
    assert "press Ctrl-C again to kill" in out
    info = json.loads((tmp_path / "runs" / "run" / "run.json").read_text())
    assert info["status"] == "stopped" and info["exit_code"] == 130
    assert info["processes"]["server"]["status"] == "killed"  # it ignored SIGTERM
    assert info["processes"]["trainer"]["status"] == "stopped"
    assert alive(all_pids(tmp_path)) == []


def test_second_sigint_kills_without_waiting_for_the_grace_period(tmp_path: Path) -> None:
    p = _start_standins(tmp_path, 60.0, "--server-arg", "--ignore-sigterm",
                        "--trainer-arg", "--ignore-sigterm", *SLOW_TRAINER)
    try:
        wait_until(lambda: _metrics(tmp_path) >= 1, timeout=30)
        pids = all_pids(tmp_path)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert alive(pids)  # both ignore SIGTERM; the grace period is a minute
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=10)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and took < 5, (took, out)
    assert "killing both processes now" in out
    assert alive(pids) == []


def test_sigterm_stops_gracefully_and_exits_143(tmp_path: Path) -> None:
    p = _start_standins(tmp_path, 2.0, *SLOW_TRAINER)
    try:
        wait_until(lambda: _metrics(tmp_path) >= 1, timeout=30)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, out
    assert alive(all_pids(tmp_path)) == []


def test_failed_process_prints_its_log_tail_and_exits_1(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, trainer_args=["--steps", "5", "--crash-at", "3"])
    out = io.StringIO()
    code = run_plan(plan, out=out, tty=False)
    text = out.getvalue()
    assert code == 1
    assert "trainer: failed - exit code 3" in text
    assert "--- last" in text and "trainer.log" in text
    assert "fake crash at step 3" in text  # the crash's own output, from the log
    assert "server: stopped" in text
    assert text.rstrip().splitlines()[-1].startswith("failed (trainer exit code 3)")
    assert alive(all_pids(tmp_path)) == []


def test_plain_output_without_a_terminal(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    out = io.StringIO()
    assert run_plan(plan, out=out, tty=False) == 0
    text = out.getvalue()
    assert "\r" not in text and "\x1b[" not in text
    assert "step 1/3 reward=0.30 loss=1.000 ir=1.00 ent=1.90 kl=0.010 0.05s/it" in text
    assert "server: healthy" in text and "trainer: exited - exit code 0: training complete" in text
    assert text.rstrip().splitlines()[-1].startswith("completed: 3/3 steps")


def test_a_slow_server_start_is_reported_while_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmrl_tui.headless as headless

    monkeypatch.setattr(headless, "STARTING_NOTE_S", 0.5)
    plan = make_plan(tmp_path, server_args=["--ready-after", "2.0"])
    out = io.StringIO()
    assert run_plan(plan, out=out, tty=False) == 0
    notes = [ln for ln in out.getvalue().splitlines() if "server: still starting after" in ln]
    assert notes and "last log line: GET /health" in notes[0]  # colour codes stripped without a terminal


def test_step_line_format() -> None:
    rec = {"step": 12, "reward_mean": 0.62, "loss": 0.045, "ir": 1.02, "entropy": 2.34, "kl": 0.01, "step_s": 4.1}
    assert step_line(rec, 100) == "step 12/100 reward=0.62 loss=0.045 ir=1.02 ent=2.34 kl=0.010 4.10s/it"
    assert step_line({"step": 1, "loss": float("nan")}, 0) == "step 1 loss=nan"


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    out = io.StringIO()
    with HeadlessView(10, out=out, tty=True) as view:
        view.metrics([{"step": s, "reward_mean": 0.1 * s, "loss": 1.0} for s in (1, 2, 3)])
    text = out.getvalue()
    assert "step 3/10 reward=0.30" in text and "3/10" in text


def test_attach_prints_the_same_view_of_a_finished_run(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, trainer_args=["--crash-at", "2"])
    assert run_plan(plan, out=io.StringIO(), tty=False) == 1
    out = io.StringIO()
    code = attach_headless(plan.run_dir, out=out, tty=False)
    text = out.getvalue()
    assert code == 1
    assert "step 1/3 reward=0.30" in text
    assert "trainer: failed - exit code 2" not in text and "trainer: failed - exit code 3" in text
    assert "fake crash at step 2" in text  # the failed process's log tail
    r = _cli("attach", str(plan.run_dir))
    assert r.returncode == 1 and "trainer: failed" in r.stdout


def test_attach_follows_a_live_run_to_its_end(tmp_path: Path) -> None:
    p = _start_standins(tmp_path, 2.0, "--trainer-arg", "--steps", "--trainer-arg", "3",
                        "--trainer-arg", "--step-time", "--trainer-arg", "0.5")
    try:
        run_dir = tmp_path / "runs" / "run"
        wait_until(lambda: (run_dir / "run.json").exists(), timeout=30)
        r = _cli("attach", str(run_dir), timeout=60)
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "attached to run" in r.stdout
    for step in (1, 2, 3):
        assert f"step {step}/3" in r.stdout
    assert "completed: 3/3 steps" in r.stdout
    assert len(reports(tmp_path / "trainer.jsonl")) == 1


def test_attach_to_a_run_whose_supervisor_died_records_the_end_in_run_json(tmp_path: Path) -> None:
    """kill -9 of the supervisor (as when its SLURM job or node is lost): attach says so, exits
    1, and run.json no longer claims the run is running."""
    from backend.records import RunInfo

    p = _start_standins(tmp_path, 2.0, *SLOW_TRAINER)
    run_dir = tmp_path / "runs" / "run"
    try:
        wait_until(lambda: _metrics(tmp_path) >= 2, timeout=60)
        p.kill()
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    before = RunInfo.read(run_dir / "run.json")
    assert before is not None and before.status == "running"
    r = _cli("attach", str(run_dir), timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"the supervisor (pid {before.supervisor_pid}) is gone and the run did not finish" in r.stdout
    after = RunInfo.read(run_dir / "run.json")
    assert after is not None and after.status == "failed" and after.exit_code == 1 and after.ended_at
    assert after.reason is not None and "is gone" in after.reason and after.history[-1].status == "failed"
    again = _cli("attach", str(run_dir), timeout=60)  # the next reader finds the account
    assert again.returncode == 1 and "run: failed - the supervisor" in again.stdout


def test_attach_to_something_that_is_not_a_run_dir_exits_2(tmp_path: Path) -> None:
    r = _cli("attach", str(tmp_path))
    assert r.returncode == 2 and "not a run directory" in r.stderr


HYGIENE = """
import sys
import vlmrl_tui.cli, vlmrl_tui.headless, vlmrl_tui.supervisor, vlmrl_tui.plan, vlmrl_tui.control
import vlmrl_tui.doctor, vlmrl_tui.gpu
heavy = sorted(m for m in ("textual", "torch", "transformers") if m in sys.modules)
print(",".join(heavy))
"""


def test_headless_modules_never_import_textual_or_torch() -> None:
    r = subprocess.run([sys.executable, "-c", HYGIENE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_attach_to_a_run_json_of_another_version_says_so_in_one_line(tmp_path: Path) -> None:
    from backend.records import RunInfo

    run_dir = tmp_path / "old"
    run_dir.mkdir()
    data = RunInfo(name="old", status="completed").to_json()
    data["version"] = 1
    (run_dir / "run.json").write_text(json.dumps(data))
    r = _cli("attach", str(run_dir))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and "schema version 1, written by an older vlmrl" in r.stderr
    r = _cli("run", "configs/colors-tiny.toml", "--output-dir", str(tmp_path), "--name", "old", "--resume")
    assert r.returncode == 2 and "written by an older vlmrl" in r.stderr and "Traceback" not in r.stderr
