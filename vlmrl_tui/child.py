"""One supervised child: starting it, probing its health, stopping its process tree.

:class:`Child` holds the mechanics of one :class:`~vlmrl_tui.plan.ProcessSpec`: the
process it started, the :class:`~backend.records.ProcessInfo` that ``run.json`` shows for
it, its process tree, and the tasks that stop it. Decisions (when to start, restart or
stop it, what a run status becomes) are the supervisor's; a child reports what happened
through the supervisor's inbox (:data:`Post`).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

from backend.net import probe_http
from backend.records import ProcessInfo
from vlmrl_tui import proctree
from vlmrl_tui.plan import ProcessSpec

#: how a child reports to the supervisor's loop: ``post((kind, name, arg))``, thread-safe
Post = Callable[[tuple[Any, ...]], None]


class Child:
    """Runtime bookkeeping for one process spec."""

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.state = ProcessInfo(name=spec.name, argv=list(spec.argv), log=str(spec.log_path),
                                 health_url=spec.health_url)
        self.proc: asyncio.subprocess.Process | None = None
        self.gen = 0  # start count as seen by the tasks of one start (stale messages are dropped)
        self.starts = 0
        self.failure_restarts = 0
        self.stop_reason: str | None = None  # why we are stopping it (None: we are not)
        self.sent_kill = False
        self.hold = False  # stopped on request: do not start it again by itself
        self.tree = proctree.ProcessTree()
        self.terminator: asyncio.Task[None] | None = None
        self.escalate = asyncio.Event()
        self.respawn_task: asyncio.Task[None] | None = None
        self.done = False  # one-shot finished

    @property
    def alive(self) -> bool:
        return self.proc is not None

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self, preexec: Callable[[], None] | None) -> str | None:
        """Start the process (its output appended to its log); the reason if it cannot start.

        A restart runs ``restart_argv`` (the trainer resumes from its checkpoint).
        """
        spec = self.spec
        argv = list(spec.restart_argv) if (self.starts > 0 and spec.restart_argv) else list(spec.argv)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            attempt = f" (restart {self.state.restarts})" if self.starts else ""
            os.write(fd, f"--- vlmrl: starting {spec.name}{attempt} at {stamp}\n".encode())
            self.starts += 1
            self.state.argv = argv
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=str(spec.cwd), env=dict(spec.env), stdin=asyncio.subprocess.DEVNULL, stdout=fd,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=preexec,
                )
            except OSError as e:
                os.write(fd, f"--- vlmrl: cannot start {spec.name}: {e}\n".encode())
                return str(e)
        finally:
            os.close(fd)
        self.gen += 1
        self.proc = proc
        self.stop_reason = None
        self.sent_kill = False
        self.escalate = asyncio.Event()
        self.tree = proctree.ProcessTree(proc.pid, proc.pid)
        st = self.state
        st.pid, st.pgid = proc.pid, proc.pid
        st.started_at, st.healthy_at, st.ended_at = time.time(), None, None
        st.exit_code = st.signal = None
        st.stopping = False
        st.health = None
        return None

    def exited(self, rc: int) -> None:
        """Record the exit of the process (``rc`` in the Popen convention)."""
        self.proc = None
        st = self.state
        st.exit_code, st.signal, st.ended_at = rc, proctree.signal_name(rc), time.time()
        st.stopping = False

    async def watch_exit(self, post: Post, gen: int, proc: asyncio.subprocess.Process) -> None:
        """Post ``("exit", name, (gen, rc))`` when ``proc`` (start number ``gen``) ends."""
        rc = await proc.wait()
        post(("exit", self.name, (gen, rc)))

    async def watch_health(self, post: Post, gen: int, poll_s: float) -> None:
        """Probe the health URL (then the models URL) every ``poll_s`` until healthy, and
        after that report each change; posts ``healthy``, ``start_timeout`` and ``health``
        for start number ``gen`` (and stops once the child started again or stopped)."""
        spec = self.spec
        assert spec.health_url is not None
        t0 = time.monotonic()
        timeout = spec.start_timeout_s or float("inf")
        probe_s = max(1.0, min(5.0, poll_s * 2))
        healthy = False
        last_ok: bool | None = None

        async def probe(url: str) -> bool:
            return (await asyncio.to_thread(probe_http, url, probe_s)).ok

        while self.gen == gen and self.alive and self.stop_reason is None:
            ok = await probe(spec.health_url)
            if ok and spec.models_url and not healthy:
                ok = await probe(spec.models_url)
            if self.gen != gen or not self.alive:
                return
            if not healthy:
                if ok:
                    healthy = True
                    post(("healthy", spec.name, (gen, time.monotonic() - t0)))
                elif time.monotonic() - t0 > timeout:
                    post(("start_timeout", spec.name, (gen, timeout)))
                    return
            elif ok != last_ok:
                post(("health", spec.name, (gen, ok)))
            last_ok = ok
            await asyncio.sleep(poll_s)

    async def terminate(self, grace_s: float, leader_gone: bool) -> None:
        """SIGTERM the group and tree, wait up to ``grace_s``, SIGKILL what is left (at once
        once :attr:`escalate` is set). With ``leader_gone`` and nothing left, nothing is sent."""
        if leader_gone and not self.tree.remaining():
            return

        def killing() -> None:
            self.sent_kill = True

        await proctree.terminate(self.tree, grace_s, self.escalate, killing)
