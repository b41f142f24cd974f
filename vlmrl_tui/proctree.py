"""Process trees: remember every descendant of a child, and stop all of them.

A supervised child (vLLM with its engine workers, torchrun with its ranks) is a tree of
processes in its own process group. :class:`ProcessTree` remembers every descendant it
has seen (a grandchild that left the group is still found), :func:`terminate` stops a
tree the way process supervisors do (SIGTERM to the group and every member, a grace
period, SIGKILL to what is left), and :func:`processes_with_token` finds processes of a
run that escaped every tree by the run token in their environment. No asyncio state is kept here:
the supervisor decides when; this module knows how.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import socket
import sys
import time
from typing import Callable

import psutil

from backend import contract
from backend.records import RUN_FAILED, RunInfo
from backend.rundir import RunDirectory, write_json_atomic

REAP_POLL_S = 0.05
KILL_WAIT_S = 5.0  # how long SIGKILLed processes may take to disappear


def signal_name(returncode: int | None) -> str | None:
    """``-9`` -> ``"SIGKILL"`` (Popen convention: negative = killed by that signal)."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                out.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return out


def send(procs: list[psutil.Process], pgid: int | None, sig: int) -> None:
    """``sig`` to the process group ``pgid`` (if any) and to each of ``procs``."""
    if pgid is not None:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for p in procs:
        with contextlib.suppress(psutil.Error, OSError):
            p.send_signal(sig)


class ProcessTree:
    """One child's processes: its group and every descendant seen while it ran."""

    def __init__(self, pid: int | None = None, pgid: int | None = None) -> None:
        self.pid = pid
        self.pgid = pgid
        self.seen: dict[int, psutil.Process] = {}
        self.track()

    def track(self) -> None:
        """Remember every descendant seen now, so that none is left when the child stops."""
        if self.pid is None:
            return
        try:
            root = psutil.Process(self.pid)
            self.seen.setdefault(root.pid, root)
            for c in root.children(recursive=True):
                self.seen.setdefault(c.pid, c)
        except psutil.Error:
            pass

    def remaining(self) -> list[psutil.Process]:
        """Processes of this tree or group that are still alive."""
        procs = {p.pid: p for p in self.seen.values() if alive(p)}
        if self.pgid is not None:
            for p in _group_members(self.pgid):
                if alive(p):
                    procs.setdefault(p.pid, p)
        return list(procs.values())

    def signal(self, sig: int) -> None:
        send(self.remaining(), self.pgid, sig)


async def terminate(tree: ProcessTree, grace_s: float, escalate: asyncio.Event,
                    on_kill: Callable[[], None] = lambda: None) -> None:
    """Stop every process of ``tree``: SIGTERM, up to ``grace_s``, then SIGKILL.

    ``escalate`` (set before or during the wait) turns it into an immediate SIGKILL;
    ``on_kill`` is called just before a SIGKILL goes out (so the exit it causes is known
    as a kill). Returns once nothing of the tree is left (at most :data:`KILL_WAIT_S`
    after the SIGKILL).
    """
    if escalate.is_set():
        on_kill()
        tree.signal(signal.SIGKILL)
    else:
        tree.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not escalate.is_set():
            tree.track()
            if not tree.remaining():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(escalate.wait(), REAP_POLL_S)
        if tree.remaining():
            on_kill()
            tree.signal(signal.SIGKILL)
    end = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < end:
        left = tree.remaining()
        if not left:
            break
        send(left, tree.pgid, signal.SIGKILL)
        await asyncio.sleep(REAP_POLL_S)


def processes_with_token(token: str) -> list[psutil.Process]:
    """Processes of this run that left every tracked tree (found by the run token)."""
    me = os.getpid()
    needle = f"{contract.ENV_RUN_TOKEN}={token}".encode()
    out = []
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    p = psutil.Process(pid)
                    if alive(p):
                        out.append(p)
        except (OSError, psutil.Error):
            continue
    return out


async def stop_processes(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM ``procs`` (not their groups), wait up to ``grace_s``, SIGKILL what is left."""
    send(procs, None, signal.SIGTERM)
    _gone, still = await asyncio.to_thread(psutil.wait_procs, procs, min(grace_s, KILL_WAIT_S))
    send(list(still), None, signal.SIGKILL)
    await asyncio.to_thread(psutil.wait_procs, list(still), KILL_WAIT_S)


def supervisor_alive(info: RunInfo) -> bool:
    """Whether the supervisor that wrote ``info`` still runs (not a later owner of its pid).

    For a run inside a SLURM job, whether the job still runs (``squeue``): its supervisor
    may live on a node whose processes this host cannot see. A supervisor on another host
    (``run.json``'s ``host``) counts as alive: its pid says nothing here."""
    if info.slurm_job is not None:
        from vlmrl_tui.slurmctl import job_running

        return job_running(info.slurm_job)
    if info.host is not None and info.host != socket.gethostname():
        return True  # another machine's pid: this one cannot tell, so it does not declare it dead
    if info.supervisor_pid is None:
        return False
    try:
        p = psutil.Process(info.supervisor_pid)
        if info.started_at is not None and p.create_time() > info.started_at + 1:
            return False  # the pid now belongs to another process
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def record_lost(rd: RunDirectory, info: RunInfo) -> tuple[RunInfo, bool]:
    """The run of ``info``, whose supervisor is gone: (its own last ``run.json``, False) if that
    says the run ended, else (a copy of ``info`` marked ended -- failed; stopped when its SLURM
    job was cancelled -- with why, True), written back so every later reader finds the account.
    ``info`` itself is left alone: a view that shows it learns the end from run.json."""
    last = rd.run_info()
    if last is not None and last.finished:
        return last, False
    info = copy.deepcopy(info)
    status, why = RUN_FAILED, f"the supervisor (pid {info.supervisor_pid}) is gone and the run did not finish"
    if info.slurm_job is not None:
        from vlmrl_tui.slurmctl import job_end, run_status_after

        end = job_end(info.slurm_job)
        status = (run_status_after(end) if end else None) or RUN_FAILED
        why = f"SLURM job {info.slurm_job} " + (f"ended {end}" if end else "is no longer listed") + \
            " before the run finished"
    info.lost(why, time.time(), status)
    try:
        write_json_atomic(rd.run_json, info.to_json())
    except OSError:
        pass  # a read-only run directory: the caller still shows the account
    return info, True


def make_preexec() -> Callable[[], None] | None:
    """Child-side hook: die with SIGTERM if the supervisor dies (Linux PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(1, sigterm, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the supervisor died before prctl
            os._exit(1)

    return preexec
