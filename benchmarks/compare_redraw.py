"""The run comparison's redraw: 3 runs of 2,000 steps each, all six plots and the table.

Three run directories like tests/tui_rundir.py's (each run's rewards shifted, so no two
curves coincide; one with an evaluation every 100 steps) are opened as one comparison
(``VlmrlApp(A, compare=[B, C])``) in a headless Textual app of 130x42. Once all 6,000 steps
are in, each round times one full redraw, in two cases:

- ``new step``: every run got one more step (what a live comparison redraws), then the
  pane's flush (series, table, config line) and the whole screen composited, which
  renders every chart's strips and the table;
- ``options``: smoothing toggled, so every series of every run is computed again (zoom,
  EMA, downsampling) before the same flush and composite.

The app runs as vlmrl-tui runs it (``own_process``: its heap frozen once the runs are read,
so the collector's full passes skip the records). Target: under 50 ms for a redraw. Median
and spread are printed, of wall time and of the UI thread's CPU time (which other work on a
shared machine does not inflate), with the load average before and after. Nothing is asserted.

    python benchmarks/compare_redraw.py [--rounds 30] [--steps 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.records import MetricRecord  # noqa: E402
from tests.tui_rundir import T0, make_run_dir, metrics  # noqa: E402
from vlmrl_tui.app import VlmrlApp  # noqa: E402
from vlmrl_tui.panes.compare import CompareChart  # noqa: E402

SIZE = (130, 42)
TARGET_MS = 50.0


def make_runs(root: Path, steps: int) -> list[Path]:
    """Three finished runs of ``steps`` steps: rewards shifted per run, the second with evals,
    the third with another learning rate in its config."""
    runs = []
    for k, name in enumerate(("base", "evals", "lr")):
        path = make_run_dir(root / name, steps=0, max_steps=steps, server_lines=20, rollout_steps=[])
        with open(path / "metrics.jsonl", "w", encoding="utf-8") as f:
            for rec in metrics(steps, steps):
                rec["reward_mean"] = round(rec["reward_mean"] * (1 - 0.15 * k), 4)
                f.write(json.dumps(rec) + "\n")
        if k == 1:
            with open(path / "eval.jsonl", "w", encoding="utf-8") as f:
                for step in range(100, steps + 1, 100):
                    f.write(json.dumps({"step": step, "accuracy": 0.5 + 0.4 * step / steps, "n": 32,
                                        "time": T0 + 31.0 + 1.7 * step}) + "\n")
        if k == 2:
            config = path / "config.toml"
            config.write_text(config.read_text() + "learning_rate = 1e-5\n", encoding="utf-8")
        runs.append(path)
    return runs


def one_step(step: int) -> list[MetricRecord]:
    rec = metrics(step, step)[-1]
    return [MetricRecord.from_json(rec)]  # type: ignore[list-item]


async def bench(rounds: int, steps: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(Path(tmp), steps)
        # own_process: this process is the app's alone, as with vlmrl-tui (its heap is frozen
        # after the runs load, see VlmrlApp._settle_heap)
        app = VlmrlApp(runs[0], compare=runs[1:], gpu=False, poll_s=0.05, redraw_s=3600.0, own_process=True)
        async with app.run_test(size=SIZE) as pilot:
            pane = app.compare
            for _ in range(400):
                if pane.active and all(len(run.store.records) == steps for run in pane.runs):
                    break
                await pilot.pause(0.05)
            else:
                raise SystemExit("the runs did not load")
            await pilot.pause(0.2)
            assert pane.is_on_screen, "the comparison is not on screen"
            charts = list(pane.query(CompareChart))
            compositor = app.screen._compositor

            def redraw(case: str) -> None:
                t, c = time.perf_counter(), time.thread_time()
                pane.flush(force=True)
                compositor.render_update(full=True)  # every chart's strips, the table, the screen
                out[case].append((time.perf_counter() - t) * 1000)
                out[case + " (cpu)"].append((time.thread_time() - c) * 1000)
                assert all(c._strips is not None for c in charts), "a chart was not rendered"

            out: dict[str, list[float]] = {"new step": [], "new step (cpu)": [], "options": [], "options (cpu)": []}
            step = steps
            for _ in range(rounds):
                step += 1
                for run in pane.runs:
                    run.store.add(one_step(step))
                redraw("new step")
                metrics_pane = app.metrics
                metrics_pane.options = replace(metrics_pane.options, smooth=not metrics_pane.options.smooth)
                redraw("options")
                await pilot.pause()
            n_points = sum(len(s.xs) for c in charts for s in c.series)
            print(f"{len(pane.runs)} runs x {step} steps; {len(charts)} plots, {n_points} points drawn after "
                  f"downsampling; table rows: {[row['run'] for row in pane.table_rows]}")
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    load_before = os.getloadavg()
    results = asyncio.run(bench(args.rounds, args.steps))
    load_after = os.getloadavg()
    for name, times in results.items():
        times = times[1:] if len(times) > 1 else times  # the first round warms caches of Textual's own
        med = statistics.median(times)
        q = statistics.quantiles(times, n=10) if len(times) >= 10 else [min(times), max(times)]
        print(f"{name:<15} median {med:6.1f} ms  (p10 {q[0]:.1f}, p90 {q[-1]:.1f}, min {min(times):.1f}, "
              f"max {max(times):.1f}; {len(times)} rounds)  = {med / TARGET_MS:.2f} x the {TARGET_MS:.0f} ms target")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
