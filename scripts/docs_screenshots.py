"""Take the dashboard screenshots in docs/ from real tiny runs on CPU (~5 minutes on 2 cores).

    python scripts/docs_screenshots.py [--steps 200] [--out docs]

Three real runs under a temporary directory (shown on screen as ``runs/<name>``):

- ``lr3e-4`` and ``lr1e-4``: ``configs/colors-tiny.toml`` at two learning rates (B also
  evaluates every 10 steps), started together. While ``lr3e-4`` is live:
  ``dashboard-logs.svg``, ``dashboard-metrics.svg``, ``dashboard-rollouts.svg`` (the step's
  rollouts filtered to ``reward<1``). Both finished: ``dashboard-compare.svg``, the view of
  ``vlmrl-tui --attach runs/lr3e-4 runs/lr1e-4``.
- ``crafter-tiny`` (3 steps): ``dashboard-episode.svg``, the filmstrip of an episode (its
  turns, the selected turn's frame beside its reply).

The screenshots are Textual's SVG export at 130x42, so images are half blocks, the renderer
that works everywhere (a terminal with kitty graphics or sixel shows them at full resolution).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.net import free_port  # noqa: E402
from backend.rundir import RunDirectory, last_lines  # noqa: E402
from vlmrl_tui.app import VlmrlApp  # noqa: E402
from vlmrl_tui.watch import display_path  # noqa: E402

SIZE = (130, 42)
REDRAW_S = 2.5  # longer than the panes' throttled redraw (2 s)


def start(runs: Path, name: str, config: str, *overrides: str) -> subprocess.Popen:
    """``vlmrl run CONFIG`` as ``runs/<name>``, its output in ``runs/../<name>.out``."""
    log = open(runs.parent / f"{name}.out", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "vlmrl_tui.cli", "run", config, f"inference.port={free_port()}",
         *overrides, "--output-dir", str(runs), "--name", name],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
    )


def wait(proc: subprocess.Popen, name: str, runs: Path) -> None:
    code = proc.wait(timeout=1800)
    if code != 0:
        tail = "\n".join(last_lines(runs.parent / f"{name}.out", 30))
        raise SystemExit(f"{name}: vlmrl run exited {code}:\n{tail}")


def wait_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    """Until ``run_dir`` has logged ``step`` metric lines."""
    rd = RunDirectory(run_dir)
    while not (rd.metrics.exists() and len(rd.metrics.read_text().splitlines()) >= step):
        if proc.poll() is not None:
            raise SystemExit(f"{run_dir.name} ended before step {step} (exit {proc.returncode})")
        time.sleep(1.0)


async def shoot(run_dir: Path, out: Path, tabs: dict[str, Any], compare: tuple[Path, ...] = ()) -> None:
    """Attach a dashboard to ``run_dir`` and save one SVG per entry of ``tabs``: file stem ->
    an async function of (pilot, app) that brings the view to show."""
    app = VlmrlApp(run_dir, compare=compare)  # GPU sampling on: the pane says what it found
    async with app.run_test(size=SIZE) as pilot:
        deadline = time.monotonic() + 60
        while app.run_view is None or not app.metrics.store.records:
            if time.monotonic() > deadline:
                raise SystemExit(f"{run_dir}: the dashboard read no metrics in 60 s")
            await pilot.pause(0.2)
        app.sub_title = display_path(run_dir)
        await pilot.pause(1.0)  # the start's focus (the log, which selects its tab) lands first
        for stem, bring in tabs.items():
            await bring(pilot, app)
            await pilot.pause(REDRAW_S)
            tab = "tab-logs" if stem.endswith("logs") else "tab-metrics" if stem.endswith(("metrics", "compare")) \
                else "tab-rollouts"
            if app.tabs.active != tab:
                raise SystemExit(f"{stem}: the dashboard shows {app.tabs.active}, not {tab}")
            app.save_screenshot(f"{stem}.svg", str(out))
            print(f"wrote {out / f'{stem}.svg'}", flush=True)


async def logs(pilot: Any, app: VlmrlApp) -> None:
    app.action_show_tab("logs")
    app.logs.show_proc("trainer")


async def metrics(pilot: Any, app: VlmrlApp) -> None:
    app.action_show_tab("metrics")


async def rollouts(pilot: Any, app: VlmrlApp) -> None:
    app.action_show_tab("rollouts")
    await pilot.pause(REDRAW_S)
    await pilot.press("slash", *"reward<1", "enter")


async def episode(pilot: Any, app: VlmrlApp) -> None:
    app.action_show_tab("rollouts")
    await pilot.pause(REDRAW_S)
    await pilot.press("down", "full_stop", "full_stop", "full_stop")  # the second episode, its fourth turn


async def main_async(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        os.chdir(tmp)  # paths on screen read runs/<name>/..., not a temp dir
        steps = f"trainer.args.max_steps={args.steps}"
        a = start(runs, "lr3e-4", str(ROOT / "configs/colors-tiny.toml"), steps)
        b = start(runs, "lr1e-4", str(ROOT / "configs/colors-tiny.toml"), steps, "trainer.args.learning_rate=1e-4",
                  "trainer.args.seed=1", "trainer.args.eval_every=10", "trainer.args.eval_size=16")
        try:
            wait_step(runs / "lr3e-4", args.steps // 2, a)
            await shoot(runs / "lr3e-4", out, {"dashboard-logs": logs, "dashboard-metrics": metrics,
                                               "dashboard-rollouts": rollouts})
            wait(a, "lr3e-4", runs)
            wait(b, "lr1e-4", runs)
        finally:
            for p in (a, b):
                if p.poll() is None:
                    p.kill()
        await shoot(runs / "lr3e-4", out, {"dashboard-compare": metrics}, compare=(runs / "lr1e-4",))
        c = start(runs, "crafter-tiny", str(ROOT / "configs/crafter-tiny.toml"), "trainer.args.max_steps=3")
        wait(c, "crafter-tiny", runs)
        info = RunDirectory(runs / "crafter-tiny").run_info()
        assert info is not None and info.finished, "crafter-tiny did not finish"
        await shoot(runs / "crafter-tiny", out, {"dashboard-episode": episode})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of the two colors-tiny runs")
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the SVGs")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
