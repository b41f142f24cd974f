"""Metrics pane: plots over steps, a table of the latest values, step progress and ETA.

Records come from ``metrics.jsonl`` (one per optimizer step) and ``eval.jsonl`` (one per
held-out evaluation, every ``eval_every`` steps): eval rewards are drawn on the reward plot
as a second series, and the latest one is shown in the progress line and the table. A run
without evaluations looks as if evals did not exist. Charts, table and progress
are redrawn at most once per ``redraw_s`` and only while the pane is on screen: a run can
log several steps a second, and nothing needs redrawing that often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Static

from backend import records as r
from backend.records import EvalRecord, MetricRecord
from vlmrl_tui.panes.chart import LineChart, Series


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

MAX_POINTS = 600  # series longer than this are bucketed (bucket means) before plotting
EVAL_LABEL = "eval"  # the eval series' legend on the reward plot


def format_value(v: float | None) -> str:
    """A metric value in at most ~8 characters."""
    if v is None:
        return "—"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def format_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s`` or ``12s``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def downsample(xs: list[float], ys: list[float], n: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most ``n`` points: means of equal buckets (the last point is kept as is)."""
    if len(xs) <= n:
        return xs, ys
    size = math.ceil(len(xs) / n)
    ox, oy = [], []
    for i in range(0, len(xs) - 1, size):
        bx, by = xs[i : i + size], ys[i : i + size]
        ox.append(sum(bx) / len(bx))
        oy.append(sum(by) / len(by))
    ox.append(xs[-1])
    oy.append(ys[-1])
    return ox, oy


class MetricsStore:
    """Metric records by step (a resumed run that logs a step again replaces it)."""

    def __init__(self) -> None:
        self.records: dict[int, MetricRecord] = {}
        self._steps: list[int] | None = None
        self._series: dict[str, tuple[list[float], list[float]]] = {}  # by key, until the next add

    def add(self, records: Iterable[MetricRecord | Mapping[str, Any]]) -> int:
        n = 0
        for item in records:
            rec = MetricRecord.from_json(item)
            if rec is None:
                continue
            self.records[rec.step] = rec
            n += 1
        if n:
            self._steps = None
            self._series.clear()
        return n

    @property
    def steps(self) -> list[int]:
        if self._steps is None:
            self._steps = sorted(self.records)
        return self._steps

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) where ``key`` has a finite value (shared lists: do not modify)."""
        cached = self._series.get(key)
        if cached is not None:
            return cached
        xs: list[float] = []
        ys: list[float] = []
        records = self.records
        for step in self.steps:
            v = records[step].finite(key)
            if v is not None:
                xs.append(float(step))
                ys.append(v)
        self._series[key] = (xs, ys)
        return xs, ys

    def latest(self) -> MetricRecord | None:
        return self.records[max(self.records)] if self.records else None

    def step_seconds(self, window: int = 20) -> float | None:
        """Recent seconds per step (from ``step_s``, else from ``time`` stamps)."""
        steps = self.steps[-window:]
        vals = [v for s in steps if (v := self.records[s].finite(r.STEP_S)) is not None]
        if vals:
            return sum(vals) / len(vals)
        times = [(s, t) for s in steps if (t := self.records[s].finite(r.TIME)) is not None]
        if len(times) >= 2 and times[-1][0] > times[0][0]:
            return (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])
        return None


class EvalStore:
    """Eval records by step (a resumed run that evaluates a step again replaces it)."""

    def __init__(self) -> None:
        self.records: dict[int, EvalRecord] = {}
        self._series: tuple[list[float], list[float]] | None = None

    def __bool__(self) -> bool:
        return bool(self.records)

    def add(self, records: Iterable[EvalRecord | Mapping[str, Any]]) -> int:
        n = 0
        for item in records:
            rec = item if isinstance(item, EvalRecord) else EvalRecord.from_json(item)
            if rec is None:
                continue
            self.records[rec.step] = rec
            n += 1
        if n:
            self._series = None
        return n

    def series(self) -> tuple[list[float], list[float]]:
        """(steps, mean rewards) of the finite evaluations (shared lists: do not modify)."""
        if self._series is None:
            pairs = [(float(s), self.records[s].accuracy) for s in sorted(self.records)]
            pairs = [(x, y) for x, y in pairs if math.isfinite(y)]
            self._series = ([x for x, _ in pairs], [y for _, y in pairs])
        return self._series

    def latest(self) -> EvalRecord | None:
        return self.records[max(self.records)] if self.records else None


class MetricPlot(LineChart):
    """One chart of a :class:`PlotSpec`, fed from a :class:`MetricsStore`."""

    DEFAULT_CSS = "MetricPlot { height: 1fr; width: 1fr; min-height: 6; }"

    def __init__(self, spec: PlotSpec, *, id: str | None = None) -> None:
        super().__init__(spec.title, id=id)
        self.spec = spec

    def draw(self, store: MetricsStore, evals: EvalStore | None = None) -> None:
        spec = self.spec
        series: list[Series] = []
        xs, ys = store.series(spec.key)
        if xs and spec.band:
            std = dict(zip(*store.series(spec.band)))
            pairs = [(x, y, std[x]) for x, y in zip(xs, ys) if x in std]
            for sign in (1, -1):
                bx, by = downsample([p[0] for p in pairs], [p[1] + sign * p[2] for p in pairs])
                series.append(Series(bx, by, "band"))
        for env in (spec.low, spec.high):
            if env and xs:
                series.append(Series(*downsample(*store.series(env)), "band"))
        for extra in spec.extra:
            ex, ey = store.series(extra)
            if ex:
                series.append(Series(*downsample(ex, ey), "extra", label=extra))
        if xs:
            series.append(Series(*downsample(xs, ys), "main", label=spec.key if spec.extra else None))
        if spec.evals and evals:
            ex, ey = evals.series()
            if ex:
                series.append(Series(*downsample(ex, ey), "eval", label=EVAL_LABEL, marks=True))
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


class MetricsPane(Vertical):
    """Plots, latest values, progress and ETA of the run's optimizer steps."""

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
        self.redraw_s = redraw_s
        self.store = MetricsStore()
        self.evals = EvalStore()
        self.max_steps: int | None = None  # from run.json
        self.finished = False
        self._dirty = False
        self._timer_pending = False
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
            self._dirty = True
            self._schedule()

    def add_evals(self, records: list[EvalRecord]) -> None:
        """Take new eval records (``eval.jsonl``); redraw soon (throttled, only when on screen)."""
        if self.evals.add(records):
            self._dirty = True
            self._schedule()

    def set_run(self, max_steps: int | None, finished: bool) -> None:
        """What run.json says: the step count to reach, and whether the run ended."""
        if (max_steps, finished) != (self.max_steps, self.finished):
            self.max_steps, self.finished = max_steps, finished
            self._dirty = True
            self._schedule()

    def _schedule(self) -> None:
        if not self._timer_pending and self.is_mounted:
            self._timer_pending = True
            self.set_timer(self.redraw_s, self._timer_flush)

    def _timer_flush(self) -> None:
        self._timer_pending = False
        self.flush()

    def on_show(self) -> None:
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Redraw the table, progress and plots if something changed and they are visible."""
        if not (self._dirty or force):
            return
        if not force and not self.is_on_screen:
            return  # redrawn on show
        self._dirty = False
        latest = self.store.latest()
        self.latest_values = {key: format_value(latest.finite(key) if latest else None) for key, _ in TABLE_KEYS}
        self.eval_values = self.eval_rows(self.evals.latest())
        self.table.update(self.latest_table(self.latest_values, self.eval_values), layout=False)
        self._update_progress(latest)
        for plot in self.query(MetricPlot):
            plot.draw(self.store, self.evals)

    def progress_text(self) -> str:
        """``step 37/200 · 0.52 s/step · ETA 1m 25s``, then ``· eval 0.812 (n=32, step 20)``
        once there is an evaluation."""
        latest = self.store.latest()
        ev = self.evals.latest()
        tail = f" · eval {format_value(ev.accuracy)} (n={ev.n}, step {ev.step})" if ev is not None else ""
        if latest is None:
            return "waiting for the first step" + tail
        step = latest.step
        per = self.store.step_seconds()
        parts = [f"step {step}" + (f"/{self.max_steps}" if self.max_steps else "")]
        if per is not None:
            parts.append(f"{per:.2f} s/step")
        if self.finished:
            parts.append("finished")
        elif self.max_steps and per is not None:
            parts.append(f"ETA {format_duration(max(0, self.max_steps - step) * per)}")
        return " · ".join(parts) + tail

    def _update_progress(self, latest: MetricRecord | None) -> None:
        step = latest.step if latest is not None else 0
        self._bar.show(step, self.max_steps)
        self._eta.update(Text(self.progress_text()), layout=False)
