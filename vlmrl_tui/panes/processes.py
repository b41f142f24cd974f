"""Processes pane: server and trainer with state, pid, uptime, restarts, health, CPU and RSS.

State, pids, times and exit codes come from ``run.json`` (:class:`~backend.records.RunInfo`,
parsed once by the feed). CPU% and RSS (summed over each process tree, so vLLM workers and
torchrun ranks count) and the server's health latency are sampled by
:class:`~vlmrl_tui.watch.ProcessSampler` on a worker thread; the pane only renders.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from backend import records
from backend.records import ProcessInfo, RunInfo
from vlmrl_tui.panes.messages import ProcessSelected
from vlmrl_tui.panes.table import RowTable
from vlmrl_tui.watch import ProcSample

# How each process status looks.
STATE_STYLES: dict[str, str] = {
    records.PENDING: "dim",
    records.STARTING: "yellow",
    records.HEALTHY: "bold green",
    records.RUNNING: "green",
    records.RESTARTING: "bold yellow",
    records.EXITED: "cyan",
    records.FAILED: "bold red",
    records.KILLED: "bold red",
    records.STOPPED: "dim",
}
RUN_STYLES: dict[str, str] = {records.RUN_FAILED: "bold red", records.RUN_COMPLETED: "bold cyan",
                              records.RUN_STOPPED: "dim"}


def state_text(p: ProcessInfo) -> Text:
    """``failed(SIGKILL)``, ``exited(0)``, ``healthy``... in the status's colour."""
    label = p.status
    if p.status in (records.EXITED, records.FAILED) and p.signal:
        label = f"{p.status}({p.signal})"
    elif p.status in (records.EXITED, records.FAILED) and p.exit_code is not None:
        label = f"{p.status}({p.exit_code})"
    elif p.status == records.KILLED and p.signal:
        label = f"killed({p.signal})"
    return Text(label, style=STATE_STYLES.get(p.status, ""))


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
        self.run: RunInfo | None = None
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

    def update_info(self, info: RunInfo) -> None:
        """New run.json content."""
        self.run = info
        self._refresh_rows()

    def apply_stats(self, samples: Mapping[str, ProcSample]) -> None:
        """New CPU/RSS/health samples."""
        self.samples = dict(samples)
        self._refresh_rows()

    def header_text(self) -> Text:
        run = self.run
        if run is None:
            return Text("waiting for run.json…", style="dim")
        style = RUN_STYLES.get(run.status, "bold green")
        text = Text.assemble(("run ", "dim"), (run.name or "?", "bold"), " · ", (run.status, style))
        if run.supervisor_pid is not None:
            text.append(f" · supervisor pid {run.supervisor_pid}", style="dim")
        if run.started_at is not None:
            end = run.ended_at if run.finished and run.ended_at else self.clock()
            text.append(f" · {format_uptime(end - run.started_at)}", style="dim")
        return text

    def _row(self, p: ProcessInfo) -> list[Any]:
        s = self.samples.get(p.name) if p.alive else None
        if s is not None and s.pid != p.pid:
            s = None
        health: Any = "—"
        if s is not None and s.health_ok is not None:
            health = Text(f"{s.health_ms:.0f} ms", style="green") if s.health_ok and s.health_ms is not None \
                else Text("down", style="red")
        elif p.alive and p.health == "failing":
            health = Text("failing", style="red")
        return [
            Text(p.name, style="bold"),
            state_text(p),
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
        for p in self.run.procs():
            values = self._row(p)
            if p.name not in table.rows:
                table.add_row(*values, key=p.name)
            else:
                for col, value in zip(self.COLUMNS, values):
                    if table.get_cell(p.name, col) != value:
                        table.update_cell(p.name, col, value)
        if first_fill and records.PROC_SERVER in table.rows:
            self.select(records.PROC_SERVER)  # not the one-shot prepare step: r/K act on the cursor row

    @on(RowTable.Highlighted, "#proc-table")
    def _highlighted(self, event: RowTable.Highlighted) -> None:
        event.stop()
        self.post_message(ProcessSelected(event.key))
