"""Headless mode: ``vlmrl run CONFIG`` and ``vlmrl attach RUN_DIR`` for tmux, SLURM and CI.

Shows a progress bar per step fed from ``metrics.jsonl`` (plain lines when stdout is not
a terminal), one line per logged step (``step 12/100 reward=0.62 loss=0.045 ir=1.02
ent=2.34 kl=0.01 4.1s/it``), one line per held-out evaluation from ``eval.jsonl`` (``eval
step 20: reward 0.812 (n=32)``), one line per process state change, and the last log lines
of a process that fails. Exit codes: 0 training completed, 1 a process failed, 2 bad
config or failed preflight, 130 interrupted (Ctrl-C once: graceful stop; twice: kill),
143 stopped by SIGTERM (scancel).

Never imports Textual; rich is used for the bar only on a terminal.
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from backend.config import VlmrlConfig
from backend.errors import VlmrlError
from backend.records import (
    EXIT_BAD_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SIGTERM,
    REWARD_MEAN,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_PREPARING,
    RUN_RUNNING,
    RUN_STARTING,
    RUN_STOPPED,
    RUN_STOPPING,
    RUN_TERMINAL,
    STARTING,
    EvalRecord,
    MetricRecord,
    RunInfo,
    state_line,
    step_line,
)
from backend.rundir import RunDirectory, failure_lines, last_lines
from vlmrl_tui.plan import Placement, RunPlan, build_plan, format_plan, run_dir_problem
from vlmrl_tui.proctree import record_lost, supervisor_alive
from vlmrl_tui.supervisor import LOG_TAIL_LINES, Supervisor, SupervisorEvent
from vlmrl_tui.watch import RunFeed, strip_ansi

POLL_S = 0.5
STARTING_NOTE_S = 30.0
#: what the progress bar says in each run status
PHASES = {RUN_PREPARING: "preparing model", RUN_STARTING: "starting server", RUN_RUNNING: "training",
          RUN_STOPPING: "stopping"}
ATTACH_BACKLOG = 50
ATTACH_EVAL_BACKLOG = 10


class RunDirError(VlmrlError):
    """The directory given to ``vlmrl attach`` is not a run directory."""

    exit_code = EXIT_BAD_CONFIG


def _fmt_duration(s: float) -> str:
    s = int(max(0, s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class HeadlessView:
    """Prints a run: step lines (and a rich bar on a terminal), state changes, failures."""

    def __init__(self, max_steps: int, out: TextIO | None = None, tty: bool | None = None,
                 feed: RunFeed | None = None) -> None:
        self.out = out or sys.stdout
        self.feed = feed
        self.tty = self.out.isatty() if tty is None else tty
        self.max_steps = max_steps
        self.last_step = 0
        self.last_metrics: MetricRecord | None = None
        self.last_eval: EvalRecord | None = None
        self._last_time: float | None = None
        self._progress: Any = None
        self._task: Any = None
        self._console: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._console = Console(file=self.out, highlight=False)
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self._console,
                transient=False,
            )
            self._task = self._progress.add_task("starting", total=max_steps or None, info="")

    def __enter__(self) -> "HeadlessView":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def line(self, text: str, ansi: bool = False) -> None:
        """Print one line above the bar; ``ansi``: the text may hold colour codes (log lines)."""
        if self._console is not None:
            if ansi:
                from rich.text import Text

                self._console.print(Text.from_ansi(text), soft_wrap=True)
            else:
                self._console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.out.write((strip_ansi(text) if ansi else text) + "\n")
            self.out.flush()

    def phase(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def metrics(self, items: list[MetricRecord] | list[Mapping[str, Any]], backlog: int | None = None) -> None:
        """Show new metric records; with ``backlog``, only the last ``backlog`` get a line."""
        records = [m for m in map(MetricRecord.from_json, items) if m is not None]
        if backlog is not None and len(records) > backlog:
            self.line(f"... {len(records) - backlog} earlier step(s)")
            shown, skipped = records[-backlog:], records[:-backlog]
            for rec in skipped:
                self._advance(rec)
            records = shown
        for rec in records:
            now = time.monotonic()
            dt = now - self._last_time if self._last_time is not None else None
            self._last_time = now
            self.line(step_line(rec, self.max_steps, dt))
            self._advance(rec)

    def evals(self, items: list[EvalRecord] | list[Mapping[str, Any]], backlog: int | None = None) -> None:
        """One line per new eval record; with ``backlog``, only the last ``backlog`` get a line."""
        records = [e if isinstance(e, EvalRecord) else EvalRecord.from_json(e) for e in items]
        shown = [e for e in records if e is not None]
        if backlog is not None and len(shown) > backlog:
            self.line(f"... {len(shown) - backlog} earlier eval(s)")
            shown = shown[-backlog:]
        for ev in shown:
            self.line(eval_line(ev))
            self.last_eval = ev

    def _advance(self, rec: MetricRecord) -> None:
        self.last_step = rec.step
        self.last_metrics = rec
        if self._progress is not None:
            r = rec.get(REWARD_MEAN)
            info = f"reward={r:.2f}" if r is not None and math.isfinite(r) else ""
            self._progress.update(self._task, completed=self.last_step, description="training", info=info)

    def drain(self) -> None:
        """Show the metric and eval records written since the last call."""
        if self.feed is not None:
            recs = self.feed.new_metrics()
            if recs:
                self.metrics(recs)
            evals = self.feed.new_evals()  # after the metrics: a step's eval is written after its metrics
            if evals:
                self.evals(evals)

    def event(self, ev: SupervisorEvent) -> None:
        """A supervisor event (``vlmrl run``)."""
        self.drain()  # steps logged before this change are shown before it
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.time))
        if ev.kind == "failure":
            if ev.log_tail:
                self.log_tail(ev.proc or "?", list(ev.log_tail))
            return
        if ev.kind == "run":
            self.phase(PHASES.get(ev.status or "", ev.status or ""))
        self.line(f"{stamp} {ev.message}")

    def log_tail(self, proc: str, lines: list[str]) -> None:
        self.line(f"--- last {len(lines)} lines of {proc}.log ---")
        for ln in lines:
            self.line("  " + ln, ansi=True)
        self.line(f"--- end of {proc}.log ---")

    def summary(self, info: RunInfo | None, code: int, run_dir: Path) -> None:
        started = info.started_at if info is not None else None
        ended = (info.ended_at if info is not None else None) or time.time()
        took = f" in {_fmt_duration(ended - started)}" if started is not None else ""
        steps = f"{self.last_step}/{self.max_steps} steps" if self.max_steps else f"{self.last_step} steps"
        last = ""
        if self.last_metrics is not None:
            r = self.last_metrics.get(REWARD_MEAN)
            if r is not None and math.isfinite(r):
                last = f", last reward={r:.2f}"
        if self.last_eval is not None and math.isfinite(self.last_eval.accuracy):
            last += f", eval reward={self.last_eval.accuracy:.2f} at step {self.last_eval.step}"
        status = info.status if info is not None else "?"
        reason = info.reason if info is not None else None
        head = {EXIT_OK: RUN_COMPLETED, EXIT_FAILED: RUN_FAILED, EXIT_INTERRUPTED: RUN_STOPPED,
                EXIT_SIGTERM: RUN_STOPPED}.get(code, status)
        why = f" ({reason})" if reason and code != 0 else ""
        self.line(f"{head}{why}: {steps}{took}{last} - {run_dir}")


def eval_line(ev: EvalRecord) -> str:
    """``eval step 20: reward 0.812 ± 0.390 (n=32)`` (no ``±`` when the record has no std)."""
    std = f" ± {ev.std:.3f}" if ev.std is not None else ""
    return f"eval step {ev.step}: reward {ev.accuracy:.3f}{std} (n={ev.n})"


# ----- vlmrl run -----


def run_headless(cfg: VlmrlConfig, config_path: str | Path | None, dry_run: bool = False, resume: bool = False,
                 placement: Placement | None = None) -> int:
    """``vlmrl run``: plan, preflight, supervise; returns the exit code (``placement``: inside
    a SLURM job, vlmrl_tui/slurm.py)."""
    plan = build_plan(cfg, config_path, resume=resume, placement=placement)
    if dry_run:
        print(format_plan(plan))
        return 0
    problem = run_dir_problem(plan.run_dir, resume)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from vlmrl_tui.doctor import FAIL, WARN, format_check, run_checks

    checks = run_checks(cfg, fast_only=True, plan=plan)
    failed = [c for c in checks if c.status == FAIL]
    noted = {n.message for n in plan.notes}  # run_plan prints these once
    for c in checks:
        if c.status in (WARN, FAIL) and c.name != "run dir" and c.message not in noted:
            print(format_check(c), file=sys.stderr if c.status == FAIL else sys.stdout)
    if failed:
        print(f"error: refusing to start: {len(failed)} preflight check(s) failed "
              f"(`vlmrl doctor {config_path or 'CONFIG'}` shows every check)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return run_plan(plan)


def run_plan(plan: RunPlan, *, out: TextIO | None = None, tty: bool | None = None, grace_s: float | None = None) -> int:
    """Supervise ``plan`` with the headless view; handles Ctrl-C/SIGTERM; returns the exit code."""
    view = HeadlessView(plan.max_steps, out=out, tty=tty, feed=RunFeed(plan.run_dir))
    view.line(f"run {plan.name} -> {plan.run_dir}")
    for note in plan.notes:
        view.line(f"warn  {note.message}")
    with view:
        return asyncio.run(_supervise(plan, view, grace_s))


async def _supervise(plan: RunPlan, view: HeadlessView, grace_s: float | None) -> int:
    sup = Supervisor(plan, on_event=view.event, grace_s=grace_s)
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        if len(received) == 1:
            name = signal.Signals(sig).name
            view.line(f"{name}: stopping both processes (SIGTERM, SIGKILL after {sup.grace_s:g} s) - "
                      "press Ctrl-C again to kill them now")
            sup.request_stop()
        else:
            view.line("killing both processes now (SIGKILL)")
            sup.kill()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for s in handled:
        loop.add_signal_handler(s, on_signal, s)
    follow = asyncio.create_task(_follow_metrics(view))
    waiting = asyncio.create_task(_starting_notes(sup, view))
    try:
        code = await sup.run()
    finally:
        for s in handled:
            loop.remove_signal_handler(s)
        follow.cancel()
        waiting.cancel()
        view.drain()
    if code == EXIT_INTERRUPTED and received and received[0] == signal.SIGTERM:
        code = EXIT_SIGTERM
    view.summary(sup.info(), code, plan.run_dir)
    return code


async def _starting_notes(sup: Supervisor, view: HeadlessView) -> None:
    """A line every ``STARTING_NOTE_S`` while a process is still starting, with its last log line."""
    every_s = STARTING_NOTE_S
    due: dict[tuple[str, float], float] = {}
    while True:
        await asyncio.sleep(min(1.0, every_s))
        now = time.time()
        for p in sup.info().procs():
            started = p.started_at
            if p.status != STARTING or started is None:
                continue
            key = (p.name, started)
            if now < due.setdefault(key, started + every_s):
                continue
            due[key] += every_s
            tail = last_lines(p.log, 1)
            last = f"; last log line: {tail[-1].strip()[:160]}" if tail else ""
            view.line(time.strftime("%H:%M:%S ") + f"{p.name}: still starting after {int(now - started)} s{last}",
                      ansi=True)


async def _follow_metrics(view: HeadlessView) -> None:
    while True:
        view.drain()
        await asyncio.sleep(POLL_S)


# ----- vlmrl attach -----


def attach_headless(run_dir: str | Path, *, out: TextIO | None = None, tty: bool | None = None,
                    poll_s: float = POLL_S, follow: bool = True) -> int:
    """``vlmrl attach``: the headless view of a run started elsewhere, live or finished.

    Returns the run's exit code once it ends (0/1/130), 1 if its supervisor vanished
    without finishing, 130 when detached with Ctrl-C (the run goes on).
    """
    rd = RunDirectory(run_dir)
    info = rd.run_info() if rd.exists() else None
    if info is None:
        raise RunDirError(f"{run_dir} is not a run directory (no run.json); start one with `vlmrl run CONFIG`")
    view = HeadlessView(info.max_steps or 0, out=out, tty=tty)
    feed = RunFeed(rd.path)
    feed.run_info()  # the state read above: only later changes are news
    view.line(f"attached to {info.name or rd.path.name} ({rd.path}), supervisor pid "
              f"{info.supervisor_pid}, status {info.status}")
    for h in info.history:
        view.line(f"{time.strftime('%H:%M:%S', time.localtime(h.time))} {h.line()}")
    seen = {p.name: (p.status, p.reason) for p in info.procs()}
    seen_run = info.status
    with view:
        view.metrics(feed.new_metrics(), backlog=ATTACH_BACKLOG)
        view.evals(feed.new_evals(), backlog=ATTACH_EVAL_BACKLOG)
        try:
            while True:
                if info.finished:
                    view.metrics(feed.new_metrics())
                    view.evals(feed.new_evals())
                    return _attach_end(view, info, rd)
                if not follow:
                    return 0
                if not supervisor_alive(info):
                    info, _ = record_lost(rd, info)  # its own last words, or the account of its end
                    continue  # ended either way: reported as any finished run
                time.sleep(poll_s)
                view.metrics(feed.new_metrics())
                view.evals(feed.new_evals())
                new, error = feed.run_info()
                if error is not None:
                    raise RunDirError(error)
                if new is None:
                    continue
                info = new
                for p in info.procs():
                    if seen.get(p.name) != (p.status, p.reason):
                        seen[p.name] = (p.status, p.reason)
                        view.line(time.strftime("%H:%M:%S ") + state_line(p))
                if info.status != seen_run:
                    seen_run = info.status
                    view.phase(seen_run)
                    if seen_run not in RUN_TERMINAL:
                        view.line(time.strftime("%H:%M:%S ") + f"run: {seen_run}")
        except KeyboardInterrupt:
            view.line("detached; the run goes on")
            return EXIT_INTERRUPTED


def _attach_end(view: HeadlessView, info: RunInfo, rd: RunDirectory) -> int:
    code = info.exit_code if info.exit_code is not None else EXIT_FAILED
    if info.failed_process:
        view.log_tail(info.failed_process, failure_lines(rd.log(info.failed_process), LOG_TAIL_LINES))
    view.line(f"run: {info.status}" + (f" - {info.reason}" if info.reason else ""))
    view.summary(info, code, rd.path)
    return code


__all__ = ["run_headless", "run_plan", "attach_headless", "HeadlessView", "eval_line", "step_line"]
