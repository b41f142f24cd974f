"""One supervisor per run directory: an exclusive ``flock`` held for the supervisor's life.

``vlmrl run`` checks ``run.json`` before it starts (a live supervisor there refuses the
run), but two runs of the same name started together both pass that check; the lock
closes the gap. The kernel drops a ``flock`` when its holder dies, even by SIGKILL, so a
crashed supervisor never leaves a stale lock. No Textual, no torch.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from backend.errors import VlmrlError
from backend.records import EXIT_BAD_CONFIG
from backend.rundir import RunDirectory


class RunDirBusy(VlmrlError):
    """Another supervisor holds the run directory."""

    exit_code = EXIT_BAD_CONFIG


class RunLock:
    """The held lock of one run directory (release with :meth:`release`)."""

    def __init__(self, fd: int | None, path: Path, note: str | None = None) -> None:
        self._fd = fd
        self.path = path
        #: why the directory is not locked although the run goes on (a file system without locks)
        self.note = note

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def acquire(run_dir: str | Path) -> RunLock:
    """Lock ``run_dir`` for this process, or raise :class:`RunDirBusy` naming the holder.

    The file keeps the holder's ``pid@host`` for that message; it is never deleted, as
    unlinking a lock file races with another process that just opened it.
    """
    rd = RunDirectory(run_dir)
    rd.create()
    path = rd.lock_file
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirBusy(
            f"{rd.path} is in use by another vlmrl run (supervisor {holder}); watch it with "
            f"`vlmrl attach {rd.path}` or start another with --name NEW"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        return RunLock(fd, path, note=f"{rd.path}: the file system does not support locks ({e.strerror}); "
                                      "nothing stops a second run of the same name")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
    except OSError:
        pass  # a full disk: the lock holds all the same, only the holder's name is missing
    return RunLock(fd, path)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    if "@" not in text:
        return "pid unknown"
    pid, _, host = text.partition("@")
    return f"pid {pid} on {host}"
