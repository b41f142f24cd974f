"""Launching a run from the dashboard: ``vlmrl run`` started detached, owned by the caller.

A launched run is the very same ``vlmrl run`` a shell would start (same supervisor, same
process handling), in its own session with its output in ``logs/supervisor.log``; the
dashboard only reads the run directory and talks to the supervisor's control socket, so
closing it can leave the run going headless. No Textual here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from backend.errors import VlmrlError
from backend.records import PROC_SUPERVISOR
from backend.rundir import RunDirectory


@dataclass
class LaunchedRun:
    """A ``vlmrl run`` this dashboard started."""

    process: subprocess.Popen[bytes]
    run_dir: Path
    log_path: Path
    stop_timeout_s: float = 60.0


def launch_command(config: Path, overrides: list[str], output_dir: Path | None,
                   name: str | None = None, resume: bool = False) -> list[str]:
    """The ``vlmrl run`` command line (through this interpreter)."""
    argv = [sys.executable, "-m", "vlmrl_tui.cli", "run"]
    if output_dir is not None:
        argv += ["--output-dir", str(output_dir)]
    if name:
        argv += ["--name", name]
    if resume:
        argv.append("--resume")
    return argv + [str(config), *overrides]


def resolve_run_dir(config: Path, overrides: list[str], output_dir: Path | None,
                    name: str | None = None) -> tuple[Path, float]:
    """Where ``vlmrl run`` will put the run, and its stop grace (validates the config)."""
    from backend.config import load_config, location_overrides

    cfg = load_config(config, [*overrides, *location_overrides(name, output_dir)])
    return (Path.cwd() / cfg.run_dir()).resolve(), cfg.run.stop_grace_s


def launch_run(config: Path, overrides: list[str], output_dir: Path | None = None,
               name: str | None = None, resume: bool = False) -> LaunchedRun:
    """Start ``vlmrl run`` detached (own session), its output appended to logs/supervisor.log."""
    from vlmrl_tui.plan import run_dir_problem

    run_dir, grace = resolve_run_dir(config, overrides, output_dir, name)
    problem = run_dir_problem(run_dir, resume)
    if problem is not None:
        raise VlmrlError(problem)
    log_path = RunDirectory(run_dir).log(PROC_SUPERVISOR)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = launch_command(config, overrides, output_dir, name, resume)
    with open(log_path, "ab") as log:
        log.write(f"--- vlmrl-tui: {' '.join(argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    return LaunchedRun(process, run_dir, log_path, stop_timeout_s=2 * grace + 20.0)
