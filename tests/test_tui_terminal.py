"""``vlmrl-tui`` in a real pseudo-terminal: a signal, or the terminal going away, ends it
promptly with the conventional exit code, and leaves no dashboard process behind."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.tui_rundir import make_run_dir

ROOT = Path(__file__).resolve().parent.parent


def spawn(run_dir: Path) -> tuple[int, int]:
    """``vlmrl-tui --attach run_dir`` as the session leader of a new 130x42 terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes the dashboard
        os.chdir(ROOT)
        env = dict(os.environ, TERM="xterm-256color")
        os.execvpe(sys.executable, [sys.executable, "-m", "vlmrl_tui.tui_main", "--attach", str(run_dir)], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 42, 130, 0, 0))
    return pid, fd


def read_until(fd: int, text: bytes, timeout: float = 60.0) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while text not in out:
        assert time.monotonic() < deadline, f"no {text!r} on the terminal in {timeout} s: {out[-500:]!r}"
        out += os.read(fd, 1 << 16)
    return out


def wait_exit(pid: int, fd: int | None, timeout: float = 15.0) -> int:
    """The exit code of ``pid``, draining its terminal meanwhile; killed (and failed) if it stays."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if fd is not None:
            try:
                os.read(fd, 1 << 16)
            except OSError:
                pass
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"vlmrl-tui still ran {timeout} s after it was told to go")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_dashboard(tmp_path: Path, sig: signal.Signals) -> None:
    pid, fd = spawn(make_run_dir(tmp_path / "run"))
    try:
        read_until(fd, b"Processes")  # the dashboard is up
        os.kill(pid, sig)
        assert wait_exit(pid, fd) == 128 + sig
    finally:
        os.close(fd)


def test_a_closed_terminal_ends_the_dashboard(tmp_path: Path) -> None:
    pid, fd = spawn(make_run_dir(tmp_path / "run"))
    read_until(fd, b"Processes")
    time.sleep(1.0)  # the next frames wait, unread, in the terminal
    os.close(fd)  # the window closes (SIGHUP to the session)
    assert wait_exit(pid, None) == 128 + signal.SIGHUP
