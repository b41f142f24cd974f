"""Run picker: the recent runs under the output directory, newest first; Enter attaches.

Space marks runs (a ``●`` in the first column, a count in the title); Enter with two or more
marked opens their comparison. The screen dismisses with the run directories to open, the
primary run (the one the logs, processes and rollouts tabs show) first, or None to quit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from backend.records import RUN_COMPLETED, RUN_FAILED, RUN_RUNNING, MetricRecord, RunInfoError
from backend.rundir import RunDirectory, last_lines


@dataclass(frozen=True)
class RunEntry:
    """One run directory as the picker lists it."""

    path: Path
    name: str
    status: str
    started_at: float | None
    last_step: int | None
    mtime: float


def _last_step(rd: RunDirectory) -> int | None:
    for line in reversed(last_lines(rd.metrics, 5)):
        try:
            rec = MetricRecord.from_json(json.loads(line))
        except ValueError:
            continue
        if rec is not None:
            return rec.step
    return None


def list_runs(output_dir: Path, limit: int = 100) -> list[RunEntry]:
    """Run directories (those with run.json or logs/) under ``output_dir``, newest first."""
    if not output_dir.is_dir():
        return []
    entries: list[RunEntry] = []
    for child in output_dir.iterdir():
        rd = RunDirectory(child)
        if not child.is_dir() or not (rd.run_json.exists() or rd.logs_dir.is_dir()):
            continue
        try:
            info = rd.run_info()
            status = info.status if info is not None else "unknown"
        except RunInfoError:  # listed; attaching to it says why it cannot be read
            info, status = None, "unreadable run.json"
        stamps = [p.stat().st_mtime for p in (rd.run_json, rd.metrics, rd.logs_dir) if p.exists()]
        entries.append(
            RunEntry(
                path=child,
                name=info.name if info is not None and info.name else child.name,
                status=status,
                started_at=info.started_at if info is not None else None,
                last_step=_last_step(rd),
                mtime=max(stamps) if stamps else child.stat().st_mtime,
            )
        )
    entries.sort(key=lambda e: e.mtime, reverse=True)
    return entries[:limit]


class RunPickerScreen(Screen[list[Path] | None]):
    """Lists runs; dismisses with the chosen run directories (primary first), or None to quit."""

    BINDINGS = [
        Binding("enter", "pick", "Attach", id="picker.attach"),
        Binding("space", "mark", "Mark to compare", id="picker.mark"),
        Binding("q,escape", "cancel", "Quit", id="picker.quit"),
        Binding("f5", "reload", "Reload", id="picker.reload"),
    ]
    DEFAULT_CSS = """
    RunPickerScreen #picker-title { padding: 1 2; }
    RunPickerScreen DataTable { height: 1fr; margin: 0 2; }
    """

    def __init__(self, output_dir: Path) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.entries: list[RunEntry] = []
        self.marked: list[Path] = []  # in the order marked

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Vertical():
            yield Static("", id="picker-title")
            yield DataTable(id="picker-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column(" ", key="mark", width=1)
        table.add_columns("run", "status", "started", "last step", "directory")
        self.action_reload()
        table.focus()

    def action_reload(self) -> None:
        self.entries = list_runs(self.output_dir)
        listed = {e.path for e in self.entries}
        self.marked = [p for p in self.marked if p in listed]
        table = self.query_one(DataTable)
        table.clear()
        if not self.entries:
            title = self.query_one("#picker-title", Static)
            title.update(Text.assemble(
                (f"No runs under {self.output_dir.resolve()}.\n", "bold"),
                "Start one with:  vlmrl-tui configs/colors-tiny.toml   (or pass --output-dir DIR)",
            ))
            return
        self._show_title()
        for e in self.entries:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.started_at)) if e.started_at else "—"
            status_style = {RUN_FAILED: "red", RUN_RUNNING: "green", RUN_COMPLETED: "cyan"}.get(e.status, "")
            table.add_row(
                "●" if e.path in self.marked else "", e.name, Text(e.status, style=status_style), started,
                "—" if e.last_step is None else str(e.last_step), str(e.path), key=str(e.path),
            )

    def _show_title(self) -> None:
        title = Text.assemble(
            (f"{len(self.entries)} run(s) under {self.output_dir.resolve()}", "bold"),
            "  ·  Enter attaches (live or finished)  ·  space marks runs to compare",
        )
        if self.marked:
            title.append(f"  ·  {len(self.marked)} marked", style="bold")
        self.query_one("#picker-title", Static).update(title)

    def _cursor_path(self) -> Path | None:
        table = self.query_one(DataTable)
        if not self.entries or not 0 <= table.cursor_row < len(self.entries):
            return None
        return self.entries[table.cursor_row].path

    def action_mark(self) -> None:
        """Mark the run under the cursor for the comparison, or unmark it."""
        path = self._cursor_path()
        if path is None:
            return
        if path in self.marked:
            self.marked.remove(path)
        else:
            self.marked.append(path)
        self.query_one(DataTable).update_cell(str(path), "mark", "●" if path in self.marked else "")
        self._show_title()

    def chosen(self) -> list[Path]:
        """What Enter opens: the marked runs (the cursor's run first when it is one of them, else
        the first marked), or the cursor's run alone when none is marked."""
        cursor = self._cursor_path()
        if not self.marked:
            return [cursor] if cursor is not None else []
        primary = cursor if cursor in self.marked else self.marked[0]
        return [primary, *(p for p in self.marked if p != primary)]

    def action_pick(self) -> None:
        chosen = self.chosen()
        if chosen:
            self.dismiss(chosen)

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_pick()

    def action_cancel(self) -> None:
        self.dismiss(None)
