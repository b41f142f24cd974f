"""The run summary under the header: what it says on every tab, how it ages and warns
when a live run stops writing metrics, and that it stays cheap on a long run.

The dashboard runs under Pilot on real run directories (tests/tui_rundir.py); its clock is
injected (``VlmrlApp(clock=...)``) so ages are exact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from backend import records as r
from backend.rundir import RunDirectory, write_json_atomic
from tests.test_tui_app import SIZE, loaded, make_app
from tests.tui_rundir import T0, make_run_dir, metrics, run_json, screen_text, wait_for
from vlmrl_tui.panes.metricstore import REWARD_WINDOW, MetricsStore, RewardWindow
from vlmrl_tui.panes.summary import format_reward

STEPS, MAX_STEPS = 37, 200
DIP_FROM = 33  # from this step on the reward drops: the best 10 steps are behind the run


def live_metrics(steps: int) -> list[dict]:
    """The fixture's metric records with the weights version, and a reward dip at the end."""
    out = metrics(steps, MAX_STEPS)
    for rec in out:
        rec[r.WEIGHT_VERSION] = rec[r.STEP]
        if rec[r.STEP] >= DIP_FROM:
            rec[r.REWARD_MEAN] = 0.1
    return out


def last_time(steps: int) -> float:
    return metrics(steps, MAX_STEPS)[-1][r.TIME]


def live_run_dir(path: Path, steps: int = STEPS) -> Path:
    """A running run of ``steps`` steps whose records carry the weights version; its
    supervisor is on "another host" (so the app does not declare it dead)."""
    run_dir = make_run_dir(path, steps=steps, max_steps=MAX_STEPS, status="running", rollout_steps=[4])
    info = run_json("running", max_steps=MAX_STEPS)
    info["host"], info["ended_at"] = "another-host", None
    write_json_atomic(run_dir / "run.json", info)
    with open(RunDirectory(run_dir).metrics, "w", encoding="utf-8") as f:
        for rec in live_metrics(steps):
            f.write(json.dumps(rec) + "\n")
    return run_dir


def expected_reward(recs: list[dict]) -> tuple[float, float]:
    """(mean of the last 10 rewards, best mean of 10 consecutive steps), the slow way."""
    rs = [rec[r.REWARD_MEAN] for rec in recs]
    means = [sum(rs[i - REWARD_WINDOW:i]) / REWARD_WINDOW for i in range(REWARD_WINDOW, len(rs) + 1)]
    return means[-1], max(means)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_summary_line_on_every_tab_of_a_live_run(tmp_path: Path) -> None:
    run_dir = live_run_dir(tmp_path / "live")
    clock = Clock(last_time(STEPS) + 3)
    app = make_app(run_dir, clock=clock)
    mean, best = expected_reward(live_metrics(STEPS))
    assert best > mean + 0.1  # the best window is not the last one
    want = (f"step 37/200 · reward {format_reward(mean)} (best {format_reward(best)}) · 1.70 s/step · "
            f"ETA 4m 37s · weights v37 · last metric 3s ago")  # 163 steps x 1.7 s = 277 s
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await wait_for(pilot, lambda: app.summary.line.plain == want, timeout=5, what="the summary")
        for tab in ("logs", "metrics", "rollouts"):
            await pilot.press({"logs": "1", "metrics": "2", "rollouts": "3"}[tab])
            await pilot.pause()
            rows = screen_text(app).splitlines()
            assert rows[1].strip() == want, (tab, rows[1])  # right under the header
        await pilot.press("p")  # the processes pane focused: still there
        await pilot.pause()
        assert screen_text(app).splitlines()[1].strip() == want

        # A new step arrives: the line follows within its 1 s tick.
        with open(RunDirectory(run_dir).metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(live_metrics(STEPS + 1)[-1]) + "\n")
        clock.now = last_time(STEPS + 1) + 1
        await wait_for(pilot, lambda: app.summary.line.plain.startswith("step 38/200"), timeout=5, what="step 38")
        assert "weights v38 · last metric 1s ago" in app.summary.line.plain
        mean, best = expected_reward(live_metrics(STEPS + 1))
        assert f"reward {format_reward(mean)} (best {format_reward(best)})" in app.summary.line.plain


@pytest.mark.asyncio
async def test_a_stalled_live_run_is_shown_as_a_warning(tmp_path: Path) -> None:
    run_dir = live_run_dir(tmp_path / "live")
    clock = Clock(last_time(STEPS) + 29)
    app = make_app(run_dir, clock=clock)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await wait_for(pilot, lambda: app.summary.line.plain.endswith("last metric 29s ago"), timeout=5,
                       what="the age")
        assert not app.summary.line.stalled
        normal = segment_style(app, "last metric")

        clock.now = last_time(STEPS) + 130  # > max(30 s, 10 x 1.7 s)
        await wait_for(pilot, lambda: app.summary.line.stalled, timeout=5, what="the stall")
        assert app.summary.line.plain.endswith("ETA 4m 37s · weights v37 · no metric for 2m 10s")
        await pilot.pause()
        stalled = segment_style(app, "no metric for 2m 10s")
        warning = app.summary.get_component_rich_style("summary--stall")
        assert stalled.color == warning.color and stalled.bold and stalled.color != normal.color
        assert "no metric for 2m 10s" in screen_text(app).splitlines()[1]

        await pilot.press("3")  # on another tab too
        await pilot.pause()
        assert "no metric for 2m 10s" in screen_text(app).splitlines()[1]


def segment_style(app, text: str):  # type: ignore[no-untyped-def]
    """The style the summary line is drawn with where it shows ``text``."""
    strip = app.summary.render_line(0)
    for seg in strip:
        if text in seg.text:
            return seg.style
    raise AssertionError(f"{text!r} not in {strip.text!r}")


@pytest.mark.asyncio
async def test_a_finished_run_says_finished_and_does_not_age(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "done")  # 40 of 40 steps, completed
    clock = Clock(T0 + 10_000)
    app = make_app(run_dir, clock=clock)
    mean, best = expected_reward(metrics(40, 40))
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        want = f"step 40/40 · reward {format_reward(mean)} (best {format_reward(best)}) · 1.70 s/step · finished"
        await wait_for(pilot, lambda: app.summary.line.plain == want, timeout=5, what="finished")
        assert "ago" not in screen_text(app).splitlines()[1] and "weights" not in want  # no version logged
        clock.now += 3600
        await pilot.pause(1.3)
        assert app.summary.line.plain == want


@pytest.mark.asyncio
async def test_before_the_first_step_it_says_so_with_the_run_status(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path / "new").create()
    info = run_json("starting", max_steps=MAX_STEPS)
    info["host"] = "another-host"
    write_json_atomic(rd.run_json, info)
    app = make_app(rd.path)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await wait_for(pilot, lambda: app.summary.line.plain == "waiting for the first step · starting",
                       timeout=5, what="waiting")
        assert screen_text(app).splitlines()[1].strip() == "waiting for the first step · starting"


def test_reward_window_mean_and_best_follow_the_definition() -> None:
    w = RewardWindow(3)
    assert w.mean is None and w.best is None
    w.push(1.0)
    assert w.mean == w.best == 1.0  # a partial window counts until a full one exists
    w.push(0.0)
    w.push(0.5)
    assert w.mean == pytest.approx(0.5) and w.best == pytest.approx(0.5)
    w.push(1.0)  # (0, 0.5, 1)
    w.push(1.0)  # (0.5, 1, 1)
    assert w.mean == pytest.approx(2.5 / 3) and w.best == pytest.approx(2.5 / 3)
    w.push(0.0)
    assert w.mean == pytest.approx(2 / 3) and w.best == pytest.approx(2.5 / 3)


def test_store_rebuilds_when_a_resumed_run_logs_steps_again() -> None:
    store = MetricsStore()
    store.add(metrics(30, 100))
    assert store.steps == list(range(1, 31))
    again = metrics(25, 100)[19:]  # steps 20..25 logged again after a resume, with other rewards
    for rec in again:
        rec[r.REWARD_MEAN] = 0.0
    store.add(again)
    store.add(metrics(31, 100)[-1:])
    rs = [store.records[s].finite(r.REWARD_MEAN) for s in store.steps]
    assert store.steps == list(range(1, 32)) and rs[19:25] == [0.0] * 6
    assert store.reward.mean == pytest.approx(sum(rs[-10:]) / 10)
    assert store.reward.best == pytest.approx(max(sum(rs[i - 10:i]) / 10 for i in range(10, 32)))
    assert store.series(r.REWARD_MEAN)[1] == rs


def test_a_new_step_costs_the_same_on_a_long_run() -> None:
    """An update on a 50k-step run costs about what it costs on a 500-step one (not O(n))."""
    from vlmrl_tui.panes.summary import summarize

    def per_step_cost(n: int) -> float:
        recs = metrics(n + 200, n + 200)
        store = MetricsStore()
        store.add(recs[:n])
        store.series(r.REWARD_MEAN)  # cached series are kept up to date as steps arrive
        best = float("inf")
        for k in range(5):
            t = time.perf_counter()
            for rec in recs[n + 40 * k : n + 40 * (k + 1)]:
                store.add([rec])
                summarize(store, None, rec[r.TIME], None)
            best = min(best, (time.perf_counter() - t) / 40)
        return best

    short, long = per_step_cost(500), per_step_cost(50_000)
    assert long < 10 * short, (short, long)  # O(n) would be ~100x
