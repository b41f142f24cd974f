"""The run summary: one line under the header, on every tab.

``step 37/200 · reward 0.62 (best 0.71) · 0.52 s/step · ETA 1m 25s · weights v37 · last metric 3s ago``

It reads the metrics pane's :class:`~vlmrl_tui.panes.metricstore.MetricsStore` (no second
parse, and the 10-step reward is kept there incrementally) and what run.json says. One
timer a second is its only clock: it picks up new steps (so it redraws at most once a
second however fast steps arrive) and ages the "last metric" text; the line is repainted
only when its text changed. A live run that has written no metric for longer than
``max(30 s, 10 x s/step)`` shows ``no metric for …`` in the warning colour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from rich.text import Text
from textual.widgets import Static

from backend import records as r
from backend.records import RUN_COMPLETED, RunInfo
from vlmrl_tui.panes.metricstore import MetricsStore, format_duration

STALL_MIN_S = 30.0  # a live run is stalled after this long without a metric...
STALL_STEPS = 10.0  # ...or after this many of its recent steps' duration, whichever is longer


def format_reward(v: float) -> str:
    """A reward in three significant digits (``0.62``, ``0.713``, ``12.5``, ``1,234``)."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


@dataclass(frozen=True)
class SummaryLine:
    """The summary's parts; ``age`` is the "last metric" part, ``stalled`` whether it warns."""

    parts: tuple[str, ...]
    age: str | None = None
    stalled: bool = False

    @property
    def plain(self) -> str:
        return " · ".join(self.parts + ((self.age,) if self.age else ()))


def summarize(store: MetricsStore, run: RunInfo | None, now: float, arrived: float | None) -> SummaryLine:
    """The summary of ``store`` and ``run`` at ``now``; ``arrived``: when the latest record
    was first seen (its age when it has no time stamp)."""
    latest = store.latest()
    if latest is None:
        return SummaryLine(("waiting for the first step",) + ((run.status,) if run is not None else ()))
    max_steps = run.max_steps if run is not None else None
    parts = [f"step {latest.step}" + (f"/{max_steps}" if max_steps else "")]
    mean, best = store.reward.mean, store.reward.best
    if mean is not None and best is not None:
        parts.append(f"reward {format_reward(mean)} (best {format_reward(best)})")
    per = store.step_seconds()
    if per is not None:
        parts.append(f"{per:.2f} s/step")
    finished = run is not None and run.finished
    if finished:
        assert run is not None
        parts.append("finished" if run.status == RUN_COMPLETED else f"run {run.status}")
    elif (eta := store.eta_seconds(max_steps)) is not None:
        parts.append(f"ETA {format_duration(eta)}")
    version = latest.finite(r.WEIGHT_VERSION)
    if version is not None:
        parts.append(f"weights v{int(version)}")
    if finished:
        return SummaryLine(tuple(parts))  # nothing more will come: no clock to watch
    stamp = latest.finite(r.TIME)
    when = stamp if stamp is not None else arrived
    if when is None:
        return SummaryLine(tuple(parts))
    age = max(0.0, now - when)  # a clock ahead of ours (another node) reads as "just now"
    if age > max(STALL_MIN_S, STALL_STEPS * (per or 0.0)):
        return SummaryLine(tuple(parts), f"no metric for {format_duration(age)}", stalled=True)
    return SummaryLine(tuple(parts), f"last metric {format_duration(age)} ago")


class RunSummary(Static):
    """The one-line run summary docked under the header (see the module docstring)."""

    DEFAULT_CSS = """
    RunSummary { height: 1; padding: 0 1; background: $panel; color: $text; }
    RunSummary > .summary--age { color: $text-muted; }
    RunSummary > .summary--stall { color: $text-warning; text-style: bold; }
    """
    COMPONENT_CLASSES = {"summary--age", "summary--stall"}

    def __init__(self, store: MetricsStore, *, clock: Callable[[], float] = time.time, tick_s: float = 1.0,
                 id: str | None = None) -> None:
        super().__init__("", id=id)
        self.store = store
        self.clock = clock
        self.tick_s = tick_s
        self.run: RunInfo | None = None
        self.line = summarize(store, None, clock(), None)  # what is shown
        self._version = -1  # the store's version last seen
        self._arrived: float | None = None

    def on_mount(self) -> None:
        self.set_interval(self.tick_s, self.tick)
        self.tick(force=True)

    def set_run(self, run: RunInfo) -> None:
        """run.json changed (status, max steps)."""
        self.run = run
        if self.is_mounted:
            self.tick()

    def tick(self, force: bool = False) -> None:
        """Take new steps and the time; repaint only if the text changed."""
        now = self.clock()
        if self.store.version != self._version:
            self._version = self.store.version
            self._arrived = now
        line = summarize(self.store, self.run, now, self._arrived)
        if line == self.line and not force:
            return
        self.line = line
        text = Text(" · ".join(line.parts), no_wrap=True, overflow="ellipsis")
        if line.age:
            text.append(" · ")
            text.append(line.age, style=self.get_component_rich_style(
                "summary--stall" if line.stalled else "summary--age"))
        self.update(text, layout=False)
