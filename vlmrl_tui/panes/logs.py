"""Logs pane: one tab per process (a :class:`~vlmrl_tui.panes.logview.LogView` each), a
search bar and a status line."""

from __future__ import annotations

import re
from typing import Iterable

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Input, Static, TabbedContent, TabPane

from backend.records import PROC_SERVER, PROC_TRAINER, proc_sort_key
from vlmrl_tui.panes.logview import LogView, smart_case
from vlmrl_tui.watch import DEFAULT_SCROLLBACK, LogChunk

__all__ = ["LogView", "LogsPane"]


def _tab_id(proc: str) -> str:
    return "log-tab-" + re.sub(r"[^A-Za-z0-9_-]", "_", proc)


class LogsPane(Vertical):
    """One tab per process log, a search bar, and a status line."""

    DEFAULT_CSS = """
    LogsPane { height: 1fr; }
    LogsPane > TabbedContent { height: 1fr; }
    LogsPane > TabbedContent > ContentSwitcher { height: 1fr; }
    LogsPane TabPane { padding: 0; height: 1fr; }
    LogsPane #log-search { dock: bottom; display: none; }
    LogsPane #log-search.-visible { display: block; }
    LogsPane #log-status { height: 1; padding: 0 1; color: $text-muted; background: $panel; }
    """

    BINDINGS = [
        Binding("left_square_bracket", "switch_tab(-1)", "Prev log", key_display="[", id="logs.prev_tab"),
        Binding("right_square_bracket", "switch_tab(1)", "Next log", key_display="]", id="logs.next_tab"),
    ]

    def __init__(self, procs: Iterable[str] = (PROC_SERVER, PROC_TRAINER), scrollback: int = DEFAULT_SCROLLBACK,
                 *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.scrollback = scrollback
        self._initial_procs = sorted(procs, key=proc_sort_key)
        self.views: dict[str, LogView] = {}
        self._status = ""
        self.tabs = TabbedContent(id="log-tabs")
        self.search_bar = Input(placeholder="search (Enter: find · Esc: close · n/N: next/previous)", id="log-search")
        self._status_line = Static("", id="log-status")

    def compose(self) -> ComposeResult:
        with self.tabs:
            for proc in self._initial_procs:
                view = self._make_view(proc)
                with TabPane(proc, id=_tab_id(proc)):
                    yield view
        yield self.search_bar
        yield self._status_line

    def _make_view(self, proc: str) -> LogView:
        view = LogView(proc, self.scrollback, id=f"log-{_tab_id(proc)[8:]}")
        self.views[proc] = view
        return view

    def view_for(self, proc: str) -> LogView:
        """The view of ``proc``, adding a tab for a process seen for the first time."""
        view = self.views.get(proc)
        if view is None:
            view = self._make_view(proc)
            self.tabs.add_pane(TabPane(proc, view, id=_tab_id(proc)))
        return view

    def _has_pane(self, proc: str) -> bool:
        return bool(self.query(f"#{_tab_id(proc)}"))

    @property
    def active_view(self) -> LogView | None:
        tabs = self.tabs
        active = tabs.active
        for proc, view in self.views.items():
            if _tab_id(proc) == active:
                return view
        return None

    def ingest(self, logs: dict[str, LogChunk]) -> None:
        """Write one batch per process (one call per view, whatever the line count)."""
        for proc, chunk in logs.items():
            self.view_for(proc).write_lines(chunk.lines, chunk.skipped)

    def show_proc(self, proc: str) -> None:
        """Switch to the tab of ``proc`` (if it has one)."""
        if proc in self.views:
            self.tabs.active = _tab_id(proc)

    def action_switch_tab(self, delta: int) -> None:
        procs = [p for p in sorted(self.views, key=proc_sort_key) if self._has_pane(p)]
        view = self.active_view
        if not procs or view is None:
            return
        i = (procs.index(view.proc) + delta) % len(procs)
        self.show_proc(procs[i])
        self.views[procs[i]].focus()

    # ---- search bar -------------------------------------------------------------------
    def open_search(self) -> None:
        bar = self.search_bar
        bar.add_class("-visible")
        view = self.active_view
        if view is not None and view.query_text:
            bar.value = view.query_text
        bar.focus()

    @on(LogView.SearchRequested)
    def _search_requested(self, event: LogView.SearchRequested) -> None:
        event.stop()
        self.open_search()

    @on(Input.Submitted, "#log-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        view = self.active_view
        if view is None:
            return
        hit = view.search(event.value)
        if event.value and hit is None:
            self.notify(f"{event.value!r} not found in {view.proc} (last {view.line_count:,} lines).",
                        severity="warning")
        self.search_bar.remove_class("-visible")
        view.focus()

    def on_key(self, event: events.Key) -> None:
        bar = self.search_bar
        if event.key == "escape" and bar.has_focus:
            event.stop()
            bar.remove_class("-visible")
            view = self.active_view
            if view is not None:
                view.focus()

    # ---- status line ------------------------------------------------------------------
    @on(LogView.StateChanged)
    def _state_changed(self, event: LogView.StateChanged) -> None:
        event.stop()
        if event.view is self.active_view:
            self.update_status()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.update_status()

    def status_text(self) -> str:
        """The status line of the active view."""
        view = self.active_view
        if view is None:
            return ""
        parts = [view.proc]
        if view.follow:
            parts.append("● following")
        else:
            more = f" · {view.pending:,} new lines (End to follow)" if view.pending else " (End to follow)"
            parts.append("‖ paused" + more)
        if view.cursor is not None:
            parts.append(f"line {view.cursor + 1:,}")
        if view.query_text:
            count = view.match_count or 0
            where = ""
            if view.cursor is not None and count:
                plain = view.plain_line(view.cursor) or ""
                q = view.query_text
                hit = (q in plain) if smart_case(q) else (q.lower() in plain.lower())
                if hit:
                    where = f"{view.match_index(view.cursor)}/"
            parts.append(f"/{view.query_text}: {where}{count:,} match{'es' if count != 1 else ''}")
        parts.append(f"keeps last {view.max_lines:,} lines")
        return " · ".join(parts)

    def update_status(self) -> None:
        text = self.status_text()
        if text != self._status:  # one line, fixed height: no layout needed
            self._status = text
            self._status_line.update(text, layout=False)
