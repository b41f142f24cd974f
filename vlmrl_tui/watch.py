"""Watching a run without Textual: the run-directory tailer, process stats, text helpers.

:class:`RunFeed` is the one reader of a run directory that views use. One
:meth:`RunFeed.poll` returns everything appended since the previous call: log lines per
process (at most the scrollback cap each, the rest counted as skipped), metric and eval
records (parsed), rollout lines, and ``run.json`` (parsed) when it changed. The dashboard's
reader worker posts one poll result as one message and waits until the UI has taken it (one
batch in flight); headless mode asks only for new metrics and evals
(:meth:`RunFeed.new_metrics`, :meth:`RunFeed.new_evals`).

:class:`ProcessSampler` measures CPU% and RSS of each supervised process tree and probes
its health URL (:func:`backend.net.probe_http`, the same probe the supervisor uses).

No Textual here: headless mode, the benchmark and tests drive it directly.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from backend.net import probe_http
from backend.records import EvalRecord, MetricRecord, RunInfo, RunInfoError
from backend.rundir import FileTail, JsonlTail, RunDirectory

DEFAULT_SCROLLBACK = 10_000
MAX_LINE_CHARS = 4_000  # longer lines are cut for display (the file keeps them whole)
READ_CHUNK = 8 * 1024 * 1024  # bytes per FileTail read
READ_BUDGET = 64 * 1024 * 1024  # bytes per log per poll: later bytes wait for the next poll
ATTACH_TAIL_BYTES = 8 * 1024 * 1024  # a big existing log is read from this far before its end

DISCOVER_EVERY = 4  # polls between looks for new log files


@dataclass
class LogChunk:
    """New lines of one log: the newest ``lines`` plus a count of older ones dropped."""

    lines: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.lines) + self.skipped


@dataclass
class RunUpdate:
    """Everything new in a run directory since the previous poll."""

    info: RunInfo | None = None  # run.json, only when it changed
    info_error: str | None = None  # run.json changed but cannot be read (another schema version)
    logs: dict[str, LogChunk] = field(default_factory=dict)
    metrics: list[MetricRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)  # eval.jsonl: held-out evaluations
    rollouts: list[dict[str, Any]] = field(default_factory=list)  # parsed per step when shown
    new_procs: list[str] = field(default_factory=list)  # log files seen for the first time

    def __bool__(self) -> bool:
        return bool(self.info is not None or self.info_error or self.logs or self.metrics or self.evals
                    or self.rollouts or self.new_procs)

    @property
    def line_count(self) -> int:
        return sum(len(c) for c in self.logs.values())


def clean_line(line: str, max_chars: int = MAX_LINE_CHARS) -> str:
    """What a terminal would show of a raw line: the text after the last ``\\r``, cut."""
    if "\r" in line:
        line = line.rsplit("\r", 1)[-1]
    if len(line) > max_chars:
        line = line[:max_chars] + " …"
    return line


class _LogSource:
    """One log file tailed by offset; a big file is entered near its end."""

    def __init__(self, path: Path, tail_bytes: int) -> None:
        self.tail = FileTail(path)
        self._tail_bytes = tail_bytes
        self._started = False
        self._drop_first = False
        self.skipped_on_attach = 0  # bytes never read because the file was entered late

    def read(self, cap: int, max_chars: int) -> LogChunk | None:
        if not self._started:
            self._started = True
            try:
                size = self.tail.path.stat().st_size
            except OSError:
                size = 0
            if size > self._tail_bytes:
                self.tail.offset = size - self._tail_bytes
                self.skipped_on_attach = self.tail.offset
                self._drop_first = True  # the first line read starts mid-line
        lines: list[str] = []
        budget = READ_BUDGET
        skipped = 0
        while budget > 0:
            before = self.tail.offset
            got = self.tail.read_lines(max_bytes=min(READ_CHUNK, budget))
            read = self.tail.offset - before
            if got:
                if self._drop_first:
                    got = got[1:]
                    self._drop_first = False
                lines.extend(got)
                if len(lines) > cap:
                    skipped += len(lines) - cap
                    del lines[: len(lines) - cap]
            budget -= read
            if read < READ_CHUNK:
                break
        if not lines and not skipped:
            return None
        if any(("\r" in ln or len(ln) > max_chars) for ln in lines):
            lines = [clean_line(ln, max_chars) for ln in lines]
        return LogChunk(lines, skipped)


class RunFeed:
    """Incremental reader of one run directory (logs, metrics, evals, rollouts, run.json)."""

    def __init__(
        self,
        run_dir: str | Path,
        scrollback: int = DEFAULT_SCROLLBACK,
        max_line_chars: int = MAX_LINE_CHARS,
        attach_tail_bytes: int = ATTACH_TAIL_BYTES,
    ) -> None:
        self.rd = RunDirectory(run_dir)
        self.scrollback = scrollback
        self.max_line_chars = max_line_chars
        self._attach_tail_bytes = attach_tail_bytes
        self._logs: dict[str, _LogSource] = {}
        self._metrics = JsonlTail(self.rd.metrics)
        self._evals = JsonlTail(self.rd.eval)
        self._rollouts = JsonlTail(self.rd.rollouts)
        self._run_json_stamp: tuple[int, int] | None = None
        self._polls = 0

    def _discover_logs(self) -> list[str]:
        new = [name for name in self.rd.log_names() if name not in self._logs]
        for name in new:
            self._logs[name] = _LogSource(self.rd.log(name), self._attach_tail_bytes)
        return new

    def run_info(self) -> tuple[RunInfo | None, str | None]:
        """``run.json`` parsed when it changed since the last call: (info, None), or
        (None, why) when it cannot be read, or (None, None) when unchanged or missing."""
        try:
            st = self.rd.run_json.stat()
        except OSError:
            return None, None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._run_json_stamp:
            return None, None
        try:
            info = RunInfo.read(self.rd.run_json)
        except RunInfoError as e:
            self._run_json_stamp = stamp
            return None, str(e)
        if info is not None:  # a file not yet whole is read again next time
            self._run_json_stamp = stamp
        return info, None

    def new_metrics(self) -> list[MetricRecord]:
        """Metric records appended since the last call (lines without a step are skipped)."""
        return [m for m in map(MetricRecord.from_json, self._metrics.read()) if m is not None]

    def new_evals(self) -> list[EvalRecord]:
        """Eval records (``eval.jsonl``) appended since the last call; other lines are skipped."""
        return [e for e in map(EvalRecord.from_json, self._evals.read()) if e is not None]

    def poll(self) -> RunUpdate:
        """Read everything appended since the last poll."""
        self._polls += 1
        # New log files are rare (a process's first start): look for them every few polls.
        new = self._discover_logs() if self._polls % DISCOVER_EVERY == 1 or not self._logs else []
        update = RunUpdate(new_procs=new)
        update.info, update.info_error = self.run_info()
        for name, source in self._logs.items():
            chunk = source.read(self.scrollback, self.max_line_chars)
            if chunk is not None:
                update.logs[name] = chunk
        update.metrics = self.new_metrics()
        update.evals = self.new_evals()
        update.rollouts = self._rollouts.read()
        return update


_ANSI_RE = re.compile(r"\x1b\[[0-9;:?<=>]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def strip_ansi(line: str) -> str:
    """The text of a line without terminal escape sequences."""
    return _ANSI_RE.sub("", line) if "\x1b" in line else line


def display_path(path: str | Path) -> str:
    """A path as the user typed it: relative to the working directory when under it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p.resolve()) if not p.is_absolute() else str(p)


# --------------------------------------------------------------------------- process stats


@dataclass(frozen=True)
class ProcSample:
    """Resource use of one supervised process (and its children) at one instant."""

    pid: int | None
    alive: bool
    cpu_percent: float | None = None  # % of one core, summed over the process tree
    rss_bytes: int | None = None
    health_ms: float | None = None  # latency of its health URL (server only)
    health_ok: bool | None = None


class ProcessSampler:
    """CPU%, RSS (process tree) and health latency; call :meth:`sample` from a worker thread."""

    def __init__(self, health_timeout_s: float = 1.0, health_every_s: float = 5.0,
                 tree_every_s: float = 5.0) -> None:
        self.health_timeout_s = health_timeout_s
        self.health_every_s = health_every_s
        self.tree_every_s = tree_every_s
        self._procs: dict[int, Any] = {}
        self._trees: dict[int, tuple[float, list[int]]] = {}  # root pid -> (when, descendant pids)
        self._health: dict[str, tuple[bool, float | None]] = {}
        self._last_probe = -1e9

    def _descendants(self, root: Any) -> list[int]:
        """Descendants of ``root``, found again every ``tree_every_s`` (a scan of all processes)."""
        now = time.monotonic()
        when, pids = self._trees.get(root.pid, (-1e9, []))
        if now - when >= self.tree_every_s:
            pids = [c.pid for c in root.children(recursive=True)]
            self._trees[root.pid] = (now, pids)
        return pids

    def _tree_usage(self, pid: int) -> tuple[bool, float | None, int | None]:
        import psutil

        try:
            root = self._proc(pid)
            if not root.is_running() or root.status() == psutil.STATUS_ZOMBIE:
                self._forget(pid)
                return False, None, None
            members = [root]
            for child in self._descendants(root):
                try:
                    members.append(self._proc(child))
                except psutil.Error:
                    self._forget(child)
        except psutil.Error:
            self._forget(pid)
            return False, None, None
        cpu, rss = 0.0, 0
        for p in members:
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
            except psutil.Error:
                self._forget(p.pid)
        return True, cpu, rss

    def _forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
        self._trees.pop(pid, None)

    def _proc(self, pid: int) -> Any:
        import psutil

        p = self._procs.get(pid)
        if p is None:
            p = self._procs[pid] = psutil.Process(pid)
            p.cpu_percent(None)  # first call starts the measurement
        return p

    def health(self, url: str) -> tuple[bool, float | None]:
        """(answered 200, latency in ms) for one GET of ``url``."""
        probe = probe_http(url, self.health_timeout_s)
        return probe.ok, probe.latency_ms if probe.ok else None

    def sample(self, pids: Mapping[str, int], health: Mapping[str, str]) -> dict[str, ProcSample]:
        """CPU/RSS of every live process; health once per ``health_every_s`` (each probe is a
        line in the server's log, and the supervisor probes it too)."""
        now = time.monotonic()
        probe = now - self._last_probe >= self.health_every_s
        if probe:
            self._last_probe = now
        out: dict[str, ProcSample] = {}
        for name, pid in pids.items():
            alive, cpu, rss = self._tree_usage(pid)
            if alive and name in health and probe:
                self._health[name] = self.health(health[name])
            elif not alive or name not in health:
                self._health.pop(name, None)
            ok, ms = self._health.get(name, (None, None))
            out[name] = ProcSample(pid, alive, cpu, rss, ms, ok)
        return out
