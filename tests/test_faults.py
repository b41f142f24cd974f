"""Faults the reliability table (docs/reliability.md) promises to handle, one test each.

Stand-in children (tests/fixtures) where the fault is the supervisor's business; the real
``vlmrl run`` on the tiny model where it is the whole run's (the CLI's refusals, a disk
that fills up mid-run). Every test ends with no process of the run left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from standins import make_plan, reports  # noqa: E402
from tests.test_headless_e2e import _processes_of as _run_pids
from tests.test_supervisor import assert_nothing_left, metrics_lines, supervise, until  # noqa: E402

from backend.net import free_port  # noqa: E402
from backend.rundir import RunDirectory, read_json, read_jsonl  # noqa: E402
from vlmrl_tui.control import send_command, socket_path  # noqa: E402
from vlmrl_tui.runlock import RunDirBusy  # noqa: E402
from vlmrl_tui.supervisor import CONTROL_CHECK_S, Supervisor, exit_account  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


def test_exit_137_is_accounted_as_a_sigkill_the_oom_killer_sends(tmp_path: Path) -> None:
    # a wrapper (torchrun, srun, a shell) exits 128+9 when the kernel's OOM killer took its child
    plan = make_plan(tmp_path, trainer_args=["--steps", "5", "--crash-at", "2", "--exit-code", "137"],
                     trainer_restarts=1)
    code, events, info = supervise(plan)
    assert code == 1
    trainer = info["processes"]["trainer"]
    assert trainer["status"] == "failed" and trainer["exit_code"] == 137 and trainer["restarts"] == 1
    assert "exit code 137 (128 + SIGKILL" in trainer["reason"] and "OOM killer" in trainer["reason"]
    assert [s["resume"] for s in reports(tmp_path / "trainer.jsonl")] == [False, True]  # the policy: resume
    assert "OOM killer" in info["reason"] and info["failed_process"] == "trainer"
    assert any(e.kind == "failure" and "128 + SIGKILL" in e.message for e in events)
    assert_nothing_left(tmp_path)


def test_exit_accounts() -> None:
    assert exit_account(3, None) == "exit code 3"
    assert exit_account(-9, "SIGKILL").startswith("killed by SIGKILL (not sent by vlmrl; the kernel's OOM killer")
    assert exit_account(-15, "SIGTERM") == "killed by SIGTERM (not sent by vlmrl)"
    assert exit_account(143, None) == "exit code 143 (128 + SIGTERM: a process under it was killed by SIGTERM)"
    assert exit_account(255, None) == "exit code 255"


def test_a_second_supervisor_of_the_same_run_dir_is_refused_and_overwrites_nothing(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, trainer_args=["--steps", "400", "--step-time", "0.05"])
    rd = RunDirectory(plan.run_dir)
    seen: dict[str, Any] = {}

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 2)
        config_before = rd.config.read_bytes()
        second = Supervisor(plan)
        with pytest.raises(RunDirBusy) as err:
            await second.run()
        seen["error"] = str(err.value)
        seen["config_same"] = rd.config.read_bytes() == config_before
        seen["run"] = read_json(rd.run_json)
        sup.request_stop()

    code, _, info = supervise(plan, driver)
    assert code == 130 and info["status"] == "stopped"
    assert f"in use by another vlmrl run (supervisor pid {os.getpid()} on {socket.gethostname()})" in seen["error"]
    assert seen["config_same"] and seen["run"]["supervisor_pid"] == os.getpid()
    assert seen["run"]["started_at"] == info["started_at"]  # run.json is still the first run's
    assert len(reports(tmp_path / "server.jsonl")) == 1  # the second one started nothing
    assert_nothing_left(tmp_path)


def _stale_socket(path: Path) -> None:
    """A socket file nobody listens on, as a supervisor killed with SIGKILL leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays


def test_a_stale_control_socket_is_replaced_and_a_deleted_one_renewed(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, trainer_args=["--steps", "400", "--step-time", "0.05"])
    sock = socket_path(plan.run_dir)
    _stale_socket(sock)
    from backend.errors import VlmrlError

    with pytest.raises(VlmrlError, match="no supervisor is running"):
        send_command(plan.run_dir, "status")
    seen: dict[str, Any] = {}

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 1)
        status = await asyncio.to_thread(send_command, plan.run_dir, "status")
        seen["first"] = status["ok"]
        sock.unlink()  # a temp-dir cleaner, or a user
        t0 = time.monotonic()
        await until(lambda: sock.exists(), timeout=CONTROL_CHECK_S * 5)
        seen["renewed_after_s"] = time.monotonic() - t0
        answer = await asyncio.to_thread(send_command, plan.run_dir, "stop")
        seen["stop"] = answer["ok"]

    code, events, info = supervise(plan, driver)
    assert seen["first"] and seen["stop"] and code == 130
    print(f"deleted control socket renewed after {seen['renewed_after_s']:.2f} s")
    assert seen["renewed_after_s"] < CONTROL_CHECK_S * 3
    assert any("was removed; listening on it again" in e.message for e in events)
    assert info["status"] == "stopped" and not sock.exists()
    assert_nothing_left(tmp_path)


# ----- the real `vlmrl run` -----


def _vlmrl(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kw)


@pytest.mark.timeout(600)
def test_two_vlmrl_runs_of_one_name_at_once_one_runs_the_other_is_refused(tmp_path: Path,
                                                                         tiny_cache_dir: Path) -> None:
    args = ("run", "configs/colors-tiny.toml", "trainer.args.max_steps=400", f"inference.port={free_port()}",
            "--output-dir", str(tmp_path / "runs"), "--name", "same")
    a, b = _vlmrl(*args), _vlmrl(*args)
    run_dir = tmp_path / "runs" / "same"
    try:
        # one of them is refused at once (preflight or the run directory's lock), exit 2
        loser = None
        deadline = time.monotonic() + 120
        while loser is None:
            assert time.monotonic() < deadline, "neither run was refused"
            loser = next((p for p in (a, b) if p.poll() is not None), None)
            time.sleep(0.1)
        winner = b if loser is a else a
        out, err = loser.communicate(timeout=30)
        assert loser.returncode == 2, out + err
        assert "in use" in err and str(run_dir) in err, err
        assert "Traceback" not in err
        # the winner trains undisturbed, then stops cleanly on SIGINT
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert winner.poll() is None, winner.communicate()
            assert time.monotonic() < deadline + 300, "the winner did not train"
            time.sleep(0.2)
        info = json.loads((run_dir / "run.json").read_text())
        assert info["supervisor_pid"] == winner.pid and info["status"] == "running"
        winner.send_signal(signal.SIGINT)
        assert winner.wait(timeout=120) == 130
        assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
        assert _run_pids(run_dir) == []
    finally:
        for p in (a, b):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small file system of its own (tmpfs), for a disk that fills or is read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_output_dir_is_refused_before_anything_starts(tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    p = _vlmrl("run", "configs/colors-tiny.toml", "--output-dir", str(tmpfs / "runs"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, out + err
    assert f"{tmpfs} is not writable" in out + err and "refusing to start" in err
    assert "Traceback" not in err and list(tmpfs.iterdir()) == []


def _fill(mnt: Path) -> Path:
    """Fill the file system at ``mnt`` to the last byte."""
    filler = mnt / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:  # the last partial MiB
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_disk_that_fills_mid_run_ends_it_clearly_and_resume_completes(tmpfs: Path, tiny_cache_dir: Path) -> None:
    args = ("run", "configs/colors-tiny.toml", "trainer.args.max_steps=12", "trainer.args.save_every=2",
            "trainer.restart='never'", f"inference.port={free_port()}", "--output-dir", str(tmpfs / "runs"),
            "--name", "full")
    run_dir = tmpfs / "runs" / "full"
    rd = RunDirectory(run_dir)
    p = _vlmrl(*args)
    try:
        deadline = time.monotonic() + 400
        while rd.latest_checkpoint() is None:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.1)
        filler = _fill(tmpfs)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=300)
        detected_s = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    assert p.returncode == 1, out[-3000:] + err[-3000:]
    assert "No space left on device" in out + err
    info = json.loads(rd.run_json.read_text())
    assert info["status"] == "failed" and info["failed_process"] == "trainer", info
    assert _run_pids(run_dir) == []
    for f in (rd.metrics, rd.rollouts):  # whole lines only, even cut off mid-write
        text = f.read_text()
        assert text == "" or text.endswith("\n")
        list(read_jsonl(f))
        for line in text.splitlines():
            json.loads(line)
    stopped_at = [r["step"] for r in read_jsonl(rd.metrics)]
    print(f"disk full: the run ended {detected_s:.1f} s after the disk filled, at step {max(stopped_at)}")
    assert detected_s < 120
    # space again: the resumed run continues from the last whole checkpoint to the end
    filler.unlink()
    r = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", *args, "--resume"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [rec["step"] for rec in read_jsonl(rd.metrics)] == list(range(1, 13))
    assert json.loads(rd.run_json.read_text())["status"] == "completed"
    assert not rd.space_reserve.exists()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_vlmrl_tui_restores_the_terminal_and_the_run_it_launched_goes_on(
        tmp_path: Path, tiny_cache_dir: Path, sig: signal.Signals) -> None:
    import fcntl
    import pty
    import struct
    import termios
    import threading

    from backend.records import RUN_FILE

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 130, 0, 0))
    run_dir = tmp_path / "runs" / "tui"
    p = subprocess.Popen(
        [sys.executable, "-m", "vlmrl_tui.tui_main", "configs/colors-tiny.toml", "trainer.args.max_steps=400",
         f"inference.port={free_port()}", "--output-dir", str(tmp_path / "runs"), "--name", "tui", "--no-gpu"],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, start_new_session=True,
        env=dict(os.environ, TERM="xterm-256color"),
    )
    os.close(slave)
    screen = bytearray()

    def drain() -> None:  # a pty nobody reads blocks its writer
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    supervisor = None
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert p.poll() is None, bytes(screen)[-2000:]
            assert time.monotonic() < deadline, "the launched run did not train"
            time.sleep(0.2)
        supervisor = json.loads((run_dir / RUN_FILE).read_text())["supervisor_pid"]
        t0 = time.monotonic()
        p.send_signal(sig)
        assert p.wait(timeout=30) == 128 + sig
        left_s = time.monotonic() - t0
        reader.join(timeout=5)
        text = bytes(screen)
        assert b"\x1b[?1049l" in text  # the alternate screen was left: the terminal is usable again
        assert b"The run keeps going headless" in text and str(run_dir).encode() in text.replace(b"\r\n", b"")
        assert psutil.pid_exists(supervisor)
        assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "running"
        print(f"vlmrl-tui left {left_s:.2f} s after {sig.name}; the run went on")
        assert send_command(run_dir, "stop")["ok"]
        wait = time.monotonic() + 120
        while json.loads((run_dir / RUN_FILE).read_text())["status"] not in ("stopped", "failed", "completed"):
            assert time.monotonic() < wait, "the run did not stop"
            time.sleep(0.2)
        assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "stopped"
        end = time.monotonic() + 30
        while psutil.pid_exists(supervisor) and psutil.Process(supervisor).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < end, "the supervisor outlived its run"
            time.sleep(0.1)
        assert _run_pids(run_dir) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        if supervisor is not None and psutil.pid_exists(supervisor):
            os.killpg(supervisor, signal.SIGKILL)
        os.close(master)


def test_the_reliability_table_and_the_tests_match_one_to_one() -> None:
    """docs/reliability.md names only tests that exist, and every test of the reliability
    files (faults, broken images, image tokens, security, properties) is in its table."""
    import ast
    import re

    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", doc))
    defined: dict[str, set[str]] = {}
    for file in {f for f, _ in named} | {"test_faults.py", "test_broken_images.py", "test_image_tokens.py",
                                         "test_security.py", "test_properties.py"}:
        tree = ast.parse((ROOT / "tests" / file).read_text())
        defined[file] = {n.name for n in tree.body
                         if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}
    missing = sorted(f"{f}::{t}" for f, t in named if t not in defined[f])
    assert missing == [], f"docs/reliability.md names tests that do not exist: {missing}"
    dedicated = ("test_faults.py", "test_broken_images.py", "test_image_tokens.py", "test_security.py",
                 "test_properties.py")
    untabled = sorted(f"{f}::{t}" for f in dedicated for t in defined[f] - {t for g, t in named if g == f}
                      if t != "test_the_reliability_table_and_the_tests_match_one_to_one")
    assert untabled == [], f"tests missing from docs/reliability.md: {untabled}"
