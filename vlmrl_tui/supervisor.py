"""The supervisor: starts, watches, restarts and stops the run's child processes (asyncio).

One event loop drives everything (no Textual, no torch here):

* the optional one-shot ``prepare`` step (e.g. building a ``builtin:tiny-*`` model) runs to
  completion first;
* the server starts in its own process group, its output appended to
  ``runs/<name>/logs/server.log``; ``/health`` and then ``/v1/models`` are polled until both
  answer 200 -- or the start timeout fails the run with the last log lines;
* the trainer starts once the server is healthy (process-compose's ``process_healthy``);
* a child that dies unexpectedly is restarted per its policy (``never``/``on-failure``,
  max restarts, exponential backoff); beyond that the run fails and the other child is
  stopped; the trainer exiting 0 completes the run and stops the server;
* stopping = SIGTERM to the process group and every descendant seen, a grace period,
  then SIGKILL; the run ends only when no process of the run is left (processes that
  escaped the group are found by the run token in their environment).

``run.json`` (written atomically on every change) holds the whole state: a
:class:`~backend.records.RunInfo`, whose schema, process and run statuses live in
:mod:`backend.records`. Stopping process trees is :mod:`vlmrl_tui.proctree`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend import contract
from backend.records import (
    ENDED_STATUSES,
    EXITED,
    FAILED,
    HEALTHY,
    KILLED,
    PENDING,
    PROC_TRAINER,
    RESTARTING,
    RUN_COMPLETED,
    RUN_EXIT_CODES,
    RUN_FAILED,
    RUN_PREPARING,
    RUN_RUNNING,
    RUN_STARTING,
    RUN_STOPPED,
    RUN_STOPPING,
    RUNNING,
    STARTING,
    STOPPED,
    HistoryEntry,
    RunInfo,
    state_line,
)
from backend.rundir import RunDirectory, failure_lines, write_json_atomic
from vlmrl_tui import proctree, runlock
from vlmrl_tui.child import Child
from vlmrl_tui.control import ControlServer
from vlmrl_tui.plan import RunPlan

LOG_TAIL_LINES = 30
HISTORY_MAX = 500
MAX_BACKOFF_S = 60.0
_TRACK_EVERY_S = 0.5
#: how often the supervisor checks that its control socket file still exists
CONTROL_CHECK_S = 2.0
#: disk space held in the run directory while the run lives (run.json is a few KiB)
RESERVE_BYTES = 256 * 1024


@dataclass(frozen=True)
class SupervisorEvent:
    """Something a view may show: a state change, a run-level change, a note or a failure."""

    kind: str  # "state" | "run" | "info" | "failure"
    proc: str | None
    status: str | None
    message: str
    time: float = field(default_factory=time.time)
    log_tail: tuple[str, ...] = ()


class Supervisor:
    """Runs a :class:`RunPlan`: ``await run()`` returns the exit code (0, 1 or 130).

    ``request_stop()``, ``kill()``, ``restart(proc)`` and ``stop_process(proc)`` may be
    called from any thread (signal handlers, the control socket, tests). ``on_event`` is
    called on the loop thread for every :class:`SupervisorEvent`.
    """

    def __init__(
        self,
        plan: RunPlan,
        run_dir: str | Path | None = None,
        *,
        on_event: Callable[[SupervisorEvent], None] | None = None,
        grace_s: float | None = None,
        health_poll_s: float | None = None,
        control: bool = True,
        write_config: bool = True,
    ) -> None:
        self.plan = plan
        self.rd = RunDirectory(run_dir if run_dir is not None else plan.run_dir)
        self.grace_s = plan.stop_grace_s if grace_s is None else grace_s
        self.health_poll_s = plan.health_poll_s if health_poll_s is None else health_poll_s
        self.on_event = on_event
        self._control_enabled = control
        self._write_config = write_config
        self._order = [p.name for p in plan.processes]
        self._children: dict[str, Child] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[tuple[Any, ...]] | None = None
        self._early: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._outcome: str | None = None
        self._shutdown = False
        # run.json: the children's ProcessInfo objects join it as they are created
        self._run = RunInfo(
            name=plan.name, status=RUN_STARTING, run_dir=str(self.rd.path), config=str(self.rd.config),
            supervisor_pid=os.getpid(), started_at=time.time(),
            ports={"server": plan.server_port, "sync": plan.sync_port}, server_url=plan.server_url,
            engine=plan.engine, model=plan.model, max_steps=plan.max_steps, stop_grace_s=self.grace_s,
            slurm_job=plan.slurm_job, nodes={k: list(v) for k, v in plan.nodes.items()},
            host=socket.gethostname(),
        )
        self._preexec = proctree.make_preexec()
        self._token = plan.shared_env.get(contract.ENV_RUN_TOKEN)
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----- public API (thread-safe) -----

    def request_stop(self) -> None:
        """Graceful stop of the whole run (SIGTERM, grace, SIGKILL); exit code 130."""
        self._post(("stop", None, None))

    def kill(self) -> None:
        """Immediate SIGKILL of every process of the run; exit code 130."""
        self._post(("kill", None, None))

    def restart(self, proc: str) -> None:
        """Stop ``proc`` (gracefully) and start it again (not counted against its limit)."""
        self._post(("restart", proc, None))

    def stop_process(self, proc: str) -> None:
        """Stop one process; stopping the server (which the trainer needs) stops the run."""
        self._post(("stop", proc, None))

    async def command(self, cmd: str, proc: str | None = None) -> dict[str, Any]:
        """Run a control command on the loop and return its JSON answer."""
        assert self._loop is not None
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._post((cmd, proc, fut))
        return await fut

    def info(self) -> RunInfo:
        """The current state, as ``run.json`` holds it (the supervisor's own object: read it only)."""
        return self._run

    def snapshot(self) -> dict[str, Any]:
        """The current ``run.json`` content (JSON)."""
        return self.info().to_json()

    # ----- main -----

    async def run(self) -> int:
        """Run the plan to its end; every process of the run is gone when this returns."""
        run_lock = runlock.acquire(self.rd.path)  # RunDirBusy before anything is written
        try:
            return await self._run_locked(run_lock)
        finally:
            run_lock.release()

    async def _run_locked(self, run_lock: runlock.RunLock) -> int:
        self._loop = asyncio.get_running_loop()
        self._inbox = asyncio.Queue()
        self._children = {s.name: Child(s) for s in self.plan.processes}
        self._run.processes = {n: self._children[n].state for n in self._order}
        with self._lock:
            for msg in self._early:
                self._inbox.put_nowait(msg)
            self._early.clear()
        self._setup_dir()
        if run_lock.note:
            self._event("info", None, None, run_lock.note)
        control = None
        if self._control_enabled:
            control = ControlServer(self.command, self.rd.path)
            try:
                self._run.control_socket = await control.start()
            except OSError as e:
                self._event("info", None, None, f"control socket unavailable: {e}")
                control = None
        self._set_run_status(RUN_PREPARING if self.plan.prepare else RUN_STARTING)
        tracker = self._task(self._track_loop())
        if control is not None:
            self._task(self._keep_control(control))
        try:
            await self._main()
        except BaseException:
            # Cancelled or crashed: nothing of the run may outlive us.
            self._outcome = self._outcome or RUN_FAILED
            self._run.reason = self._run.reason or "supervisor interrupted"
            await asyncio.shield(self._kill_everything())
            raise
        finally:
            tracker.cancel()
            for t in list(self._tasks):
                t.cancel()
            if control is not None:
                await control.close()
            self._run.ended_at = time.time()
            self._run.control_socket = None
            self._set_run_status(self._outcome or RUN_FAILED)
            self._write()
            with contextlib.suppress(OSError):
                self.rd.space_reserve.unlink()
        return RUN_EXIT_CODES[self._run.status]

    def _task(self, coro: Any) -> asyncio.Task[Any]:
        """Create a task and keep a reference until it is done (asyncio keeps weak ones)."""
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _setup_dir(self) -> None:
        self.rd.create()
        if self._write_config:
            tmp = self.rd.config.with_suffix(".toml.tmp")
            tmp.write_text(self.plan.config_toml, encoding="utf-8")
            os.replace(tmp, self.rd.config)
        self._reserve_space()
        self._write()

    async def _main(self) -> None:
        assert self._inbox is not None
        await self._advance()
        while not self._finished():
            msg = await self._inbox.get()
            await self._handle(msg)
            await self._advance()
        # Last sweep: anything carrying this run's token that escaped every tree.
        await self._sweep_token()

    def _finished(self) -> bool:
        if not self._shutdown:
            return False
        for c in self._children.values():
            if c.alive or (c.terminator is not None and not c.terminator.done()):
                return False
        return True

    async def _advance(self) -> None:
        """Start whatever may start now."""
        if self._shutdown:
            return
        for name in self._order:
            c = self._children[name]
            if c.spec.one_shot:
                if not c.done:
                    if not c.alive and c.starts == 0:
                        await self._spawn(c)
                    return  # later processes wait for the one-shot step
                continue
            if c.alive or c.hold or c.state.status != PENDING:
                continue
            if c.terminator is not None and not c.terminator.done():
                continue  # the previous tree is still going away (port, GPU memory)
            dep = self._children.get(c.spec.depends_on) if c.spec.depends_on else None
            if dep is not None and dep.state.status != HEALTHY:
                continue
            await self._spawn(c)
        if self._run.status in (RUN_PREPARING, RUN_STARTING) and all(
            c.spec.one_shot or c.state.status in (HEALTHY, RUNNING) for c in self._children.values()
        ):
            self._set_run_status(RUN_RUNNING)

    # ----- spawning and watching -----

    async def _spawn(self, c: Child) -> None:
        error = await c.start(self._preexec)
        if error is not None:
            self._set_state(c, FAILED, f"cannot start: {error}", ended=True)
            await self._failed(c, f"{c.name} cannot start: {error}")
            return
        assert c.proc is not None
        self._set_state(c, STARTING if c.spec.health_url else RUNNING, f"pid {c.proc.pid}")
        self._task(c.watch_exit(self._post, c.gen, c.proc))
        if c.spec.health_url:
            self._task(c.watch_health(self._post, c.gen, self.health_poll_s))

    async def _track_loop(self) -> None:
        while True:
            for c in self._children.values():
                c.tree.track()
            await asyncio.sleep(_TRACK_EVERY_S)

    async def _keep_control(self, control: ControlServer) -> None:
        """Listen again when the control socket file disappears (a temp-dir cleaner, a user)."""
        while True:
            await asyncio.sleep(CONTROL_CHECK_S)
            if control.intact():
                continue
            try:
                path = await control.renew()
            except OSError as e:
                self._event("info", None, None, f"control socket {control.path} is gone and cannot be renewed: {e}")
                return
            self._event("info", None, None, f"control socket {path} was removed; listening on it again")

    # ----- messages -----

    def _post(self, msg: tuple[Any, ...]) -> None:
        with self._lock:
            loop, inbox = self._loop, self._inbox
            if loop is None or inbox is None:
                self._early.append(msg)
                return
        # Thread-safe and wakes the loop even from a plain signal handler.
        with contextlib.suppress(RuntimeError):  # loop closed: the run is over
            loop.call_soon_threadsafe(inbox.put_nowait, msg)

    async def _handle(self, msg: tuple[Any, ...]) -> None:
        kind, name, arg = msg
        c = self._children.get(name) if isinstance(name, str) else None
        if kind == "exit" and c is not None:
            gen, rc = arg
            if gen == c.gen:
                await self._on_exit(c, rc)
        elif kind == "healthy" and c is not None:
            gen, took = arg
            if gen == c.gen and c.alive and c.state.status == STARTING and c.stop_reason is None:
                c.state.healthy_at = time.time()
                c.state.health = "ok"
                self._set_state(c, HEALTHY, f"answered {c.spec.health_url} after {took:.1f} s")
        elif kind == "health" and c is not None:
            gen, ok = arg
            if gen == c.gen and c.alive and c.stop_reason is None and not self._shutdown:
                c.state.health = "ok" if ok else "failing"
                self._event("info", c.spec.name, c.state.status, f"{c.spec.name}: health {c.state.health}")
                self._write()
        elif kind == "start_timeout" and c is not None:
            gen, timeout = arg
            if gen == c.gen and c.alive and c.state.status == STARTING and c.stop_reason is None:
                why = f"not healthy after {timeout:g} s (no 200 from {c.spec.health_url})"
                c.state.reason = why
                self._start_terminator(c, "timeout")
                await self._failed(c, f"{c.spec.name} {why}")
        elif kind == "respawn" and c is not None:
            if not self._shutdown and not c.alive and c.state.status == RESTARTING:
                c.state.status = PENDING  # _advance starts it once its dependency is healthy
        elif kind in ("stop", "kill", "restart", "status"):
            reply = self._command(kind, name, c)
            fut = arg
            if isinstance(fut, asyncio.Future) and not fut.done():
                fut.set_result(reply)
        elif kind == "reaped":
            pass
        else:
            fut = arg
            if isinstance(fut, asyncio.Future) and not fut.done():
                fut.set_result({"ok": False, "error": f"unknown command {kind!r} or process {name!r}"})

    def _command(self, cmd: str, name: str | None, c: Child | None) -> dict[str, Any]:
        if name is not None and c is None:
            return {"ok": False, "error": f"no process named {name!r} (known: {', '.join(self._order)})"}
        if cmd == "status":
            return {"ok": True, "run": self.snapshot()}
        if cmd == "restart":
            if c is None:
                return {"ok": False, "error": "restart needs a process name"}
            if self._shutdown:
                return {"ok": False, "error": "the run is stopping"}
            if c.spec.one_shot:
                return {"ok": False, "error": f"{c.spec.name} is a one-shot step"}
            c.hold = False
            c.state.restarts += 1
            if c.alive:
                self._event("info", c.spec.name, c.state.status, f"{c.spec.name}: restart requested")
                self._start_terminator(c, "restart")
            elif c.state.status != PENDING:
                self._set_state(c, PENDING, "restart requested")
            else:
                c.state.restarts -= 1  # never started yet: it starts when it may
            return {"ok": True}
        if cmd in ("stop", "kill"):
            immediate = cmd == "kill"
            if c is None or c.spec.name != self._trainer_name():
                self._begin_shutdown(RUN_STOPPED, None, f"{cmd} requested", immediate=immediate)
                return {"ok": True}
            c.hold = True  # stays down until a restart command
            if c.alive:
                self._start_terminator(c, cmd, immediate=immediate)
            else:
                if c.respawn_task is not None and not c.respawn_task.done():
                    c.respawn_task.cancel()
                if c.state.status not in ENDED_STATUSES:
                    self._set_state(c, STOPPED, f"{cmd} requested", ended=True)
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _trainer_name(self) -> str | None:
        for n in self._order:
            if self._children[n].spec.depends_on is not None:
                return n
        return None

    async def _on_exit(self, c: Child, rc: int) -> None:
        st = c.state
        c.exited(rc)
        how = f"killed by {st.signal}" if st.signal else f"exit code {rc}"
        # Leftovers of the group (e.g. engine workers of a crashed server) go too.
        if c.terminator is None or c.terminator.done():
            self._start_terminator(c, c.stop_reason or "cleanup", leader_gone=True)
        if c.stop_reason is not None:
            why = c.stop_reason
            if why == "timeout":
                self._set_state(c, FAILED, st.reason, ended=True)
            elif why == "restart":
                self._set_state(c, RESTARTING, f"{how}; restarting on request")
                self._schedule_respawn(c, 0.0)
            else:
                status = KILLED if (c.sent_kill or why == "kill") else STOPPED
                sent = "SIGKILL" if status == KILLED else "SIGTERM"
                self._set_state(c, status, f"vlmrl sent {sent} ({why}); {how}", ended=True)
            return
        if c.spec.one_shot:
            if rc == 0:
                c.done = True
                self._set_state(c, EXITED, "done", ended=True)
                if self._run.status == RUN_PREPARING:
                    self._set_run_status(RUN_STARTING)
            else:
                self._set_state(c, FAILED if rc > 0 else KILLED, how, ended=True)
                await self._failed(c, f"{c.spec.name} failed ({how})")
            return
        if rc == 0 and c.spec.name == self._trainer_name():
            done = "training complete" if c.spec.name == PROC_TRAINER else f"{c.spec.name} complete"
            self._set_state(c, EXITED, f"exit code 0: {done}", ended=True)
            self._begin_shutdown(RUN_COMPLETED, None, done)
            return
        unexpected = exit_account(rc, st.signal)
        if rc == 0:
            unexpected = "exited with code 0 while the run needed it"
        status = KILLED if st.signal else FAILED
        if not self._shutdown and c.spec.restart == "on-failure" and c.failure_restarts < c.spec.max_restarts:
            c.failure_restarts += 1
            st.restarts += 1
            delay = min(MAX_BACKOFF_S, c.spec.restart_backoff_s * 2 ** (c.failure_restarts - 1))
            self._set_state(
                c,
                RESTARTING,
                f"{unexpected}; restart {c.failure_restarts} of {c.spec.max_restarts} in {delay:g} s",
            )
            self._event("failure", c.spec.name, RESTARTING, f"{c.spec.name} {unexpected}", tail=True)
            self._schedule_respawn(c, delay)
            return
        limit = f" after {c.failure_restarts} restart(s)" if c.failure_restarts else ""
        self._set_state(c, status, unexpected + limit, ended=True)
        await self._failed(c, f"{c.spec.name} {unexpected}{limit}")

    async def _failed(self, c: Child, reason: str) -> None:
        self._event("failure", c.spec.name, c.state.status, reason, tail=True)
        self._begin_shutdown(RUN_FAILED, c.spec.name, reason)

    def _schedule_respawn(self, c: Child, delay: float) -> None:
        async def later(term: asyncio.Task[None] | None) -> None:
            if term is not None:
                await asyncio.wait([term])  # old tree gone first: port and GPU memory free
            await asyncio.sleep(delay)
            self._post(("respawn", c.spec.name, None))

        c.respawn_task = self._task(later(c.terminator))

    # ----- stopping -----

    def _begin_shutdown(self, outcome: str, failed: str | None, reason: str, immediate: bool = False) -> None:
        if self._outcome is None:
            self._outcome, self._run.failed_process, self._run.reason = outcome, failed, reason
        first = not self._shutdown
        self._shutdown = True
        if first:
            self._set_run_status(RUN_STOPPING)
        for name in reversed(self._order):  # dependents (trainer) first, then the server
            c = self._children[name]
            if c.respawn_task is not None and not c.respawn_task.done():
                c.respawn_task.cancel()
                if c.state.status == RESTARTING:
                    last = c.state.reason or ""
                    status = KILLED if c.state.signal else FAILED
                    if c.stop_reason == "restart":
                        status = STOPPED
                    self._set_state(c, status, f"{last}; restart cancelled (run {outcome})", ended=True)
            if c.alive:
                why = "kill" if immediate else ("stop" if outcome == RUN_STOPPED else f"run {outcome}")
                if failed is not None and outcome == RUN_FAILED and c.spec.name != failed:
                    why = f"{failed} failed"
                if c.terminator is None or c.terminator.done():
                    self._start_terminator(c, why, immediate=immediate)
                elif immediate:
                    c.sent_kill = True
                    c.escalate.set()
            elif immediate and c.terminator is not None and not c.terminator.done():
                c.escalate.set()
        self._write()

    def _start_terminator(self, c: Child, why: str, immediate: bool = False, leader_gone: bool = False) -> None:
        if not leader_gone:
            c.stop_reason = why
            c.state.stopping = True
            self._write()
        if immediate:
            c.sent_kill = True
            c.escalate.set()
        if c.terminator is not None and not c.terminator.done():
            return
        c.tree.track()
        c.terminator = self._task(self._terminate(c, leader_gone))

    async def _terminate(self, c: Child, leader_gone: bool) -> None:
        try:
            await c.terminate(self.grace_s, leader_gone)
        finally:
            self._post(("reaped", c.name, None))  # wakes the main loop

    async def _kill_everything(self) -> None:
        self._shutdown = True
        for c in self._children.values():
            c.tree.track()
            c.tree.signal(signal.SIGKILL)
            if c.proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.proc.wait(), 5.0)
                rc = c.proc.returncode if c.proc is not None else None
                c.proc = None
                c.state.exit_code, c.state.signal, c.state.ended_at = rc, proctree.signal_name(rc), time.time()
                c.state.status, c.state.reason = KILLED, "SIGKILL by vlmrl (supervisor interrupted)"
        await self._sweep_token()

    async def _sweep_token(self) -> None:
        """Stop anything carrying this run's token that escaped every tree."""
        if not self._token:
            return
        left = await asyncio.to_thread(proctree.processes_with_token, self._token)
        if left:
            self._event("info", None, None, f"stopping {len(left)} leftover process(es) of this run")
            await proctree.stop_processes(left, self.grace_s)

    # ----- state and events -----

    def _set_state(self, c: Child, status: str, reason: str | None, ended: bool = False) -> None:
        st = c.state
        st.status, st.reason = status, reason
        if ended and st.ended_at is None:
            st.ended_at = time.time()
        self._add_history(HistoryEntry(time.time(), c.spec.name, status, reason))
        self._event("state", c.spec.name, status, state_line(st))
        self._write()

    def _add_history(self, entry: HistoryEntry) -> None:
        self._run.history.append(entry)
        del self._run.history[:-HISTORY_MAX]

    def _set_run_status(self, status: str) -> None:
        if self._run.status == status:
            return
        self._run.status, self._run.exit_code = status, RUN_EXIT_CODES.get(status)
        entry = HistoryEntry(time.time(), None, status, self._run.reason)
        self._add_history(entry)
        self._event("run", None, status, entry.line())
        self._write()

    def _event(self, kind: str, proc: str | None, status: str | None, message: str, tail: bool = False) -> None:
        if self.on_event is None:
            return
        log_tail: tuple[str, ...] = ()
        if tail and proc is not None and proc in self._children:
            log_tail = tuple(failure_lines(self._children[proc].spec.log_path, LOG_TAIL_LINES))
        try:
            self.on_event(SupervisorEvent(kind, proc, status, message, log_tail=log_tail))
        except Exception:  # a broken view must not break the run
            pass

    def _write(self) -> None:
        try:
            write_json_atomic(self.rd.run_json, self.snapshot())
            return
        except OSError as e:
            error = e
        if error.errno in (errno.ENOSPC, errno.EDQUOT) and self.rd.space_reserve.exists():
            # a full disk: give up the reserve so that run.json can still say how the run ended
            with contextlib.suppress(OSError):
                self.rd.space_reserve.unlink()
            try:
                write_json_atomic(self.rd.run_json, self.snapshot())
                self._event("info", None, None, f"disk full: freed {RESERVE_BYTES // 1024} KiB reserved "
                            f"in {self.rd.path} to keep run.json current")
                return
            except OSError as e:
                error = e
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(SupervisorEvent("info", None, None, f"cannot write run.json: {error}"))

    def _reserve_space(self) -> None:
        """Hold a little disk space that :meth:`_write` frees when the disk fills up."""
        try:
            with open(self.rd.space_reserve, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                self.rd.space_reserve.unlink()


def exit_account(rc: int, sig: str | None) -> str:
    """An unexpected exit in words, with the likely cause of a SIGKILL nobody in vlmrl sent.

    A process killed by a signal has a negative ``rc`` (and ``sig``); one whose child was
    killed often exits ``128 + signal`` itself (a shell, torchrun, srun): 137 is SIGKILL.
    """
    oom = "; the kernel's OOM killer does this when memory runs out (`dmesg | grep -i oom` tells)"
    if sig:
        return f"killed by {sig} (not sent by vlmrl{oom if sig == 'SIGKILL' else ''})"
    if 128 < rc < 128 + 65:
        try:
            name = signal.Signals(rc - 128).name
        except ValueError:
            return f"exit code {rc}"
        return f"exit code {rc} (128 + {name}: a process under it was killed by {name}" + \
            (f"{oom})" if name == "SIGKILL" else ")")
    return f"exit code {rc}"
