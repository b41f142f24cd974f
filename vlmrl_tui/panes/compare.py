"""Run comparison: several runs' curves overlaid, one colour per run, with a table and the
config keys that differ.

The primary run (the one whose logs, processes and rollouts the other tabs show) shares the
metrics pane's stores: the app's feed fills them and :meth:`ComparePane.primary_updated`
only marks the view stale. The other runs are read by one thread worker
(:class:`RunsReader`, the run-directory feed's metric, eval and ``run.json`` readers, each
file parsed once) that posts what is new as :class:`CompareUpdated`; one batch is in flight
at a time. Like the metrics pane, the view redraws at most once per ``redraw_s`` and only
while on screen; series as plotted are cached per run until that run gets new records.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from backend import records as r
from vlmrl_tui.panes.chart import LineChart, Series
from vlmrl_tui.panes.chartview import ChartOptions, short_duration
from vlmrl_tui.panes.comparedata import (
    CompareRun,
    IdentityCache,
    RunDelta,
    RunsReader,
    color_of,
    config_diff,
    format_config_value,
    last_of,
    plotted,
    plotted_evals,
    points_for,
    short_keys,
)
from vlmrl_tui.panes.metrics import PLOTS, MetricsPane, PlotSpec
from vlmrl_tui.panes.throttle import Throttle
from vlmrl_tui.panes.metricstore import REWARD_WINDOW, EvalStore, MetricsStore, format_value
from vlmrl_tui.watch import RunUpdate, display_path

# The table's columns after the run's name: (row key, header, width, alignment). "progress" is
# step/max_steps; rewards are the mean of the last REWARD_WINDOW steps and the best such mean
# (the store's, as in the summary line); loss, KL and entropy their latest values.
TABLE_COLUMNS: tuple[tuple[str, str, int, str], ...] = (
    ("progress", "step", 9, ">"),
    ("status", "status", 10, "<"),
    ("s/step", "s/step", 6, ">"),
    ("reward", f"reward ({REWARD_WINDOW})", 11, ">"),
    ("best reward", f"best ({REWARD_WINDOW})", 9, ">"),
    (r.LOSS, "loss", 9, ">"),
    (r.KL, "KL", 9, ">"),
    (r.ENTROPY, "entropy", 8, ">"),
)
LATEST_KEYS = (r.LOSS, r.KL, r.ENTROPY)  # metrics whose newest value the table shows
EVAL_COLUMNS: tuple[tuple[str, str, int, str], ...] = (("eval", "eval", 7, ">"), ("best eval", "best eval", 9, ">"))


class CompareUpdated(Message):
    """One poll of the compared runs: a :class:`RunDelta` per run with something new."""

    def __init__(self, deltas: list[RunDelta]) -> None:
        super().__init__()
        self.deltas = deltas


class CompareChart(LineChart):
    """One plot of the comparison: a :class:`PlotSpec`'s main key for every run."""

    DEFAULT_CSS = "CompareChart { height: 1fr; width: 1fr; min-height: 6; }"

    def __init__(self, spec: PlotSpec, *, id: str | None = None) -> None:
        super().__init__(spec.title.split(" ")[0], id=id)  # "reward ± std" -> "reward": no bands here
        self.spec = spec
        self.base_title = self.title


class ComparePane(Vertical, can_focus=True):
    """The compared runs' curves overlaid (one colour per run), their latest and best values,
    and the config keys in which they differ. The chart options (smoothing, x axis, zoom) are
    the metrics pane's: the same keys change them in either view."""

    BINDINGS = list(MetricsPane.BINDINGS)  # same keys, ids and action names: a remapped key moves in both

    DEFAULT_CSS = """
    ComparePane { height: 1fr; }
    ComparePane #compare-table { height: auto; padding: 0 1; background: $panel; }
    ComparePane #compare-config { height: auto; max-height: 4; padding: 0 1; }
    ComparePane #compare-plots { grid-size: 3 2; grid-gutter: 0 1; height: 1fr; }
    """

    def __init__(self, metrics: MetricsPane, *, redraw_s: float = 2.0, poll_s: float = 1.0,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.metrics_pane = metrics  # the primary run's stores, and the chart options the user picked
        self.poll_s = poll_s
        self.runs: list[CompareRun] = []
        self.diff: dict[str, list[Any]] = {}  # config keys that differ -> each run's value
        self.table_rows: list[dict[str, str]] = []  # what the table shows, a dict per run (tests read it)
        self.display = False  # until a comparison starts
        self.redraw = Throttle(self, redraw_s, self.flush)
        self._taken = threading.Event()  # the UI took the reader's last batch
        self._cache = IdentityCache()
        self._table = Static("", id="compare-table")
        self._config = Static("", id="compare-config")

    def compose(self) -> ComposeResult:
        yield self._table
        yield self._config
        with Grid(id="compare-plots"):
            for i, spec in enumerate(PLOTS):
                yield CompareChart(spec, id=f"compare-plot-{i}")

    @property
    def active(self) -> bool:
        """Whether there are runs to compare (two or more)."""
        return len(self.runs) > 1

    # ---- runs in ------------------------------------------------------------------------
    def start(self, primary: Path, others: Sequence[Path]) -> bool:
        """Compare ``primary`` (the attached run) with ``others``; shows the comparison and
        returns True when there is more than one run."""
        paths = [Path(primary), *(Path(p) for p in others)]
        names = [p.name for p in paths]
        self.runs = [
            CompareRun(
                path, display_path(path) if names.count(path.name) > 1 else path.name, color_of(i),
                self.metrics_pane.store if i == 0 else MetricsStore(),
                self.metrics_pane.evals if i == 0 else EvalStore(),
            )
            for i, path in enumerate(paths)
        ]
        self._cache.clear()
        if not self.active:
            self.display = False
            return False
        self.show_compare(True)
        self._to_front()  # the comparison is what the user asked for: in front, and its keys
        self.focus()  # live (a focused widget in another tab would bring that tab back)
        self._taken.set()
        self._reader(RunsReader(paths))
        self.redraw.mark()
        return True

    def primary_updated(self, update: RunUpdate) -> None:
        """The app's feed brought the primary run's new records (already in the shared stores)."""
        if not self.active:
            return
        if update.info is not None:
            self.runs[0].info = update.info
        if update.info is not None or update.metrics or update.evals:
            self.redraw.mark()

    @work(thread=True, exclusive=True, group="compare", name="compare-feed")
    def _reader(self, reader: RunsReader) -> None:
        """Poll the compared runs every ``poll_s``; one batch in flight."""
        worker = get_current_worker()
        while not worker.is_cancelled:
            deltas = reader.poll()
            if deltas:
                self._taken.clear()
                self.post_message(CompareUpdated(deltas))
                while not self._taken.wait(0.2):
                    if worker.is_cancelled:
                        return
            worker.cancelled_event.wait(self.poll_s)

    @on(CompareUpdated)
    def _updated(self, message: CompareUpdated) -> None:
        try:
            if not self.is_attached or not self.runs:
                return
            for d in message.deltas:
                run = self.runs[d.index]
                if d.metrics:
                    run.store.add(d.metrics)
                if d.evals:
                    run.evals.add(d.evals)
                if d.info is not None:
                    run.info, run.info_error = d.info, None
                if d.info_error is not None:
                    run.info_error = d.info_error
                if d.config is not None:
                    run.config = d.config
                if d.note_changed:
                    run.note = d.note
            self.diff = config_diff([run.config.values if run.config else None for run in self.runs])
            self.redraw.mark()
        finally:
            self._taken.set()

    # ---- showing --------------------------------------------------------------------------
    def show_compare(self, on: bool) -> None:
        """Show the comparison (or the single-run metrics pane) in the metrics tab."""
        had_focus = self.has_focus or self.metrics_pane.has_focus
        on = on and self.active
        self.display = on
        self.metrics_pane.display = not on
        if had_focus:  # the keys (e, w, z) keep working in the view now shown
            self.shown.focus()

    def toggle(self) -> bool:
        """Switch between the comparison and the primary run's metrics (in view: the metrics
        tab comes to the front); False when there is nothing to compare (the user is told how
        to open a comparison)."""
        if not self.active:
            self.app.notify("One run attached: mark runs with space in the run picker, or start "
                            "vlmrl-tui --attach RUN_A RUN_B, to compare runs.", severity="warning")
            return False
        self.show_compare(not self.display)
        self._to_front()
        self.shown.focus()
        return True

    @property
    def shown(self) -> Widget:
        """What the metrics tab shows: this comparison or the single-run metrics pane."""
        return self if self.display else self.metrics_pane

    def _to_front(self) -> None:
        """Bring the metrics tab to the front."""
        try:
            self.query_ancestor(TabbedContent).active = self.query_ancestor(TabPane).id or ""
        except NoMatches:  # not in a tab (a test or benchmark app)
            pass

    def options(self) -> ChartOptions:
        """The chart options the user picked (the metrics pane holds them)."""
        return self.metrics_pane.options

    def action_toggle_smooth(self) -> None:
        self.metrics_pane.action_toggle_smooth()
        self.flush(force=True)

    def action_toggle_x_axis(self) -> None:
        self.metrics_pane.action_toggle_x_axis()
        self.flush(force=True)

    def action_zoom(self) -> None:
        self.metrics_pane.action_zoom()  # what it cycles through depends on the primary run's steps
        self.flush(force=True)

    def on_show(self) -> None:
        self.flush()

    def on_resize(self) -> None:
        if self.runs:  # series are cut to the charts' width: shape them again
            self.redraw.mark()

    def flush(self, force: bool = False) -> None:
        """Redraw the table, config line and plots if something changed and they are visible."""
        if not self.runs or not self.redraw.take(force):
            return  # nothing new, or off screen: redrawn on show
        self.table_rows = [self._row(run) for run in self.runs]
        with_evals = any(run.evals for run in self.runs)
        self._table.update(self.table_text(with_evals), layout=False)
        self._config.update(self.config_text())
        opts = self.options()
        for chart in self.query(CompareChart):
            self._draw(chart, opts, with_evals)

    # ---- the table ------------------------------------------------------------------------
    def _row(self, run: CompareRun) -> dict[str, str]:
        store = run.store
        latest = store.latest()
        info = run.info
        max_steps = info.max_steps if info is not None else None
        step = "—" if latest is None else f"{latest.step}" + (f"/{max_steps}" if max_steps else "")
        if run.note:
            status = "not a run"
        elif info is not None:
            status = info.status
        else:
            status = "unreadable" if run.info_error else "—"
        per = store.step_seconds()
        row = {
            "run": run.name, "progress": step, "status": status, "s/step": "—" if per is None else f"{per:.2f}",
            "reward": format_value(store.reward.mean), "best reward": format_value(store.reward.best),
            **{key: format_value(last_of(store.series(key)[1])) for key in LATEST_KEYS},
        }
        ex, ey = run.evals.series()
        row["eval"] = format_value(last_of(ey))
        row["best eval"] = format_value(max(ey, default=None))
        return row

    def table_text(self, with_evals: bool) -> Text:
        """Runs as rows: a coloured mark and name (the plots' legend), then the columns."""
        columns = TABLE_COLUMNS + (EVAL_COLUMNS if with_evals else ())
        width = max(8, *(len(row["run"]) for row in self.table_rows)) + 1
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"  {'run':<{width}}", style="bold")
        for _, header, w, align in columns:
            text.append(f" {header:{align}{w}}", style="bold")
        for run, row in zip(self.runs, self.table_rows):
            text.append("\n● ", style=Style(color=run.color, bold=True))
            text.append(f"{row['run']:<{width}}", style=Style(color=run.color))
            for key, _, w, align in columns:
                text.append(f" {row[key]:{align}{w}}")
        return text

    def config_text(self) -> Text:
        """The config keys that differ, each run's value in its colour; then the runs whose
        directory is not a run, or whose run.json or config.toml cannot be read, and why."""
        text = Text()
        labels = short_keys(list(self.diff))
        for n, (key, values) in enumerate(self.diff.items()):
            if n:
                text.append("  ·  ")
            else:
                text.append("config differs: ", style="bold")
            text.append(f"{labels[key]}: ")
            shown = [(run, v) for run, v in zip(self.runs, values) if v is not None]  # None: no config
            for i, (run, value) in enumerate(shown):
                if i:
                    text.append(" / ")
                text.append(format_config_value(value), style=Style(color=run.color))
        known = sum(1 for run in self.runs if run.config is not None and run.config.values is not None)
        if not self.diff and known >= 2:
            text.append("same config (ports and run names aside)", style="italic")
        for run in self.runs:
            notes = [n for n in (run.note, run.info_error, run.config.note if run.config else None) if n]
            if notes:
                text.append("\n" if text.plain else "")
                text.append(f"{run.name}: ", style=Style(color=run.color))
                text.append("; ".join(notes))
        return text

    # ---- the plots ------------------------------------------------------------------------
    def _draw(self, chart: CompareChart, opts: ChartOptions, with_evals: bool) -> None:
        """One plot: each run's series as ``opts`` shows it, in the run's colour. A zoom cuts
        all runs at the same step (the newest step of any run, back ``last_n``); on the time
        axis each run starts at 0 (seconds since its first step)."""
        spec = chart.spec
        ends = [run.store.steps[-1] for run in self.runs if run.store.steps]
        last_x = float(max(ends)) if ends and opts.last_n is not None else None
        raw = replace(opts, smooth=False)  # evaluations are sparse: never smoothed
        n = points_for(chart.content_size.width)
        series: list[Series] = []
        for run in self.runs:
            store = run.store
            if store.series(spec.key)[0]:
                pts = self._cache.get((id(run), spec.key), store, (store.version, opts, last_x, n),
                                      lambda: plotted(run, spec.key, opts, last_x, n))
                series.append(Series(*pts, "main", color=run.color))
            if spec.evals and run.evals:
                ex, ey = run.evals.series()
                pts = self._cache.get((id(run), "eval"), ex, (store.version, raw, last_x, n),
                                      lambda: plotted_evals(run, raw, last_x, n))
                if pts[0]:
                    series.append(Series(*pts, "eval", color=run.color, marks=True))
        described = opts.describe()
        chart.title = chart.base_title + (" · ▪ eval" if spec.evals and with_evals else "") + (
            f" · {described}" if described else "")
        chart.x_label = short_duration if opts.x_axis == "time" else None
        chart.set_series(series)
