"""Charts people can read: EMA smoothing, x by step or wall time, zoom to the last N steps,
eval points kept under every option, and y labels that never eat into the plot.

The view functions (vlmrl_tui/panes/chartview.py) are tested directly; the keys are pressed
in the real dashboard under Pilot on a 300-step run directory with evaluations.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from rich.console import Console
from rich.style import Style
from rich.text import Text

from backend import records as r
from backend.records import EvalRecord
from backend.rundir import RunDirectory
from tests.test_tui_app import SIZE, loaded, make_app
from tests.tui_rundir import make_run_dir, metrics, screen_text
from vlmrl_tui.panes.chart import LABEL_WIDTH, ChartRender, Series, compact, y_range
from vlmrl_tui.panes.chartview import (
    SMOOTH_WEIGHT,
    ZOOM_STEPS,
    ChartOptions,
    ema,
    next_zoom,
    short_duration,
    view,
)
from vlmrl_tui.panes.metrics import EVAL_LABEL, MetricPlot
from vlmrl_tui.panes.metricstore import downsample

STEPS = 300
EVAL_STEPS = (50, 100, 150, 200, 250, 300)


# ---- the view functions --------------------------------------------------------------


def test_ema_is_debiased_like_tensorboard() -> None:
    assert ema([0.7] * 5) == pytest.approx([0.7] * 5)  # a flat series stays flat from its first point
    w = 0.9
    ys = [0.0, 10.0, 4.0]
    biased, out = 0.0, []
    for n, y in enumerate(ys, 1):
        biased = w * biased + (1 - w) * y
        out.append(biased / (1 - w**n))
    assert ema(ys, w) == pytest.approx(out)
    assert ema(ys, w)[1] == pytest.approx(1.0 / 0.19)  # (0.9*0 + 0.1*10) / (1 - 0.81)
    assert ema([1.0, math.nan, 3.0], 0.5)[2] == pytest.approx((0.25 + 1.5) / 0.75)  # NaN skipped
    assert math.isnan(ema([1.0, math.nan], 0.5)[1])
    assert 0.6 <= SMOOTH_WEIGHT < 1


def test_view_zooms_then_smooths_then_maps_time() -> None:
    xs = [float(s) for s in range(1, 301)]
    ys = [math.sin(s) for s in range(1, 301)]
    zx, zy = view(xs, ys, ChartOptions(last_n=50))
    assert zx == xs[250:] and zy == ys[250:]  # x > 300 - 50
    sx, sy = view(xs, ys, ChartOptions(smooth=True, last_n=50))
    assert sx == zx and sy == pytest.approx(ema(zy))  # smoothing starts inside the window
    assert view(xs[:100], ys[:100], ChartOptions(last_n=50), last_x=300.0) == ([], [])  # cut at the run's end
    times = {1.0: 1000.0, 2.0: 1005.0, 4.0: 1030.0}
    assert view([1, 2, 3, 4], [9, 8, 7, 6], ChartOptions(x_axis="time"), times) == ([0, 5, 30], [9, 8, 6])
    assert view([2, 4], [8, 6], ChartOptions(x_axis="time"), times, t0=990.0) == ([15, 40], [8, 6])


def test_zoom_cycles_and_skips_zooms_that_cut_nothing() -> None:
    assert [next_zoom(z) for z in ZOOM_STEPS] == [*ZOOM_STEPS[1:], None]
    assert next_zoom(None, span=299) == 200 and next_zoom(200, span=299) == 50
    assert next_zoom(None, span=10) is None  # a 10-step run: nothing to zoom into


def test_durations_on_the_time_axis() -> None:
    assert [short_duration(s) for s in (0, 44.6, 300, 330, 3720, 7265)] == ["0s", "45s", "5m", "5m 30s",
                                                                             "1h 02m", "2h 01m"]


# ---- y labels ------------------------------------------------------------------------

WIDE = (-1.23e-05, 123456789.0, -0.5, -0.00123, -99999.9, 1e300, -1e-300, -123456789.0, 0.0)
STYLES = {name: Style() for name in ("band", "extra", "main", "eval", "axis", "title")}


def rows_of(chart: ChartRender, width: int) -> list[str]:
    return ["".join(seg.text for seg in line) for line in chart.lines(Console(width=width))]


def test_compact_labels_fit_their_width() -> None:
    for v in WIDE + (0.00123, 99999.6, 9.9996, -42.123, math.inf, -math.inf):
        assert len(compact(v)) <= LABEL_WIDTH, (v, compact(v))
    assert (compact(-1.23e-05), compact(123456789), compact(-0.5)) == ("-1.2e-5", "1.2e8", "-0.5")


@pytest.mark.parametrize("lo,hi", list(itertools.combinations(WIDE, 2)))
def test_y_labels_sit_in_their_own_gutter(lo: float, hi: float) -> None:
    width, height = 40, 9
    series = [Series([1, 2, 3], [lo, hi, (lo + hi) / 2])]
    chart = ChartRender(Text("t"), series, width, height, STYLES)
    rows = rows_of(chart, width)
    assert len(rows) == height and all(len(row) == width for row in rows)
    plot_rows, x_axis = rows[1:-1], rows[-1]
    gutter = x_axis.index("└")
    assert 1 <= gutter <= LABEL_WIDTH
    for row in plot_rows:
        assert row[gutter] in "┤│", (lo, hi, rows)  # every plot row starts at the same column
        label = row[:gutter]
        assert not label or label == label.rjust(gutter)  # the label is right-aligned, left of the axis
        assert all(ch == " " or 0x2800 <= ord(ch) <= 0x28FF for ch in row[gutter + 1:])  # only the plot
    labels = [row[:gutter].strip() for row in plot_rows if row[gutter] == "┤"]
    bottom, top = y_range(series) or (0, 0)  # (a flat series is padded)
    assert labels[0] == compact(top) and labels[-1] == compact(bottom)


def test_time_labels_are_durations() -> None:
    chart = ChartRender(Text("t"), [Series([0, 1800, 3720], [1, 2, 3])], 60, 8, STYLES, x_label=short_duration)
    axis = rows_of(chart, 60)[-1]
    assert axis.split("└")[1].split() == ["0s", "31m", "1h", "02m"]


# ---- the keys in the dashboard -------------------------------------------------------


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = make_run_dir(tmp_path_factory.mktemp("charts") / "long", steps=STEPS, max_steps=STEPS,
                           rollout_steps=[STEPS])
    with open(RunDirectory(run_dir).eval, "w", encoding="utf-8") as f:
        for step in EVAL_STEPS:
            f.write(json.dumps(EvalRecord(step, 0.5 + step / 1000, 32, eval_time(step)).to_json()) + "\n")
    return run_dir


def eval_time(step: int) -> float:
    return metrics(step, STEPS)[-1][r.TIME] + 2.0  # evaluated just after the step ended


def data(key: str) -> tuple[list[float], list[float]]:
    recs = metrics(STEPS, STEPS)
    return [float(rec[r.STEP]) for rec in recs], [rec[key] for rec in recs]


def drawn(plot: MetricPlot, xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """What ``plot`` draws of (xs, ys): bucketed to 2 points per dot column of its width."""
    assert 64 <= plot.max_points() < STEPS  # the 300 steps are bucketed at this size
    return downsample(xs, ys, plot.max_points())


def by_role(plot: MetricPlot, role: str) -> list[Series]:
    return [s for s in plot.series if s.role == role]


def axis_row(plot: MetricPlot) -> str:
    w, h = plot.content_size
    return rows_of(plot.chart(w, h), w)[-1]


@pytest.mark.asyncio
async def test_smoothing_key_draws_the_ema_over_the_raw_series(long_run: Path) -> None:
    app = make_app(long_run)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        assert app.focused is app.metrics
        reward = app.metrics.query_one("#plot-0", MetricPlot)
        xs, ys = data(r.REWARD_MEAN)
        [main] = by_role(reward, "main")
        assert (main.xs, main.ys) == drawn(reward, xs, ys) and len(by_role(reward, "band")) == 2  # mean ± std
        await pilot.press("e")
        [main] = by_role(reward, "main")
        smooth = drawn(reward, xs, ema(ys))
        assert list(main.xs) == smooth[0] and list(main.ys) == pytest.approx(smooth[1])
        assert any((s.xs, s.ys) == drawn(reward, xs, ys) for s in by_role(reward, "band"))  # raw, dimmed behind
        assert "reward ± std · EMA" in screen_text(app)
        loss = app.metrics.query_one("#plot-1", MetricPlot)
        lx, ly = data(r.LOSS)
        assert list(by_role(loss, "main")[0].ys) == pytest.approx(drawn(loss, lx, ema(ly))[1])
        await pilot.press("e")
        [main] = by_role(reward, "main")
        assert (main.xs, main.ys) == drawn(reward, xs, ys) and len(by_role(reward, "band")) == 2
        assert "· EMA" not in screen_text(app)


@pytest.mark.asyncio
async def test_zoom_key_shows_the_last_steps(long_run: Path) -> None:
    app = make_app(long_run)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        reward = app.metrics.query_one("#plot-0", MetricPlot)
        xs, ys = data(r.REWARD_MEAN)
        shown = []
        for _ in range(5):
            await pilot.press("z")
            [main] = by_role(reward, "main")
            last_n = app.metrics.options.last_n
            first = STEPS - last_n + 1 if last_n else 1
            assert (main.xs, main.ys) == downsample(xs[first - 1:], ys[first - 1:], reward.max_points())
            shown.append((last_n, min(main.xs) >= first, main.xs[-1]))
        # 1000 cuts nothing in a 300-step run and is skipped
        assert shown == [(200, True, 300), (50, True, 300), (20, True, 300), (None, True, 300), (200, True, 300)]
        assert axis_row(reward).split("└")[1].split()[0] == "101"
        assert "reward ± std · last 200" in screen_text(app)
        [ev] = by_role(reward, "eval")
        assert list(ev.xs) == [150, 200, 250, 300]  # evaluations zoomed with the run


@pytest.mark.asyncio
async def test_x_axis_key_switches_to_wall_time(long_run: Path) -> None:
    app = make_app(long_run)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        reward = app.metrics.query_one("#plot-0", MetricPlot)
        assert axis_row(reward).split("└")[1].split()[0] == "1"
        await pilot.press("w")
        recs = metrics(STEPS, STEPS)
        t0 = recs[0][r.TIME]
        [main] = by_role(reward, "main")
        want = drawn(reward, [rec[r.TIME] - t0 for rec in recs], data(r.REWARD_MEAN)[1])
        assert list(main.xs) == pytest.approx(want[0]) and list(main.ys) == pytest.approx(want[1])
        labels = axis_row(reward).split("└")[1]
        # the last point is the evaluation 2 s after the last step: 299 steps x 1.7 s + 2 s
        assert labels.split() == ["0s", "4m", "15s", "8m", "30s"]
        [ev] = by_role(reward, "eval")
        assert list(ev.xs) == pytest.approx([eval_time(s) - t0 for s in EVAL_STEPS])
        assert "by time" in screen_text(app)
        await pilot.press("w")
        assert axis_row(reward).split("└")[1].split()[0] == "1"


@pytest.mark.asyncio
async def test_eval_points_stay_under_every_option(long_run: Path) -> None:
    app = make_app(long_run)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("2")
        reward = app.metrics.query_one("#plot-0", MetricPlot)
        accuracy = [0.5 + s / 1000 for s in EVAL_STEPS]
        for keys in ((), ("e",), ("w",), ("z",), ("e", "w", "z", "z")):
            app.metrics.set_options(ChartOptions())
            await pilot.press(*keys)
            [ev] = by_role(reward, "eval")
            assert ev.marks and ev.label == EVAL_LABEL
            assert ev.ys and list(ev.ys) == pytest.approx(accuracy[-len(ev.ys):]), keys  # never smoothed


@pytest.mark.asyncio
async def test_plots_in_the_app_keep_labels_in_the_gutter(long_run: Path) -> None:
    app = make_app(long_run)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("2", "e", "w")
        for plot in app.metrics.query(MetricPlot):
            w, h = plot.content_size
            rows = rows_of(plot.chart(w, h), w)
            gutter = rows[-1].index("└")
            assert gutter <= LABEL_WIDTH and all(row[gutter] in "┤│" for row in rows[1:-1]), rows
