"""The dashboard's log path and idle cost: lines/s into a pane, memory over 5M lines, idle CPU.

Three measurements, each in a headless Textual app of 130x42 (rendering included; the
driver just discards the output):

1. ``ingest``: ~200-character lines with ANSI colours pushed into a log pane in batches
   (one ``LogsPane.ingest`` call and one screen refresh per batch), and end to end: lines
   appended to ``logs/trainer.log`` by a writer thread, tailed by the app's own feed
   worker and shown by the pane. Target: >= 100k lines/s into a pane.
2. ``memory``: 5M lines through a pane with the default 10k-line scrollback; RSS growth
   after a GC, and the peak. Target: < 50 MB.
3. ``idle``: CPU time of the whole dashboard process (UI thread plus its reader, stats and
   GPU workers) while it watches a live run, as % of one core. ``--run fake`` (default)
   is a supervisor with the stand-in server and trainer of tests/fixtures, logging a few
   lines a second; ``--run real`` is ``vlmrl run configs/colors-tiny.toml``. Target: < 3%.

    python benchmarks/tui_logs.py                 # all three
    python benchmarks/tui_logs.py ingest memory
    python benchmarks/tui_logs.py idle --run real --seconds 60 --screenshots docs   # + SVGs

Figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.records import PROC_TRAINER, RUNNING, RunInfo  # noqa: E402
from backend.rundir import RunDirectory, write_json_atomic  # noqa: E402
from vlmrl_tui.app import VlmrlApp  # noqa: E402
from vlmrl_tui.watch import LogChunk, RunUpdate, display_path  # noqa: E402
from vlmrl_tui.panes.logs import LogView  # noqa: E402
from backend.net import free_port  # noqa: E402

SIZE = (130, 42)
PROC = psutil.Process()


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in PROC.threads():
        name = names.get(t.id, "other")
        name = "ui (main)" if name == "MainThread" else name
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


def make_lines(start: int, n: int) -> list[str]:
    """n distinct ~200-character log lines with ANSI colour codes."""
    return [
        f"\x1b[32mINFO\x1b[0m 2026-01-01 12:00:00,{i % 1000:03d} vlmrl.train: step {i} "
        f"\x1b[1mreward\x1b[0m=0.{i % 97:02d} loss=-0.{i % 89:03d} ir=1.00 ent=0.85 kl=0.000 "
        f"tokens/s={900 + i % 50} rollout_s=1.11 train_s=1.08 sync_s=0.04 "
        f"\x1b[36mrequest\x1b[0m id={i:012d} padding padding padding"
        for i in range(start, start + n)
    ]


def rss_mb() -> float:
    return PROC.memory_info().rss / 2**20


def pane_app(tmp: str) -> VlmrlApp:
    """The dashboard on an empty run directory: the benchmark feeds its log pane directly."""
    return VlmrlApp(RunDirectory(Path(tmp) / "empty").create().path, gpu=False)


async def bench_ingest(batch: int, total: int) -> dict[str, float]:
    pool = make_lines(0, total)
    with tempfile.TemporaryDirectory() as tmp:
        direct, frames = await _ingest_direct(pane_app(tmp), pool, batch)

    # End to end: a file written by a thread, tailed by the app's feed worker.
    with tempfile.TemporaryDirectory() as tmp:
        end_to_end = await _ingest_from_file(Path(tmp), total)
    return {"direct_lines_per_s": direct, "frames": frames, "file_to_pane_lines_per_s": end_to_end, "batch": batch}


async def show_trainer(pilot: Any, app: VlmrlApp) -> LogView:
    """Bring the trainer's log tab on screen (after the start-up focus has settled)."""
    await pilot.pause(0.3)
    app.logs.show_proc("trainer")
    view = app.logs.views["trainer"]
    view.focus()
    await pilot.pause(0.1)
    assert view.is_on_screen and view.size.height > 20, view.size
    return view


class SyntheticFeed:
    """Stands in for RunFeed: each poll returns the next batch of the pool (nothing skipped)."""

    def __init__(self, pool: list[str], batch: int) -> None:
        self.pool, self.batch, self.pos = pool, batch, 0

    def poll(self) -> RunUpdate:
        chunk = self.pool[self.pos : self.pos + self.batch]
        self.pos += len(chunk)
        return RunUpdate(logs={"trainer": LogChunk(chunk)} if chunk else {})


async def _ingest_direct(app: VlmrlApp, pool: list[str], batch: int) -> tuple[float, int]:
    """The app's own reader worker and message path, fed batches as fast as the UI takes them.

    Returns (lines/s, frames painted); every line goes through ``LogView.write_lines``.
    """
    frames = [0]
    render_line = LogView.render_line

    def counting(self: LogView, y: int) -> Any:
        if y == 0:
            frames[0] += 1
        return render_line(self, y)

    total = len(pool)
    async with app.run_test(size=SIZE) as pilot:
        view = await show_trainer(pilot, app)
        app.workers.cancel_group(app, "feed")
        await pilot.pause(0.1)
        LogView.render_line = counting  # type: ignore[method-assign]
        try:
            app.poll_s = 0.0
            t0 = time.perf_counter()
            app._feed_worker(SyntheticFeed(pool, batch))
            while view.total_lines < total:
                await asyncio.sleep(0.001)
            rate = total / (time.perf_counter() - t0)
            await pilot.pause()
        finally:
            LogView.render_line = render_line  # type: ignore[method-assign]
        assert view.total_lines == total and view.line(total - 1) == pool[-1]
        return rate, frames[0]


async def _ingest_from_file(tmp: Path, total: int) -> float:
    """Lines appended to logs/trainer.log by a writer thread, until the pane has them all."""
    rd = RunDirectory(tmp / "run").create()
    write_json_atomic(rd.run_json, RunInfo(name="bench", status="running").to_json())
    rd.log("trainer").touch()
    data = ("\n".join(make_lines(0, total)) + "\n").encode()
    app = VlmrlApp(rd.path, gpu=False, poll_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        view = await show_trainer(pilot, app)

        def writer() -> None:
            with open(rd.log("trainer"), "ab") as f:
                step = len(data) // 50
                for i in range(0, len(data), step):
                    f.write(data[i : i + step])
                    f.flush()

        t0 = time.perf_counter()
        threading.Thread(target=writer, daemon=True).start()
        while view.total_lines < total:
            await asyncio.sleep(0.01)
        return total / (time.perf_counter() - t0)


async def bench_memory(total: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        return await _memory(pane_app(tmp), total, batch)


async def _memory(app: VlmrlApp, total: int, batch: int) -> dict[str, float]:
    async with app.run_test(size=SIZE) as pilot:
        pane = app.logs
        view = await show_trainer(pilot, app)
        pane.ingest({"trainer": LogChunk(make_lines(0, batch))})
        await pilot.pause()
        gc.collect()
        base = rss_mb()
        peak = base
        samples: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        for i in range(batch, total, batch):
            pane.ingest({"trainer": LogChunk(make_lines(i, batch))})
            await pilot.pause()
            if (i // batch) % 50 == 0:
                peak = max(peak, rss_mb())
                samples.append((i, rss_mb() - base))
        elapsed = time.perf_counter() - t0
        gc.collect()
        final = rss_mb()
        assert view.line_count == view.max_lines
    return {"lines": total, "growth_mb": final - base, "peak_growth_mb": peak - base,
            "held_lines": view.line_count, "seconds": elapsed,
            "growth_after_1M_mb": next((g for n, g in samples if n >= 1_000_000), float("nan"))}


FAKE_RUN = r"""
import asyncio, sys
from backend.config import validate_config
from backend.net import free_port
from vlmrl_tui.plan import build_plan
from vlmrl_tui.supervisor import Supervisor
out, fixtures, step_time = sys.argv[1:4]
port = free_port()
cfg = validate_config({"model": "stand-in", "env": {"id": "colors"}, "inference": {"port": port},
                       "trainer": {"args": {"run_name": "idle", "output_dir": out}}})
plan = build_plan(cfg, None, cwd=out)
py = sys.executable
plan = plan.replace_process("server", argv=(py, f"{fixtures}/fake_server.py", "--port", str(port)))
plan = plan.replace_process("trainer", argv=(py, f"{fixtures}/fake_trainer.py", "--steps", "100000",
                                             "--step-time", step_time))
sys.exit(asyncio.run(Supervisor(plan, grace_s=3.0).run()))
"""


def start_run(kind: str, out: Path, step_time: float) -> tuple[subprocess.Popen, Path]:
    """Start the watched run in its own session; its output goes to <out>/supervisor.out."""
    if kind == "fake":
        argv = [sys.executable, "-c", FAKE_RUN, str(out), str(ROOT / "tests" / "fixtures"), str(step_time)]
        run_dir = out / "idle"
    else:
        runs = out / "runs"
        runs.mkdir()
        argv = [sys.executable, "-m", "vlmrl_tui.cli", "run", "--output-dir", str(runs),
                str(ROOT / "configs" / "colors-tiny.toml"), "trainer.args.max_steps=1000",
                f"inference.port={free_port()}"]
        run_dir = runs / "colors-tiny"
    with open(out / "supervisor.out", "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, run_dir


async def bench_idle(kind: str, seconds: float, step_time: float, warmup_s: float, tab: str = "logs",
                     screenshots: Path | None = None, **app_kw: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, run_dir = start_run(kind, Path(tmp), step_time)
        try:
            deadline = time.time() + 600
            while time.time() < deadline:
                rd = RunDirectory(run_dir)
                info = rd.run_info()
                trainer = info.proc(PROC_TRAINER) if info is not None else None
                if trainer is not None and trainer.status == RUNNING and rd.metrics.exists():
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"the run ended early: {(Path(tmp) / 'supervisor.out').read_text()[-2000:]}")
                await asyncio.sleep(0.5)
            app = VlmrlApp(run_dir, **app_kw)  # default intervals unless given; GPU sampling on
            async with app.run_test(size=SIZE) as pilot:
                await pilot.pause(0.5)
                app.action_show_tab(tab)
                await asyncio.sleep(warmup_s)
                lines0 = sum(v.total_lines for v in app.logs.views.values())
                threads0 = thread_cpu()
                cpu0, t0 = PROC.cpu_times(), time.perf_counter()
                await asyncio.sleep(seconds)
                cpu1, t1 = PROC.cpu_times(), time.perf_counter()
                threads1 = thread_cpu()
                lines1 = sum(v.total_lines for v in app.logs.views.values())
                steps = len(app.metrics.store.records)
                batches = app.batches
                if screenshots is not None:
                    await save_screenshots(pilot, app, screenshots)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    per_thread = {name: round(100 * (threads1[name] - threads0.get(name, 0.0)) / (t1 - t0), 2)
                  for name in threads1}
    return {"run": kind, "tab": tab, **app_kw, "seconds": t1 - t0, "cpu_percent_of_one_core": 100 * used / (t1 - t0),
            "cpu_percent_by_thread": per_thread,
            "log_lines_per_s": (lines1 - lines0) / (t1 - t0), "metric_steps_seen": steps, "batches": batches,
            "rss_mb": rss_mb()}


async def save_screenshots(pilot: Any, app: VlmrlApp, folder: Path) -> None:
    """SVGs of the three tabs of a dashboard watching a live run."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    assert app.run_dir is not None
    cwd = Path.cwd()
    os.chdir(app.run_dir.parent.parent)  # paths on screen read runs/<name>/..., not a temp dir
    try:
        app.sub_title = display_path(app.run_dir)
        for name in ("logs", "metrics", "rollouts"):
            app.action_show_tab(name)
            if name == "logs":
                app.logs.show_proc("trainer")
            await pilot.pause(2.5)  # let the throttled panes redraw
            app.save_screenshot(f"dashboard-{name}.svg", str(folder))
            print(f"wrote {folder / f'dashboard-{name}.svg'}")
    finally:
        os.chdir(cwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="*", default=["ingest", "memory", "idle"], choices=["ingest", "memory", "idle"])
    p.add_argument("--batch", type=int, default=10_000, help="lines per batch (ingest, memory)")
    p.add_argument("--ingest-lines", type=int, default=1_000_000)
    p.add_argument("--memory-lines", type=int, default=5_000_000)
    p.add_argument("--run", choices=["fake", "real"], default="fake", help="what the idle dashboard watches")
    p.add_argument("--seconds", type=float, default=30.0, help="idle measurement length")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--step-time", type=float, default=0.5, help="fake trainer: seconds per step")
    p.add_argument("--poll", type=float, default=None, help="idle: the app's poll interval (default: the app's)")
    p.add_argument("--tab", choices=["logs", "metrics", "rollouts"], default="logs", help="idle: tab on screen")
    p.add_argument("--screenshots", type=Path, default=None, help="idle: save SVGs of the tabs into this folder")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if "ingest" in args.what:
        r = asyncio.run(bench_ingest(args.batch, args.ingest_lines))
        results["ingest"] = r
        print(f"ingest   {r['direct_lines_per_s']:>10,.0f} lines/s into a pane: reader worker -> message -> "
              f"pane, batches of {args.batch:,}, every line kept, {r['frames']} frames painted")
        print(f"         {r['file_to_pane_lines_per_s']:>10,.0f} lines/s file -> feed worker -> pane (a poll keeps "
              "the newest 10,000 lines of what it read; the rest is counted)")
    if "memory" in args.what:
        r = asyncio.run(bench_memory(args.memory_lines, args.batch))
        results["memory"] = r
        print(f"memory   {r['lines']:,} lines through a 10k-line pane in {r['seconds']:.0f} s: RSS "
              f"+{r['growth_mb']:.1f} MB after GC (peak +{r['peak_growth_mb']:.1f} MB, "
              f"+{r['growth_after_1M_mb']:.1f} MB at 1M lines); {r['held_lines']:,} lines held")
    if "idle" in args.what:
        kw = {} if args.poll is None else {"poll_s": args.poll}
        r = asyncio.run(bench_idle(args.run, args.seconds, args.step_time, args.warmup, tab=args.tab,
                                   screenshots=args.screenshots, **kw))
        results["idle"] = r
        print(f"idle     {r['cpu_percent_of_one_core']:.1f}% of one core watching a live {args.run} run ({args.tab} tab) for "
              f"{r['seconds']:.0f} s ({r['log_lines_per_s']:.1f} log lines/s, {r['metric_steps_seen']} steps, "
              f"{r['batches']} batches, RSS {r['rss_mb']:.0f} MB)")
        busy = sorted(r["cpu_percent_by_thread"].items(), key=lambda kv: -kv[1])
        print("         by thread: " + ", ".join(f"{name} {pct:.1f}%" for name, pct in busy if pct >= 0.05))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
