"""Processes pane: server and trainer with state, pid, uptime, restarts, health, CPU and RSS.

State, pids, times and exit codes come from ``run.json`` (written by the supervisor).
CPU% and RSS (summed over each process tree, so vLLM workers and torchrun ranks count)
and the server's ``/health`` latency are sampled by :class:`ProcessSampler` on a worker
thread; the pane only renders.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from vlmrl_tui.panes.feed import proc_sort_key
from vlmrl_tui.panes.messages import ProcessSelected, ProcSample
from vlmrl_tui.panes.table import RowTable

# States a process can be in (run.json) and how they look.
STATE_STYLES: dict[str, str] = {
    "pending": "dim",
    "starting": "yellow",
    "healthy": "bold green",
    "running": "green",
    "restarting": "bold yellow",
    "exited": "cyan",
    "completed": "cyan",
    "failed": "bold red",
    "killed": "bold red",
    "stopped": "dim",
    "stopping": "yellow",
}
LIVE_STATES = frozenset({"starting", "healthy", "running", "restarting", "stopping"})
TERMINAL_RUN_STATES = frozenset({"completed", "failed", "stopped"})


def _time(v: Any) -> float | None:
    """Epoch seconds from a number or an ISO-8601 string."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str) and v:
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class ProcView:
    """One process as run.json describes it."""

    name: str
    state: str
    pid: int | None
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    restarts: int
    health_url: str | None = None
    signal: str | None = None  # "SIGKILL" when a signal ended it
    health: str | None = None  # the supervisor's probe: "ok" | "failing" | None
    reason: str | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def state_text(self) -> Text:
        label = self.state
        if self.state in ("exited", "failed") and self.signal:
            label = f"{self.state}({self.signal})"
        elif self.state in ("exited", "failed") and self.exit_code is not None:
            label = f"{self.state}({self.exit_code})"
        elif self.state == "killed" and self.signal:
            label = f"killed({self.signal})"
        return Text(label, style=STATE_STYLES.get(self.state, ""))

    def uptime(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        end = now if self.live or self.ended_at is None else self.ended_at
        return max(0.0, end - self.started_at)


@dataclass(frozen=True)
class RunView:
    """run.json as the pane needs it."""

    name: str
    status: str
    supervisor_pid: int | None
    started_at: float | None
    ended_at: float | None
    server_url: str | None
    procs: tuple[ProcView, ...]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_RUN_STATES

    def proc(self, name: str) -> ProcView | None:
        return next((p for p in self.procs if p.name == name), None)

    def pids(self) -> dict[str, int]:
        """Pids of the processes that are alive now."""
        return {p.name: p.pid for p in self.procs if p.live and p.pid is not None}


def parse_run_info(info: Mapping[str, Any]) -> RunView:
    """Read run.json (as the supervisor writes it) leniently: missing keys become None."""
    procs_raw = info.get("processes") or {}
    if isinstance(procs_raw, list):
        procs_raw = {str(p.get("name", i)): p for i, p in enumerate(procs_raw) if isinstance(p, dict)}
    procs: list[ProcView] = []
    for name, p in procs_raw.items():
        if not isinstance(p, dict):
            continue
        procs.append(
            ProcView(
                name=str(name),
                state=str(p.get("status") or p.get("state") or "pending"),
                pid=_int(p.get("pid")),
                started_at=_time(p.get("started_at")),
                ended_at=_time(p.get("ended_at") or p.get("exited_at") or p.get("stopped_at")),
                exit_code=_int(p.get("exit_code", p.get("returncode"))),
                restarts=_int(p.get("restarts")) or 0,
                health_url=p.get("health_url") if isinstance(p.get("health_url"), str) else None,
                signal=p.get("signal") if isinstance(p.get("signal"), str) else None,
                health=p.get("health") if isinstance(p.get("health"), str) else None,
                reason=p.get("reason") if isinstance(p.get("reason"), str) else None,
            )
        )
    procs.sort(key=lambda p: proc_sort_key(p.name))
    return RunView(
        name=str(info.get("name") or info.get("run_name") or ""),
        status=str(info.get("status") or "unknown"),
        supervisor_pid=_int(info.get("supervisor_pid")),
        started_at=_time(info.get("started_at")),
        ended_at=_time(info.get("ended_at") or info.get("stopped_at")),
        server_url=info.get("server_url") if isinstance(info.get("server_url"), str) else None,
        procs=tuple(procs),
    )


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProcessSampler:
    """CPU%, RSS (process tree) and /health latency; call :meth:`sample` from a worker."""

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
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=self.health_timeout_s) as resp:
                ok = resp.status == 200
                resp.read(256)
        except (urllib.error.URLError, OSError, ValueError):
            return False, None
        return ok, (time.perf_counter() - t0) * 1000.0

    def sample(self, pids: Mapping[str, int], health: Mapping[str, str]) -> dict[str, ProcSample]:
        """CPU/RSS of every live process; /health once per ``health_every_s`` (each probe is a
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


class ProcessesPane(Vertical):
    """A header line for the run and one table row per supervised process."""

    DEFAULT_CSS = """
    ProcessesPane { height: auto; }
    ProcessesPane #run-header { height: 1; padding: 0 1; }
    ProcessesPane #proc-table { height: auto; padding: 0 1; overflow-y: hidden; }
    """

    # Fixed widths: a cell whose text grows never re-lays out the screen.
    COLUMNS = ("process", "state", "pid", "uptime", "restarts", "health", "CPU%", "RSS")
    WIDTHS = (10, 15, 7, 7, 8, 8, 5, 9)

    def __init__(self, clock: Callable[[], float] = time.time, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.clock = clock
        self.run: RunView | None = None
        self.samples: dict[str, ProcSample] = {}
        self._header: Text | None = None
        self._header_line = Static("waiting for run.json…", id="run-header")
        self.table = RowTable(self.COLUMNS, self.WIDTHS, id="proc-table")

    def compose(self) -> ComposeResult:
        yield self._header_line
        yield self.table

    @property
    def selected_proc(self) -> str | None:
        """The process under the table's cursor."""
        rows = self.table.rows
        return rows[self.table.cursor_row] if rows else None

    def select(self, proc: str) -> None:
        if proc in self.table.rows:
            self.table.move_cursor(self.table.get_row_index(proc))

    def update_info(self, info: Mapping[str, Any]) -> None:
        """New run.json content."""
        self.run = parse_run_info(info)
        self._refresh_rows()

    def apply_stats(self, samples: Mapping[str, ProcSample]) -> None:
        """New CPU/RSS/health samples."""
        self.samples = dict(samples)
        self._refresh_rows()

    def header_text(self) -> Text:
        run = self.run
        if run is None:
            return Text("waiting for run.json…", style="dim")
        style = {"failed": "bold red", "completed": "bold cyan", "stopped": "dim"}.get(run.status, "bold green")
        text = Text.assemble(("run ", "dim"), (run.name or "?", "bold"), " · ", (run.status, style))
        if run.supervisor_pid is not None:
            text.append(f" · supervisor pid {run.supervisor_pid}", style="dim")
        if run.started_at is not None:
            end = run.ended_at if run.finished and run.ended_at else self.clock()
            text.append(f" · {format_uptime(end - run.started_at)}", style="dim")
        return text

    def _row(self, p: ProcView) -> list[Any]:
        s = self.samples.get(p.name) if p.live else None
        if s is not None and s.pid != p.pid:
            s = None
        health: Any = "—"
        if s is not None and s.health_ok is not None:
            health = Text(f"{s.health_ms:.0f} ms", style="green") if s.health_ok and s.health_ms is not None \
                else Text("down", style="red")
        elif p.live and p.health == "failing":
            health = Text("failing", style="red")
        return [
            Text(p.name, style="bold"),
            p.state_text(),
            str(p.pid) if p.pid is not None else "—",
            format_uptime(p.uptime(self.clock())),
            str(p.restarts),
            health,
            f"{s.cpu_percent:.0f}" if s is not None and s.cpu_percent is not None else "—",
            format_bytes(s.rss_bytes) if s is not None and s.rss_bytes is not None else "—",
        ]

    def _refresh_rows(self) -> None:
        header = self.header_text()
        if header != self._header:
            self._header = header
            self._header_line.update(header, layout=False)
        if self.run is None:
            return
        table = self.table
        first_fill = table.row_count == 0
        for p in self.run.procs:
            values = self._row(p)
            if p.name not in table.rows:
                table.add_row(*values, key=p.name)
            else:
                for col, value in zip(self.COLUMNS, values):
                    if table.get_cell(p.name, col) != value:
                        table.update_cell(p.name, col, value)
        if first_fill and "server" in table.rows:
            self.select("server")  # not the one-shot prepare step: r/K act on the cursor row

    @on(RowTable.Highlighted, "#proc-table")
    def _highlighted(self, event: RowTable.Highlighted) -> None:
        event.stop()
        self.post_message(ProcessSelected(event.key))
