"""Held-out evaluations (``eval.jsonl``) in the views: the metrics pane and headless mode.

The dashboard's app hands each :class:`~vlmrl_tui.watch.RunUpdate` to its panes; here a
small host app does the same for the metrics pane alone, so the pane is tested as the
dashboard shows it. A run without eval lines must look exactly as before (the snapshots
in test_tui_snapshots.py hold that for the whole dashboard).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.style import Style
from textual.app import App, ComposeResult

from backend.records import EvalRecord
from backend.rundir import RunDirectory
from tests.tui_rundir import make_run_dir, screen_text, wait_for
from vlmrl_tui.headless import HeadlessView, attach_headless, eval_line
from vlmrl_tui.panes.chart import ChartRender, Series
from vlmrl_tui.panes.metrics import EVAL_LABEL, MetricPlot, MetricsPane
from vlmrl_tui.watch import RunFeed

SIZE = (130, 42)


def eval_json(step: int, accuracy: float, n: int = 32, **kw: object) -> dict:
    return EvalRecord(step, accuracy, n, 1000.0 + step, **kw).to_json()  # type: ignore[arg-type]


def write_evals(run_dir: Path, *records: dict) -> None:
    with open(RunDirectory(run_dir).eval, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


class MetricsHost(App[None]):
    """The metrics pane fed from a :class:`RunFeed` the way the dashboard feeds it."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.feed = RunFeed(run_dir)
        self.pane = MetricsPane(redraw_s=0.01, id="metrics")

    def compose(self) -> ComposeResult:
        yield self.pane

    def take(self) -> None:
        update = self.feed.poll()
        if update.info is not None:
            self.pane.set_run(update.info.max_steps, update.info.finished)
        if update.metrics:
            self.pane.add(update.metrics)
        if update.evals:
            self.pane.add_evals(update.evals)


def reward_plot(pane: MetricsPane) -> MetricPlot:
    return pane.query_one("#plot-0", MetricPlot)


@pytest.mark.asyncio
async def test_the_metrics_pane_shows_eval_rewards(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", rollout_steps=[])
    write_evals(run_dir, eval_json(10, 0.25), eval_json(20, 0.5, std=0.5), eval_json(30, 0.625))
    app = MetricsHost(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = app.pane
        app.take()
        await wait_for(pilot, lambda: "eval 0.625 (n=32, step 30)" in pane.progress_text()
                       and not pane.redraw.dirty, what="eval in the progress line")
        await pilot.pause()
        text = screen_text(app)
        assert "step 40/40" in text and "eval 0.625 (n=32, step 30)" in text
        assert "held-out eval" in text and "● eval" in text  # the table's rows, the reward plot's legend
        assert pane.eval_values == {"eval step": "30", "eval reward": "0.625", "eval n": "32"}
        evals = [s for s in reward_plot(pane).series if s.role == "eval"]
        assert len(evals) == 1 and evals[0].label == EVAL_LABEL and evals[0].marks
        assert (list(evals[0].xs), list(evals[0].ys)) == ([10.0, 20.0, 30.0], [0.25, 0.5, 0.625])
        assert all(s.role != "eval" for plot in pane.query(MetricPlot) if plot.id != "plot-0" for s in plot.series)

        write_evals(run_dir, eval_json(40, 0.8125, n=64, std=0.39))  # a later evaluation
        app.take()
        await wait_for(pilot, lambda: "eval 0.8125 (n=64, step 40)" in screen_text(app), what="the new eval")
        assert pane.eval_values == {"eval step": "40", "eval reward": "0.8125", "eval std": "0.39", "eval n": "64"}
        assert list(next(s for s in reward_plot(pane).series if s.role == "eval").xs)[-1] == 40.0


@pytest.mark.asyncio
async def test_a_run_without_evals_looks_as_before(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", rollout_steps=[])
    app = MetricsHost(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = app.pane
        app.take()
        await wait_for(pilot, lambda: "step 40/40" in screen_text(app) and not pane.redraw.dirty, what="metrics")
        text = screen_text(app)
        assert "eval" not in text.lower()
        assert pane.eval_values == {} and "eval" not in pane.progress_text()
        assert [s.role for s in reward_plot(pane).series] == ["band", "band", "main"]
        assert [s.label for s in reward_plot(pane).series] == [None, None, None]
    values = {"reward_mean": "0.5"}
    assert MetricsPane.latest_table(values, {}) == MetricsPane.latest_table(values)


def test_a_single_eval_point_is_drawn_as_a_visible_mark() -> None:
    styles = {name: Style(color=c) for name, c in
              (("main", "blue"), ("extra", "yellow"), ("band", "grey50"), ("eval", "green"), ("axis", "white"))}
    from rich.text import Text

    series = [Series([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], "main"),
              Series([2.0], [0.4], "eval", label="eval", marks=True)]
    lines = ChartRender(Text("reward"), series, 30, 8, styles).lines(Console(file=io.StringIO()))
    marked = [seg.text for line in lines for seg in line if seg.style == styles["eval"]]
    assert marked and sum(ch != " " for t in marked for ch in t) >= 2  # a 3x3-dot square spans cells


def test_headless_prints_one_line_per_new_eval(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", steps=20, max_steps=40, rollout_steps=[])
    out = io.StringIO()
    view = HeadlessView(40, out=out, tty=False, feed=RunFeed(run_dir))
    write_evals(run_dir, eval_json(10, 0.5))
    with open(RunDirectory(run_dir).eval, "a", encoding="utf-8") as f:
        f.write(json.dumps(eval_json(20, 0.8125))[:10])  # being written
    view.drain()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "eval step 10: reward 0.500 (n=32)"
    assert lines.index("eval step 10: reward 0.500 (n=32)") > max(
        i for i, ln in enumerate(lines) if ln.startswith("step 20/40"))  # after the step lines
    with open(RunDirectory(run_dir).eval, "a", encoding="utf-8") as f:
        f.write(json.dumps(eval_json(20, 0.8125))[10:] + "\n")
    view.drain()
    assert out.getvalue().splitlines()[-1] == "eval step 20: reward 0.812 (n=32)"
    view.drain()
    assert out.getvalue().count("eval step") == 2
    assert eval_line(EvalRecord(5, 0.5, 8, 0.0, std=0.25)) == "eval step 5: reward 0.500 ± 0.250 (n=8)"


def test_attach_shows_the_evals_of_a_finished_run(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", rollout_steps=[])
    write_evals(run_dir, *(eval_json(s, s / 50) for s in (10, 20, 30, 40)))
    out = io.StringIO()
    attach_headless(run_dir, out=out, tty=False)  # the fixture's run.json has no exit code: 1
    text = out.getvalue()
    assert "eval step 10: reward 0.200 (n=32)" in text and "eval step 40: reward 0.800 (n=32)" in text
    assert "eval reward=0.80 at step 40" in text.rstrip().splitlines()[-1]
    plain = io.StringIO()
    attach_headless(make_run_dir(tmp_path / "plain", rollout_steps=[]), out=plain, tty=False)
    assert "eval step" not in plain.getvalue() and "eval reward" not in plain.getvalue()


@pytest.mark.asyncio
async def test_the_dashboard_hands_eval_lines_to_the_metrics_tab(tmp_path: Path) -> None:
    """The whole app, attached to a run directory with eval lines: its feed reaches the pane."""
    from tests.test_tui_app import make_app

    run_dir = make_run_dir(tmp_path / "run", rollout_steps=[])
    write_evals(run_dir, eval_json(20, 0.5, std=0.5), eval_json(40, 0.75))
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await wait_for(pilot, lambda: "eval 0.75 (n=32, step 40)" in screen_text(app), what="eval on the metrics tab")
        assert "● eval" in screen_text(app)
        assert app.metrics.eval_values["eval reward"] == "0.75"
