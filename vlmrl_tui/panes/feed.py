"""Reads what is new in a run directory, off the UI thread, in bounded batches.

One :meth:`RunFeed.poll` returns everything appended since the previous call: log
lines per process (at most the scrollback cap each, the rest counted as skipped),
metrics and rollout records, and ``run.json`` when it changed. The app's reader
worker posts one poll result as one message and waits until the UI has taken it
(one batch in flight), so a slow UI never lets batches pile up in memory.

No Textual here: the benchmark and tests drive it directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.rundir import FileTail, JsonlTail, RunDirectory, read_json

DEFAULT_SCROLLBACK = 10_000
MAX_LINE_CHARS = 4_000  # longer lines are cut for display (the file keeps them whole)
READ_CHUNK = 8 * 1024 * 1024  # bytes per FileTail read
READ_BUDGET = 64 * 1024 * 1024  # bytes per log per poll: later bytes wait for the next poll
ATTACH_TAIL_BYTES = 8 * 1024 * 1024  # a big existing log is read from this far before its end

DISCOVER_EVERY = 4  # polls between looks for new log files

PROCESS_ORDER = ("prepare", "server", "trainer", "supervisor")


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

    info: dict[str, Any] | None = None  # run.json, only when it changed
    logs: dict[str, LogChunk] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    new_procs: list[str] = field(default_factory=list)  # log files seen for the first time

    def __bool__(self) -> bool:
        return bool(self.info is not None or self.logs or self.metrics or self.rollouts or self.new_procs)

    @property
    def line_count(self) -> int:
        return sum(len(c) for c in self.logs.values())


def proc_sort_key(name: str) -> tuple[int, str]:
    """prepare, server, trainer, supervisor, then the rest by name."""
    return (PROCESS_ORDER.index(name) if name in PROCESS_ORDER else len(PROCESS_ORDER), name)


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
    """Incremental reader of one run directory (logs, metrics, rollouts, run.json)."""

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
        self._rollouts = JsonlTail(self.rd.rollouts)
        self._run_json_stamp: tuple[int, int] | None = None
        self._polls = 0

    @property
    def procs(self) -> list[str]:
        return sorted(self._logs, key=proc_sort_key)

    def _discover_logs(self) -> list[str]:
        new: list[str] = []
        try:
            entries = list(self.rd.logs_dir.glob("*.log"))
        except OSError:
            return new
        for path in entries:
            if path.stem not in self._logs:
                self._logs[path.stem] = _LogSource(path, self._attach_tail_bytes)
                new.append(path.stem)
        return sorted(new, key=proc_sort_key)

    def _read_run_json(self) -> dict[str, Any] | None:
        try:
            st = self.rd.run_json.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._run_json_stamp:
            return None
        info = read_json(self.rd.run_json)
        if info is not None:  # a half-written file is read again next time
            self._run_json_stamp = stamp
        return info

    def poll(self) -> RunUpdate:
        """Read everything appended since the last poll."""
        self._polls += 1
        # New log files are rare (a process's first start): look for them every few polls.
        new = self._discover_logs() if self._polls % DISCOVER_EVERY == 1 or not self._logs else []
        update = RunUpdate(new_procs=new)
        update.info = self._read_run_json()
        for name, source in self._logs.items():
            chunk = source.read(self.scrollback, self.max_line_chars)
            if chunk is not None:
                update.logs[name] = chunk
        update.metrics = self._metrics.read()
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
