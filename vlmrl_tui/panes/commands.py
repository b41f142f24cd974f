"""The dashboard's help screen and command palette, built from the bindings of every pane.

A mixin of :class:`~vlmrl_tui.app.VlmrlApp`: it needs the app's panes (``logs``,
``compare``, ``rollouts``, ``processes``), ``run_view``, ``send`` and the tab and kill
actions.
"""

from __future__ import annotations

from typing import Any, Iterable

from textual.app import SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from backend.records import PROC_PREPARE
from vlmrl_tui.panes.logs import LogsPane, LogView
from vlmrl_tui.panes.metrics import MetricsPane
from vlmrl_tui.panes.rollouts import RolloutsPane
from vlmrl_tui.panes.screens import HelpScreen

HELP_INTRO = (
    "The line under the title shows the run on every tab: step/total, reward (10-step mean, "
    "latest and best), s/step, ETA, weight version and the age of the last metric line (a stall "
    "stands out). Processes: ↑/↓ pick a process; r restarts it, K kills it; x stops the run. "
    "Logs: ↑/↓/PgUp/PgDn select a line, Home goes to the oldest line held, End follows, Esc "
    "clears the search. Metrics: e smooths, w switches the x axis to wall time, z zooms to the "
    "last N steps, c compares the runs given to --attach or marked (space) in the picker. "
    "Rollouts: ↑/↓ within a step, g goes to the first step, / filters (reward>0.5, format<1: a reward part, "
    "adv<0, len>200, text or /regex/, ! negates), w searches the whole run, f enlarges the image. "
    "Tab moves between panes."
)


class CommandsMixin:
    """Help screen and palette entries: one per action, per process for restart and kill."""

    BINDINGS: list[Binding]

    def binding_groups(self) -> list[tuple[str, list[Binding]]]:
        """All bindings by scope (help screen, palette and tests use this)."""
        return [
            ("Everywhere", list(self.BINDINGS) + [Binding("ctrl+p", "command_palette", "Command palette")]),
            ("Logs", list(LogView.BINDINGS) + list(LogsPane.BINDINGS)),
            ("Rollouts", list(RolloutsPane.BINDINGS)),
            ("Metrics", list(MetricsPane.BINDINGS)),
        ]

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.binding_groups(), intro=HELP_INTRO))  # type: ignore[attr-defined]

    def _palette_target(self, scope: str) -> Any:
        app: Any = self
        if scope in ("Logs", "Metrics", "Rollouts"):
            app.action_show_tab(scope.lower())
            return {"Logs": app.logs.active_view, "Metrics": app.compare.shown, "Rollouts": app.rollouts}[scope]
        return self

    def palette_commands(self) -> Iterable[SystemCommand]:
        """One palette entry per action (per process for restart and kill)."""
        app: Any = self
        procs = [p.name for p in app.run_view.procs() if p.name != PROC_PREPARE] if app.run_view else []
        for proc in procs:
            yield SystemCommand(f"Restart {proc}", f"ask the supervisor to restart {proc}",
                                lambda proc=proc: app.send("restart", proc))
            yield SystemCommand(f"Kill {proc}", f"SIGKILL {proc} (asks first)",
                                lambda proc=proc: (app.processes.select(proc), app.action_kill_process()))
        for scope, bindings in self.binding_groups():
            for b in bindings:
                if not b.show or b.action in ("command_palette",):
                    continue
                title = b.description if scope == "Everywhere" else f"{scope}: {b.description}"

                async def run(b: Binding = b, scope: str = scope) -> None:
                    target = self._palette_target(scope)
                    if target is not None:
                        await app.run_action(b.action, default_namespace=target)

                yield SystemCommand(title, f"key {HelpScreen.key_label(b)}", run)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from self.palette_commands()
        yield from super().get_system_commands(screen)  # type: ignore[misc]
