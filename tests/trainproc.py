"""Helpers for tests that run ``vlmrl train`` against a real ``vlmrl serve`` subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

from backend import contract
from backend.config import read_toml

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-run-token"


def colors_tiny_config(path: Path, *, port: int, output_dir: Path, run_name: str = "run", **trainer_args: Any) -> Path:
    """``configs/colors-tiny.toml`` with a free port, a temporary output dir and ``trainer_args``."""
    data = read_toml(ROOT / "configs" / "colors-tiny.toml")
    data["inference"]["port"] = port
    data["trainer"]["args"].update(output_dir=str(output_dir), run_name=run_name, **trainer_args)
    path.write_text(tomli_w.dumps(data))
    return path


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in (contract.ENV_RUN_DIR, contract.ENV_SERVER_URL):
        env.pop(var, None)  # the config alone says where the server and the run directory are
    env[contract.ENV_RUN_TOKEN] = TOKEN
    env["OMP_NUM_THREADS"] = "1"
    env["VLMRL_QUIET"] = "1"
    return env


def start_trainer(config: Path, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``vlmrl train CONFIG [extra...]`` in its own process group, output to ``log_path``."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "vlmrl_tui.cli", "train", str(config), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=train_env(), start_new_session=True, cwd=str(ROOT),
        )
    finally:
        log.close()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` (a trainer we started) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
