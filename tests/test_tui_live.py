"""The dashboard on a live supervised run: the real supervisor (in its own session, as
``vlmrl-tui CONFIG`` starts it) with the stand-in server and trainer of tests/fixtures.

Checks process states, CPU/RSS, log lines arriving, and that restart and stop, pressed in
the app, travel over the real control socket; then the quit question for a run the app
started (stop it, or leave it running headless).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from backend.rundir import read_json
from tests.test_security import files_holding, run_token
from tests.tui_rundir import screen_text, wait_for
from vlmrl_tui.app import VlmrlApp
from vlmrl_tui.control import send_command
from vlmrl_tui.panes.screens import ConfirmScreen, QuitScreen
from backend.net import free_port
from vlmrl_tui.launch import LaunchedRun

FIXTURES = Path(__file__).parent / "fixtures"
SIZE = (130, 42)

SUPERVISE = r"""
import asyncio, sys
from backend.config import validate_config
from vlmrl_tui.plan import build_plan
from vlmrl_tui.supervisor import Supervisor

out, port, fixtures, steps, step_time = sys.argv[1:6]
cfg = validate_config({
    "model": "stand-in", "env": {"id": "colors"},
    "inference": {"port": int(port), "restart": "never"},
    "trainer": {"restart": "on-failure", "max_restarts": 2,
                "args": {"run_name": "live", "output_dir": out, "max_steps": int(steps)}},
})
plan = build_plan(cfg, None, cwd=out)
py = sys.executable
plan = plan.replace_process("server", argv=(py, f"{fixtures}/fake_server.py", "--port", port, "--ready-after", "0.3"))
trainer = (py, f"{fixtures}/fake_trainer.py", "--steps", steps, "--step-time", step_time)
plan = plan.replace_process("trainer", argv=trainer, restart_argv=trainer + ("--resume",))
sys.exit(asyncio.run(Supervisor(plan, grace_s=3.0, health_poll_s=0.2).run()))
"""


def start_supervised_run(out: Path, steps: int = 2000, step_time: float = 0.05) -> tuple[subprocess.Popen, Path]:
    """A supervisor with stand-in children, detached like `vlmrl-tui CONFIG` detaches `vlmrl run`."""
    run_dir = out / "live"
    log = out / "supervisor.out"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", SUPERVISE, str(out), str(free_port()), str(FIXTURES), str(steps), str(step_time)],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=Path(__file__).parent.parent,
        )
    return proc, run_dir


@pytest.fixture
def live_run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    proc, run_dir = start_supervised_run(tmp_path)
    yield proc, run_dir
    if proc.poll() is None:
        try:
            send_command(run_dir, "stop", timeout=3)
            proc.wait(timeout=15)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def run_info(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / "run.json") or {}


def proc_info(run_dir: Path, name: str) -> dict[str, Any]:
    return run_info(run_dir).get("processes", {}).get(name, {})


def make_app(run_dir: Path, **kw: Any) -> VlmrlApp:
    return VlmrlApp(run_dir, gpu=False, poll_s=0.1, stats_s=0.3, health_s=0.5, redraw_s=0.1, **kw)


@pytest.mark.asyncio
async def test_live_run_states_logs_and_control_keys(live_run: tuple[subprocess.Popen, Path]) -> None:
    proc, run_dir = live_run
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        table = app.processes.table

        def cell(proc_name: str, col: str) -> str:
            try:
                return str(table.get_cell(proc_name, col))
            except Exception:
                return ""

        await wait_for(pilot, lambda: cell("server", "state") == "healthy" and cell("trainer", "state") == "running",
                       timeout=30, what="server healthy, trainer running")
        assert cell("server", "pid") == str(proc_info(run_dir, "server")["pid"])
        await wait_for(pilot, lambda: cell("trainer", "RSS").endswith("MiB") and cell("server", "health").endswith("ms"),
                       what="CPU/RSS and health samples")
        assert cell("trainer", "CPU%") != "—"

        server_view, trainer_view = app.logs.views["server"], app.logs.views["trainer"]
        await wait_for(pilot, lambda: any("listening on" in ln for ln in server_view.lines_held()), what="server log")
        await wait_for(pilot, lambda: any(ln.startswith("step 5 ") for ln in trainer_view.lines_held()),
                       what="trainer log lines")
        assert "listening on 127.0.0.1" in screen_text(app)  # on screen, escape codes rendered away

        # Restart the trainer: the key reaches the supervisor over its control socket.
        old_pid = proc_info(run_dir, "trainer")["pid"]
        app.processes.table.focus()
        app.processes.select("trainer")
        await pilot.press("r")
        await wait_for(pilot, lambda: app.commands and app.commands[-1].reply == {"ok": True}, what="restart reply")
        assert (app.commands[-1].cmd, app.commands[-1].proc) == ("restart", "trainer")
        await wait_for(pilot, lambda: proc_info(run_dir, "trainer").get("restarts") == 1
                       and proc_info(run_dir, "trainer").get("pid") not in (None, old_pid)
                       and proc_info(run_dir, "trainer").get("status") == "running", timeout=20,
                       what="trainer restarted")
        await wait_for(pilot, lambda: cell("trainer", "restarts") == "1", what="restart count shown")
        await wait_for(pilot, lambda: any("starting trainer (restart 1)" in ln for ln in trainer_view.lines_held()),
                       what="restart line in the trainer log")

        # Stop the run: asks first, then the supervisor stops everything.
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_for(pilot, lambda: app.commands[-1].cmd == "stop" and app.commands[-1].reply == {"ok": True},
                       what="stop reply")
        await wait_for(pilot, lambda: app.processes.run is not None and app.processes.run.status == "stopped",
                       timeout=20, what="run stopped")
        assert proc.wait(timeout=15) == 130
        await wait_for(pilot, lambda: cell("trainer", "state") == "stopped", what="trainer shown stopped")


@pytest.mark.asyncio
async def test_no_tab_of_the_dashboard_and_no_file_of_the_run_shows_the_run_token(
        live_run: tuple[subprocess.Popen, Path]) -> None:
    proc, run_dir = live_run
    token = run_token(run_dir, lambda: proc.poll() is None, timeout_s=30)  # in the children's environment
    app = make_app(run_dir)
    screens: dict[str, str] = {}
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.processes.run is not None and app.processes.run.status == "running"
                       and any(ln.startswith("step 3 ") for ln in app.logs.views["trainer"].lines_held()),
                       timeout=30, what="run running, trainer log lines")
        for proc_name in ("server", "trainer"):
            app.processes.table.focus()
            app.processes.select(proc_name)
            for key, tab in (("1", "logs"), ("2", "metrics"), ("3", "rollouts")):
                await pilot.press(key)
                await pilot.pause(0.3)
                screens[f"{proc_name}/{tab}"] = screen_text(app)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        screens["help"] = screen_text(app)
    assert "trainer" in screens["trainer/logs"] and "server" in screens["server/logs"]
    assert [name for name, text in screens.items() if token in text] == []
    assert files_holding(run_dir, token) == []  # run.json, logs, metrics of the live run


@pytest.mark.asyncio
async def test_closing_a_run_the_app_started_can_stop_it(live_run: tuple[subprocess.Popen, Path]) -> None:
    proc, run_dir = live_run
    launched = LaunchedRun(proc, run_dir, run_dir / "logs" / "supervisor.log", stop_timeout_s=20)
    app = make_app(run_dir, launched=launched)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: run_info(run_dir).get("status") == "running", timeout=30, what="running")
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        await pilot.press("s")
        await wait_for(pilot, lambda: proc.poll() is not None, timeout=30, what="supervisor exit")
        await pilot.pause(0.2)
    assert app.return_value == "stopped"
    assert proc.returncode == 130 and run_info(run_dir)["status"] == "stopped"


@pytest.mark.asyncio
async def test_closing_a_run_the_app_started_can_leave_it_running(live_run: tuple[subprocess.Popen, Path]) -> None:
    proc, run_dir = live_run
    launched = LaunchedRun(proc, run_dir, run_dir / "logs" / "supervisor.log", stop_timeout_s=20)
    app = make_app(run_dir, launched=launched)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: run_info(run_dir).get("status") == "running", timeout=30, what="running")
        await pilot.press("q")
        await pilot.press("escape")  # cancel: still here
        assert not isinstance(app.screen, QuitScreen) and app.is_running
        await pilot.press("q", "l")
        await pilot.pause(0.2)
    assert app.return_value == "left"
    assert proc.poll() is None  # headless: the supervisor keeps going
    assert send_command(run_dir, "status")["run"]["status"] == "running"  # and --attach can reconnect
    assert json.loads((run_dir / "run.json").read_text())["processes"]["trainer"]["status"] == "running"


@pytest.mark.asyncio
async def test_a_run_whose_supervisor_died_is_shown_ended_and_recorded(tmp_path: Path) -> None:
    """kill -9 of the supervisor (as when its node or SLURM job is lost): the dashboard does not
    show the run live forever; it records the end in run.json and shows it failed."""
    proc, run_dir = start_supervised_run(tmp_path)
    try:
        import time

        deadline = time.monotonic() + 30
        while run_info(run_dir).get("status") != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run_info(run_dir).get("status") == "running"
        proc.kill()
        proc.wait(timeout=10)
        app = make_app(run_dir)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.processes.run is not None and app.processes.run.status == "failed",
                           timeout=30, what="run shown failed")
            assert "is gone and the run did not finish" in (run_info(run_dir).get("reason") or "")
            assert "failed" in screen_text(app)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stand-ins, should PDEATHSIG have missed one
        except ProcessLookupError:
            pass
