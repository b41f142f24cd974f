"""Metrics pane: plots over steps, a table of the latest values, step progress and ETA.

Records come from ``metrics.jsonl`` (one per optimizer step) and ``eval.jsonl`` (one per
held-out evaluation, every ``eval_every`` steps): eval rewards are drawn on the reward plot
as a second series, and the latest one is shown in the progress line and the table. A run
without evaluations looks as if evals did not exist. Charts, table and progress
are redrawn at most once per ``redraw_s`` and only while the pane is on screen: a run can
log several steps a second, and nothing needs redrawing that often.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Static

from backend import records as r
from backend.records import EvalRecord, MetricRecord
from vlmrl_tui.panes.chart import LineChart, Series
from vlmrl_tui.panes.chartview import ChartOptions, next_zoom, short_duration, view
from vlmrl_tui.panes.throttle import Throttle
from vlmrl_tui.panes.metricstore import (
    MAX_POINTS,
    EvalStore,
    MetricsStore,
    downsample,
    format_duration,
    format_value,
)


@dataclass(frozen=True)
class PlotSpec:
    """One plot: a title and the series drawn in it."""

    title: str
    key: str
    band: str | None = None  # std of ``key``: drawn as mean ± std
    low: str | None = None  # lower / upper envelopes (min / max)
    high: str | None = None
    extra: tuple[str, ...] = ()  # more series on the same axes
    evals: bool = False  # also draw the held-out eval rewards (``eval.jsonl``) when there are any


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward ± std", r.REWARD_MEAN, band=r.REWARD_STD, evals=True),
    PlotSpec("loss", r.LOSS),
    PlotSpec("KL", r.KL, extra=(r.MISMATCH_KL,)),
    PlotSpec("ratio min/mean/max", r.IR, low=r.IR_MIN, high=r.IR_MAX),
    PlotSpec("entropy", r.ENTROPY),
    PlotSpec("tokens/s", r.TOKENS_PER_S),
)

TABLE_KEYS: tuple[tuple[str, str], ...] = (
    (r.REWARD_MEAN, "reward"),
    (r.REWARD_STD, "reward std"),
    (r.LOSS, "loss"),
    (r.KL, "KL"),
    (r.MISMATCH_KL, "mismatch KL"),
    (r.IR, "ratio"),
    (r.IR_MIN, "ratio min"),
    (r.IR_MAX, "ratio max"),
    (r.ENTROPY, "entropy"),
    (r.CLIP_FRAC, "clip frac"),
    (r.MASKED_FRAC, "masked frac"),
    (r.GRAD_NORM, "grad norm"),
    (r.LR, "lr"),
    (r.TOKENS_PER_S, "tokens/s"),
    # where the step's time went: these four add up to step s; the indented three to train s
    (r.ROLLOUT_S, "rollout s"),
    (r.TRAIN_S, "train s"),
    (r.BATCH_S, "  batch s"),
    (r.FORWARD_BACKWARD_S, "  fwd+bwd s"),
    (r.OPTIMIZER_S, "  optimizer s"),
    (r.SYNC_S, "sync s"),
    (r.WRITE_S, "write s"),
    (r.STEP_S, "step s"),
)

EVAL_LABEL = "eval"  # the eval series' legend on the reward plot


class MetricPlot(LineChart):
    """One chart of a :class:`PlotSpec`, fed from a :class:`MetricsStore`."""

    DEFAULT_CSS = "MetricPlot { height: 1fr; width: 1fr; min-height: 6; }"

    def __init__(self, spec: PlotSpec, *, id: str | None = None) -> None:
        super().__init__(spec.title, id=id)
        self.spec = spec
        self._drawn: tuple[MetricsStore, EvalStore | None, ChartOptions] | None = None
        self._points = MAX_POINTS  # what the series were bucketed to

    def on_resize(self) -> None:
        if self._drawn is not None and self.max_points() != self._points:
            self.draw(*self._drawn)  # bucketed for the new width

    def max_points(self) -> int:
        """Points a series is bucketed to: 2 per dot column (4 per cell) of this plot, which
        is all a line can show, and what keeps a redraw of a long run cheap."""
        width = self.content_size.width
        return min(MAX_POINTS, max(4 * width, 64)) if width > 0 else MAX_POINTS

    def draw(self, store: MetricsStore, evals: EvalStore | None = None, opts: ChartOptions = ChartOptions()) -> None:
        """Plot the spec's series as ``opts`` shows them; smoothed, the raw main line stays
        behind the EMA, dimmed (band colour); evaluations are zoomed and timed, never smoothed."""
        spec = self.spec
        self._drawn, self._points = (store, evals, opts), self.max_points()
        n = self._points
        times = store.times() if opts.by_time else None
        t0 = min(times.values(), default=None) if times else None
        last_x = float(store.steps[-1]) if store.steps else None
        raw = replace(opts, smooth=False)

        def shown(xs: list[float], ys: list[float], o: ChartOptions = opts,
                  tm: dict[float, float] | None = times) -> tuple[list[float], list[float]]:
            return downsample(*view(xs, ys, o, tm, t0, last_x=last_x), n)

        series: list[Series] = []
        xs, ys = store.series(spec.key)
        main = shown(xs, ys)
        if xs and spec.band:
            sx, sy = store.series(spec.band)
            if sx == xs:  # every step has both: mean ± std from the shown series (all steps are linear)
                (bx, by), (_, bs) = main, shown(sx, sy)
            else:
                std = dict(zip(sx, sy))
                pairs = [(x, y, std[x]) for x, y in zip(xs, ys) if x in std]
                (bx, by), (_, bs) = (shown([p[0] for p in pairs], [p[k] for p in pairs]) for k in (1, 2))
            for sign in (1, -1):
                series.append(Series(bx, [y + sign * d for y, d in zip(by, bs)], "band"))
        for env in (spec.low, spec.high):
            if env and xs:
                series.append(Series(*shown(*store.series(env)), "band"))
        for extra in spec.extra:
            ex, ey = store.series(extra)
            if ex:
                series.append(Series(*shown(ex, ey), "extra", label=extra))
        if xs:
            if opts.smooth:
                series.append(Series(*shown(xs, ys, raw), "band"))
            series.append(Series(*main, "main", label=spec.key if spec.extra else None))
        if spec.evals and evals:
            ex, ey = evals.series()
            if ex:
                ev = shown(ex, ey, raw, evals.times() if times is not None else None)
                series.append(Series(*ev, "eval", label=EVAL_LABEL, marks=True))
        described = opts.describe()
        self.title = f"{spec.title} · {described}" if described else spec.title
        self.x_label = short_duration if opts.by_time else None
        self.set_series(series)


class StepBar(Static):
    """``━━━━━━━━━━╸━━━━━━━━━  45%``: steps done of ``max_steps`` (blank while unknown)."""

    COMPONENT_CLASSES = {"metrics--done", "metrics--todo"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.shown: tuple[int, int | None] | None = None

    def on_resize(self) -> None:
        if self.shown is not None:
            step, total = self.shown
            self.shown = None
            self.show(step, total)

    def show(self, step: int, total: int | None) -> None:
        if (step, total) == self.shown:
            return
        self.shown = (step, total)
        width = max(1, self.size.width - 6 if self.size.width > 10 else 38)
        if not total:
            self.update(Text(" " * width), layout=False)
            return
        frac = min(max(step / total, 0.0), 1.0)
        cells = frac * width
        full = int(cells)
        text = Text("━" * full, style=self.get_component_rich_style("metrics--done"))
        if full < width:
            text.append("╸" if cells - full >= 0.5 else "━",
                        style=self.get_component_rich_style("metrics--done" if cells - full >= 0.5 else "metrics--todo"))
            text.append("━" * (width - full - 1), style=self.get_component_rich_style("metrics--todo"))
        text.append(f" {frac * 100:3.0f}%")
        self.update(text, layout=False)


class MetricsPane(Vertical, can_focus=True):
    """Plots, latest values, progress and ETA of the run's optimizer steps; keys choose how the
    plots show their series (:class:`~vlmrl_tui.panes.chartview.ChartOptions`)."""

    BINDINGS = [
        Binding("e", "toggle_smooth", "Smooth (EMA)", id="metrics.smooth"),
        Binding("w", "toggle_x_axis", "X: step/time", id="metrics.x_axis"),
        Binding("z", "zoom", "Zoom last N", id="metrics.zoom"),
    ]

    DEFAULT_CSS = """
    MetricsPane { height: 1fr; }
    MetricsPane #metrics-progress { height: 1; padding: 0 1; background: $panel; }
    MetricsPane #metrics-bar { width: 44; }
    MetricsPane #metrics-bar > .metrics--done { color: $accent; }
    MetricsPane #metrics-bar > .metrics--todo { color: $surface-lighten-2; }
    MetricsPane #metrics-eta { width: 1fr; padding: 0 1; }
    MetricsPane #metrics-body { height: 1fr; }
    MetricsPane #metrics-plots { grid-size: 3 2; grid-gutter: 0 1; width: 1fr; }
    MetricsPane #metrics-table { width: 25; height: 1fr; padding: 0 1; }
    """

    def __init__(self, redraw_s: float = 2.0, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = MetricsStore()
        self.evals = EvalStore()
        self.max_steps: int | None = None  # from run.json
        self.finished = False
        self.options = ChartOptions()
        self.redraw = Throttle(self, redraw_s, self.flush)
        self._eta = Static("waiting for the first step", id="metrics-eta")
        self.table = Static(self.latest_table({}), id="metrics-table")
        self.latest_values: dict[str, str] = {}  # what the table shows, by metric key
        self.eval_values: dict[str, str] = {}  # the latest evaluation in the table (empty: none yet)

    def compose(self) -> ComposeResult:
        with Horizontal(id="metrics-progress"):
            # A Static drawn at each redraw: Textual's ProgressBar repaints on its own clock.
            self._bar = StepBar(id="metrics-bar")
            yield self._bar
            yield self._eta
        with Horizontal(id="metrics-body"):
            with Grid(id="metrics-plots"):
                for i, spec in enumerate(PLOTS):
                    yield MetricPlot(spec, id=f"plot-{i}")
            yield self.table

    def on_mount(self) -> None:
        self.flush(force=True)

    @staticmethod
    def latest_table(values: dict[str, str], evals: dict[str, str] | None = None) -> Text:
        """Metric names and their latest values, one per line (a DataTable costs far more to redraw);
        then the latest evaluation's rows (``evals``: label -> value), when there is one."""
        text = Text(no_wrap=True)
        text.append(f"{'metric':<13}{'latest':>10}\n", style="bold")
        for key, label in TABLE_KEYS:
            text.append(f"{label:<13}")
            text.append(f"{values.get(key, '—'):>10}\n")
        if evals:
            text.append(f"\n{'held-out eval':<13}{'latest':>10}\n", style="bold")
            for label, value in evals.items():
                text.append(f"{label:<13}")
                text.append(f"{value:>10}\n")
        text.rstrip()
        return text

    @staticmethod
    def eval_rows(ev: EvalRecord | None) -> dict[str, str]:
        """The table's rows for the latest evaluation: step, mean reward, its std, prompts scored."""
        if ev is None:
            return {}
        rows = {"eval step": str(ev.step), "eval reward": format_value(ev.accuracy)}
        if ev.std is not None:
            rows["eval std"] = format_value(ev.std)
        rows["eval n"] = str(ev.n)
        return rows

    def add(self, records: list[MetricRecord]) -> None:
        """Take new metric records; redraw soon (throttled, only when on screen)."""
        if self.store.add(records):
            self.redraw.mark()

    def add_evals(self, records: list[EvalRecord]) -> None:
        """Take new eval records (``eval.jsonl``); redraw soon (throttled, only when on screen)."""
        if self.evals.add(records):
            self.redraw.mark()

    def set_run(self, max_steps: int | None, finished: bool) -> None:
        """What run.json says: the step count to reach, and whether the run ended."""
        if (max_steps, finished) != (self.max_steps, self.finished):
            self.max_steps, self.finished = max_steps, finished
            self.redraw.mark()

    def action_toggle_smooth(self) -> None:
        self.set_options(replace(self.options, smooth=not self.options.smooth))

    def action_toggle_x_axis(self) -> None:
        self.set_options(replace(self.options, x_axis="step" if self.options.by_time else "time"))

    def action_zoom(self) -> None:
        steps = self.store.steps
        span = steps[-1] - steps[0] if steps else None
        self.set_options(replace(self.options, last_n=next_zoom(self.options.last_n, span)))

    def set_options(self, options: ChartOptions) -> None:
        """Show the plots with ``options`` (redrawn now: the user just asked)."""
        self.options = options
        for plot in self.query(MetricPlot):
            plot.draw(self.store, self.evals, options)

    def on_show(self) -> None:
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Redraw the table, progress and plots if something changed and they are visible."""
        if not self.redraw.take(force):
            return  # nothing new, or off screen: redrawn on show
        latest = self.store.latest()
        self.latest_values = {key: format_value(latest.finite(key) if latest else None) for key, _ in TABLE_KEYS}
        self.eval_values = self.eval_rows(self.evals.latest())
        self.table.update(self.latest_table(self.latest_values, self.eval_values), layout=False)
        self._update_progress(latest)
        for plot in self.query(MetricPlot):
            plot.draw(self.store, self.evals, self.options)

    def progress_text(self) -> str:
        """``step 37/200 · 0.52 s/step · ETA 1m 25s``, then ``· eval 0.812 (n=32, step 20)``
        once there is an evaluation."""
        latest = self.store.latest()
        ev = self.evals.latest()
        tail = f" · eval {format_value(ev.accuracy)} (n={ev.n}, step {ev.step})" if ev is not None else ""
        if latest is None:
            return "waiting for the first step" + tail
        per = self.store.step_seconds()
        parts = [f"step {latest.step}" + (f"/{self.max_steps}" if self.max_steps else "")]
        if per is not None:
            parts.append(f"{per:.2f} s/step")
        eta = self.store.eta_seconds(self.max_steps)
        if self.finished:
            parts.append("finished")
        elif eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return " · ".join(parts) + tail

    def _update_progress(self, latest: MetricRecord | None) -> None:
        step = latest.step if latest is not None else 0
        self._bar.show(step, self.max_steps)
        self._eta.update(Text(self.progress_text()), layout=False)
