"""Comparing runs in the dashboard: two real tiny runs (``vlmrl run configs/colors-tiny.toml``
with different learning rates and seeds, one evaluating) overlaid in the metrics tab; the
picker's marks; ``vlmrl-tui --attach A B``; a live run that grows while it is compared; and
the config difference on its own.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable

from backend import records as r
from backend.net import free_port
from backend.rundir import last_lines, write_json_atomic
from tests.tui_rundir import make_run_dir, metrics, run_json, screen_text, wait_for
from vlmrl_tui import tui_main
from vlmrl_tui.app import BULK_RECORDS, VlmrlApp
from vlmrl_tui.panes.compare import CompareChart
from vlmrl_tui.panes.comparedata import MISSING, PALETTE, config_diff, flatten_config, short_keys
from vlmrl_tui.panes.metricstore import REWARD_WINDOW, format_value

ROOT = Path(__file__).resolve().parent.parent
SIZE = (130, 42)
STEPS = 3
# What run B changes: the keys the comparison must list, and nothing else.
B_OVERRIDES = {"trainer.args.learning_rate": 1e-4, "trainer.args.seed": 1, "trainer.args.eval_every": 2,
               "trainer.args.eval_size": 8}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory, tiny_cache_dir: Path) -> tuple[Path, Path]:
    """Two finished real runs side by side under one output dir: A with the config's defaults,
    B with :data:`B_OVERRIDES` (started together: ~30 s each on two cores)."""
    out = tmp_path_factory.mktemp("compare") / "runs"
    procs = {}
    for name, overrides in (("lr3e-4", {}), ("lr1e-4", B_OVERRIDES)):
        log = open(out.parent / f"{name}.out", "w")
        procs[name] = (subprocess.Popen(
            [sys.executable, "-m", "vlmrl_tui.cli", "run", "configs/colors-tiny.toml",
             f"trainer.args.max_steps={STEPS}", f"inference.port={free_port()}",
             *(f"{k}={v}" for k, v in overrides.items()), "--output-dir", str(out), "--name", name],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
        ), log)
    try:
        for name, (proc, log) in procs.items():
            code = proc.wait(timeout=600)
            log.close()
            assert code == 0, f"{name}: vlmrl run exited {code}:\n" + "\n".join(last_lines(log.name, 40))
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out / "lr3e-4", out / "lr1e-4"


def make_app(run_dir: Path | None, **kw: Any) -> VlmrlApp:
    kw.setdefault("gpu", False)
    kw.setdefault("redraw_s", 0.02)
    kw.setdefault("poll_s", 0.05)
    return VlmrlApp(run_dir, **kw)


def records(path: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (path / name).read_text().splitlines() if line.strip()]


def loaded(app: VlmrlApp, steps: int = STEPS) -> bool:
    runs = app.compare.runs
    return (len(runs) > 1 and all(len(run.store.records) == steps and run.info is not None for run in runs)
            and all(row["progress"].startswith(str(steps)) for row in app.compare.table_rows))


def test_config_diff_lists_only_the_keys_whose_values_differ() -> None:
    a = {"model": "m", "trainer": {"args": {"learning_rate": 3e-4, "seed": 0, "run_name": "a", "sync_port": 1,
                                            "lora": {"r": 8}}}, "inference": {"port": 8000, "engine": "hf"},
         "env": {"args": {"sizes": [1, 2]}}}
    b = {"model": "m", "trainer": {"args": {"learning_rate": 1e-4, "seed": 0, "run_name": "b", "sync_port": 2,
                                            "lora": {"r": 16}, "beta": 0.1}}, "inference": {"port": 8001,
                                                                                            "engine": "hf"},
         "env": {"args": {"sizes": [1, 3]}}}
    assert flatten_config(a)["trainer.args.lora.r"] == 8 and flatten_config(a)["env.args.sizes"] == [1, 2]
    diff = config_diff([a, b])
    # ports and run names always differ and say nothing about the experiment
    assert diff == {"trainer.args.learning_rate": [3e-4, 1e-4], "trainer.args.lora.r": [8, 16],
                    "env.args.sizes": [[1, 2], [1, 3]], "trainer.args.beta": [MISSING, 0.1]}
    assert config_diff([a, a]) == {}
    # a run without a config takes no part; its value is None (nothing known)
    assert config_diff([a, None, b])["trainer.args.learning_rate"] == [3e-4, None, 1e-4]
    assert config_diff([a, None]) == {}
    assert config_diff([{"x": 1}, {"x": 1.0}]) == {"x": [1, 1.0]}  # TOML tells 1 from 1.0
    assert short_keys(["trainer.args.seed", "env.args.seed", "trainer.args.learning_rate"]) == {
        "trainer.args.seed": "trainer.args.seed", "env.args.seed": "env.args.seed",
        "trainer.args.learning_rate": "learning_rate"}


@pytest.mark.asyncio
async def test_two_real_runs_overlaid_with_their_table_and_config_difference(real_runs: tuple[Path, Path]) -> None:
    a, b = real_runs
    app = make_app(a, compare=[b])
    async with app.run_test(size=SIZE) as pilot:
        pane = app.compare
        await wait_for(pilot, lambda: loaded(app), timeout=30, what="both runs in the comparison")
        assert app.tabs.active == "tab-metrics" and pane.display and not app.metrics.display
        assert [run.path for run in pane.runs] == [a, b]
        colours = [run.color for run in pane.runs]
        assert colours == list(PALETTE[:2]) and colours[0] != colours[1]

        # every plot has one line per run, each in its run's colour; B's evaluation on the reward plot
        charts = {chart.spec.key: chart for chart in pane.query(CompareChart)}
        for chart in charts.values():
            mains = [s for s in chart.series if s.role == "main"]
            assert [s.color for s in mains] == colours, chart.spec.key
            assert all(list(s.xs) == [1.0, 2.0, 3.0] for s in mains), chart.spec.key
        b_evals = records(b, "eval.jsonl")
        assert [e["step"] for e in b_evals] == [2]
        evals = [s for s in charts["reward_mean"].series if s.role == "eval"]
        assert [(s.color, list(s.xs), list(s.ys)) for s in evals] == [(colours[1], [2.0], [b_evals[0]["accuracy"]])]
        for run, chart_run in zip((a, b), range(2)):
            ys = [rec["reward_mean"] for rec in records(run)]
            assert list(charts["reward_mean"].series[chart_run].ys) == ys

        # exactly the keys B changed differ, each run's value shown
        assert pane.diff == {"trainer.args.learning_rate": [3e-4, 1e-4], "trainer.args.seed": [0, 1],
                             "trainer.args.eval_every": [0, 2], "trainer.args.eval_size": [32, 8]}
        assert set(pane.diff) == set(B_OVERRIDES)
        text = screen_text(app)
        assert "learning_rate: 0.0003 / 0.0001" in text and "seed: 0 / 1" in text
        assert "eval_every: 0 / 2" in text and "eval_size: 32 / 8" in text
        legend = pane.config_text().plain
        assert "run_name" not in legend and "port" not in legend

        # the table: each run's latest and best values, as its metrics.jsonl has them
        for run, row in zip((a, b), pane.table_rows):
            recs = records(run)
            last = recs[-1]
            rewards = [rec[r.REWARD_MEAN] for rec in recs][-REWARD_WINDOW:]
            assert row["run"] == run.name and row["status"] == "completed" and row["progress"] == f"{STEPS}/{STEPS}"
            assert row["reward"] == row["best reward"] == format_value(sum(rewards) / len(rewards))
            for key in (r.LOSS, r.KL, r.ENTROPY):
                assert row[key] == format_value(last[key]), key
            assert row["s/step"] == f"{sum(rec[r.STEP_S] for rec in recs) / len(recs):.2f}"
            line = next(ln for ln in text.splitlines() if f"● {run.name} " in ln)  # the run's row, drawn
            assert line.split()[2:] == [row[k] for k in ("progress", "status", "s/step", "reward", "best reward",
                                                          r.LOSS, r.KL, r.ENTROPY, "eval", "best eval")]
        assert pane.table_rows[0]["eval"] == "—"
        assert pane.table_rows[1]["eval"] == pane.table_rows[1]["best eval"] == format_value(b_evals[0]["accuracy"])

        # the other tabs show the primary run; `c` switches to its own metrics and back
        assert app.run_dir == a and app.processes.run is not None and app.processes.run.name == a.name
        await pilot.press("c")
        assert app.metrics.display and not pane.display and app.focused is app.metrics
        await pilot.press("c")
        assert pane.display and app.focused is pane
        # the metrics pane's chart options apply here too (its keys, pressed in the comparison)
        await pilot.press("e")
        assert app.metrics.options.smooth and "EMA" in charts["loss"].title
        assert list(charts["loss"].series[0].ys) != [rec[r.LOSS] for rec in records(a)]
        await pilot.press("w")  # time axis: each run from its own first step
        assert app.metrics.options.x_axis == "time" and charts["loss"].x_label is not None
        for run, s in zip((a, b), charts["loss"].series):
            times = [rec[r.TIME] for rec in records(run)]
            assert list(s.xs) == [t - times[0] for t in times]


@pytest.mark.asyncio
async def test_compare_key_with_one_run_says_how_to_compare(tmp_path: Path) -> None:
    app = make_app(make_run_dir(tmp_path / "one", steps=3))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.batches > 0, what="the run")
        await pilot.press("c")
        await pilot.pause()
        assert not app.compare.display and app.metrics.display
        assert any("--attach RUN_A RUN_B" in n.message for n in app._notifications)


@pytest.mark.asyncio
async def test_picker_marks_runs_with_space_and_enter_compares_them(real_runs: tuple[Path, Path]) -> None:
    a, b = real_runs
    os.utime(a / "run.json", (1, 1))  # b first in the list (newest first), whatever finished last
    os.utime(a / "metrics.jsonl", (1, 1))
    os.utime(a / "logs", (1, 1))
    app = make_app(None, output_dir=a.parent)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        picker = app.screen
        assert "2 run(s)" in screen_text(app) and "marked" not in screen_text(app)
        await pilot.press("space", "down", "space")
        assert picker.marked == [b, a]
        table = picker.query_one(DataTable)
        assert "2 marked" in screen_text(app)
        assert [table.get_cell(str(p), "mark") for p in (b, a)] == ["●", "●"]
        await pilot.press("space")  # unmark a, mark it again
        assert "1 marked" in screen_text(app) and table.get_cell(str(a), "mark") == ""
        await pilot.press("space", "enter")  # the cursor's run (a) is the primary
        await wait_for(pilot, lambda: loaded(app), timeout=30, what="the comparison")
        assert app.run_dir == a and [run.path for run in app.compare.runs] == [a, b]
        assert app.tabs.active == "tab-metrics" and app.compare.display


def test_attach_several_runs_from_the_command_line(real_runs: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    a, b = real_runs
    parser = tui_main.build_parser()
    args = parser.parse_intermixed_args(["--attach", str(a), str(b), str(a), "--no-gpu"])
    dirs = tui_main.attach_dirs(args.attach)
    assert dirs == [a.resolve(), b.resolve()]  # each once, in order
    app = tui_main.build_app(args, dirs, None)
    assert app.run_dir == a.resolve() and app.compare_dirs == [b.resolve()]
    single = parser.parse_intermixed_args(["--attach", str(a)])
    app = tui_main.build_app(single, tui_main.attach_dirs(single.attach), None)
    assert app.run_dir == a.resolve() and app.compare_dirs == []
    assert "compare" in parser.format_help()

    (tmp_path / "file").write_text("x")
    for bad, what in ((tmp_path / "missing", "no such run directory"), (tmp_path / "file", "not a directory")):
        with pytest.raises(SystemExit) as exit_info:
            tui_main.main(["--attach", str(a), str(bad)])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip() == f"error: {bad}: {what}"
    with pytest.raises(SystemExit):
        tui_main.main(["configs/colors-tiny.toml", "--attach", str(a), str(b)])
    assert "give no CONFIG" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_a_live_run_grows_in_the_comparison_and_odd_directories_say_why(
        real_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = real_runs
    live = make_run_dir(tmp_path / "live", steps=2, max_steps=8, status="running")
    (live / "config.toml").unlink()  # a run without its config: compared, its values unknown
    odd = tmp_path / "not-a-run"
    odd.mkdir()
    broken = make_run_dir(tmp_path / "broken", steps=1, max_steps=8)
    (broken / "config.toml").write_text("[trainer.args\nseed = 1\n")
    app = make_app(a, compare=[live, odd, broken])
    async with app.run_test(size=SIZE) as pilot:
        pane = app.compare

        def step_of(i: int) -> str:
            return pane.table_rows[i]["progress"] if len(pane.table_rows) > i else ""

        await wait_for(pilot, lambda: step_of(1) == "2/8" and pane.runs[2].note is not None, timeout=30,
                       what="the live run's first steps")
        await wait_for(pilot, lambda: pane.runs[3].config is not None, what="the broken config read")
        notes = ("live: no config.toml", "not-a-run: not a run directory",
                 "broken: config.toml unreadable (TOML syntax error")
        # the config read lands first; the throttled redraw shows it a moment later
        await wait_for(pilot, lambda: all(n in screen_text(app) for n in notes), what="the notes on screen")
        assert [row["status"] for row in pane.table_rows] == ["completed", "running", "not a run", "completed"]
        assert pane.diff == {}  # one config known: nothing to compare it with

        # steps written while the comparison is off screen are drawn when it is shown again
        await pilot.press("1")
        new = metrics(8, 8)[2:6]
        with open(live / "metrics.jsonl", "a", encoding="utf-8") as f:
            for rec in new:
                f.write(json.dumps(rec) + "\n")
        await wait_for(pilot, lambda: len(pane.runs[1].store.records) == 6, what="the new steps read")
        await pilot.pause(0.1)
        assert step_of(1) == "2/8"  # not redrawn while hidden
        await pilot.press("2")
        await wait_for(pilot, lambda: step_of(1) == "6/8", what="redrawn on show")
        loss_chart = next(c for c in pane.query(CompareChart) if c.spec.key == "loss")
        assert list(loss_chart.series[1].xs) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        assert list(loss_chart.series[1].ys) == [rec["loss"] for rec in metrics(8, 8)[:6]]

        # and while it is shown, the run's end arrives too
        with open(live / "metrics.jsonl", "a", encoding="utf-8") as f:
            for rec in metrics(8, 8)[6:]:
                f.write(json.dumps(rec) + "\n")
        write_json_atomic(live / "run.json", run_json("completed", max_steps=8))
        await wait_for(pilot, lambda: step_of(1) == "8/8" and pane.table_rows[1]["status"] == "completed",
                       what="the live run's end")
        assert "8/8" in screen_text(app)


@pytest.mark.asyncio
@pytest.mark.parametrize("own_process", [True, False])
async def test_the_app_of_its_own_process_freezes_the_records_it_read_out_of_full_collections(
        tmp_path: Path, own_process: bool) -> None:
    # vlmrl-tui owns its process: the records of runs read in bulk leave the collector's full
    # passes (they paused a 3-run comparison's redraw); an app sharing its process freezes nothing
    steps = BULK_RECORDS + 100
    a, b = (make_run_dir(tmp_path / name, steps=steps, max_steps=steps, rollout_steps=[]) for name in "ab")
    gc.unfreeze()
    try:
        app = make_app(a, compare=[b], own_process=own_process)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: loaded(app, steps), timeout=30, what="both runs in the comparison")
            records = [next(iter(run.store.records.values())) for run in app.compare.runs]
            assert all(gc.is_tracked(rec) for rec in records)
            collected = {id(o) for o in gc.get_objects()}  # the permanent generation is not listed
            assert [id(rec) in collected for rec in records] == [not own_process] * 2
            assert (gc.get_freeze_count() > 0) == own_process
    finally:
        gc.unfreeze()
