"""Control channel of a running supervisor: a unix socket taking JSON lines.

A supervisor started elsewhere (``vlmrl run`` in tmux, or spawned detached by the TUI)
listens on ``runs/<name>/supervisor.sock`` (or, when that path is too long for a unix
socket, a short path under the temp dir; ``run.json`` names it as ``control_socket``).

Request, one JSON object per line::

    {"cmd": "status"}                          -> {"ok": true, "run": {...run.json...}}
    {"cmd": "restart", "proc": "server"}       -> {"ok": true}
    {"cmd": "stop"} / {"cmd": "kill"}          the whole run, graceful / immediate
    {"cmd": "stop", "proc": "trainer"}         only the trainer (the server keeps running)

Every answer has ``ok``; failures carry ``error``. The socket is readable by its owner
only (mode 0600): whoever can write it can stop the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from backend.errors import VlmrlError
from backend.rundir import RunDirectory

COMMANDS = frozenset({"status", "restart", "stop", "kill"})
#: what a control server asks for each request: ``await handler(cmd, proc)`` -> the JSON answer
Handler = Callable[[str, "str | None"], Awaitable[dict[str, Any]]]
_MAX_PATH = 100  # sun_path is 108 bytes on Linux
_MAX_LINE = 64 * 1024


def socket_path(run_dir: str | Path) -> Path:
    """Where the supervisor of ``run_dir`` listens (short fallback for long paths)."""
    path = RunDirectory(Path(run_dir).resolve()).control_socket
    if len(os.fsencode(str(path))) <= _MAX_PATH:
        return path
    digest = hashlib.sha1(os.fsencode(str(path))).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vlmrl-{digest}.sock"


class ControlServer:
    """Serves control commands on a unix socket; ``handler`` answers each one (the
    supervisor's :meth:`~vlmrl_tui.supervisor.Supervisor.command`)."""

    def __init__(self, handler: Handler, run_dir: str | Path) -> None:
        self.handler = handler
        self.path = socket_path(run_dir)
        self._server: asyncio.AbstractServer | None = None
        self._ident: tuple[int, int] | None = None

    async def start(self) -> str:
        """Listen; a stale socket file (nobody listening) is replaced. Returns the path."""
        if self.path.exists():
            if _listening(self.path):
                raise OSError(f"another supervisor listens on {self.path}")
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=_MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        return str(self.path)

    def intact(self) -> bool:
        """Whether the socket file is still the one this server listens on (a temp-dir
        cleaner, or a user, may have deleted it)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    async def renew(self) -> str:
        """Listen on a fresh socket file at the same path; returns the path."""
        if self._server is not None:
            self._server.close()  # no unlink: the path is no longer ours
            self._server = None
        return await self.start()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _reply(writer, {"ok": False, "error": "request line too long"})
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                await _reply(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not JSON"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        cmd, proc = req.get("cmd"), req.get("proc")
        if cmd not in COMMANDS:
            return {"ok": False, "error": f"unknown cmd {cmd!r}; one of {sorted(COMMANDS)}"}
        if proc is not None and not isinstance(proc, str):
            return {"ok": False, "error": "proc must be a string"}
        try:
            return await self.handler(cmd, proc)
        except Exception as e:  # never let one bad request take the channel down
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}


async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _control_socket(run_dir: Path) -> Path:
    info = RunDirectory(run_dir).run_info()  # RunInfoError (a VlmrlError) for another schema
    recorded = info.control_socket if info is not None else None
    return Path(recorded) if recorded else socket_path(run_dir)


def send_command(run_dir: str | Path, cmd: str, proc: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Send one command to the supervisor of ``run_dir`` and return its answer.

    Raises :class:`VlmrlError` when no supervisor listens (the run ended or never began)
    or it does not answer within ``timeout`` seconds.
    """
    run_dir = Path(run_dir)
    if cmd not in COMMANDS:
        raise VlmrlError(f"unknown command {cmd!r}; one of {sorted(COMMANDS)}")
    path = _control_socket(run_dir)
    req: dict[str, Any] = {"cmd": cmd}
    if proc is not None:
        req["proc"] = proc
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise VlmrlError(f"no supervisor is running for {run_dir} (nothing listens on {path})") from None
        except OSError as e:
            raise VlmrlError(f"cannot reach the supervisor of {run_dir}: {e}") from None
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            raise VlmrlError(f"the supervisor of {run_dir} did not answer within {timeout:g} s") from None
        except OSError as e:
            raise VlmrlError(f"lost the supervisor of {run_dir}: {e}") from None
    if not buf.strip():
        raise VlmrlError(f"the supervisor of {run_dir} closed the connection without answering")
    try:
        answer = json.loads(buf)
    except ValueError:
        raise VlmrlError(f"the supervisor of {run_dir} sent a malformed answer") from None
    return answer if isinstance(answer, dict) else {"ok": False, "error": "malformed answer"}
