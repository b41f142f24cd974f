"""The dashboard on a real tiny run, launched once per session the way ``vlmrl-tui CONFIG``
launches it (:func:`vlmrl_tui.tui_main.launch_run`: ``vlmrl run`` detached, in its own
session), with Textual blocked in every process of the run.

The first test watches the run live through to its end; the others read the finished run
directory.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import pytest

from backend.rundir import last_lines, read_json
from tests.test_import_hygiene import guarded_env
from tests.tui_rundir import screen_text, wait_for
from vlmrl_tui.app import VlmrlApp
from backend.net import free_port
from vlmrl_tui.launch import LaunchedRun, launch_run

ROOT = Path(__file__).resolve().parent.parent
SIZE = (130, 42)
STEPS = 2


@pytest.fixture(scope="session")
def real_launch(tmp_path_factory: pytest.TempPathFactory, tiny_cache_dir: Path) -> Iterator[tuple[LaunchedRun, Path]]:
    """`vlmrl run configs/colors-tiny.toml` for STEPS steps, started by the TUI's launcher."""
    out = tmp_path_factory.mktemp("real-run")
    env, record = guarded_env(out)
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("PYTHONPATH", "VLMRL_TEXTUAL_GUARD")})
    try:
        launched = launch_run(
            ROOT / "configs" / "colors-tiny.toml",
            [f"trainer.args.max_steps={STEPS}", f"inference.port={free_port()}"],
            output_dir=out / "runs",
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield launched, record
    if launched.process.poll() is None:
        os.killpg(launched.process.pid, signal.SIGTERM)
        launched.process.wait(timeout=60)


@pytest.fixture(scope="session")
def real_run(real_launch: tuple[LaunchedRun, Path]) -> Path:
    """The finished run directory."""
    launched, _ = real_launch
    code = launched.process.wait(timeout=900)
    log = "\n".join(last_lines(launched.log_path, 40))
    assert code == 0, f"vlmrl run exited {code}:\n{log}"
    return launched.run_dir


@pytest.mark.asyncio
async def test_watch_a_real_tiny_run_live(real_launch: tuple[LaunchedRun, Path]) -> None:
    launched, _ = real_launch
    run_dir = launched.run_dir
    app = VlmrlApp(run_dir, launched=launched, gpu=False, poll_s=0.1, stats_s=0.5, redraw_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        table = app.processes.table

        def state(proc: str) -> str:
            try:
                return str(table.get_cell(proc, "state"))
            except Exception:
                return ""

        # Processes appear with their states as the supervisor moves them along.
        await wait_for(pilot, lambda: state("server") in ("starting", "healthy"), timeout=120, what="server up")
        await wait_for(pilot, lambda: "supervisor" in app.logs.views and app.logs.views["supervisor"].line_count > 0,
                       timeout=60, what="supervisor log tab")
        await wait_for(pilot, lambda: app.logs.views["server"].line_count > 0, timeout=120, what="server log")
        # Rollouts with their image and reward, as soon as the first step is written (the
        # pane draws only while it is on screen).
        await pilot.press("3")
        await wait_for(pilot, lambda: app.rollouts.selected is not None, timeout=300, what="first rollout")
        assert app.rollouts.shown_images and app.rollouts.shown_images[0].image.size == (64, 64)
        await wait_for(pilot, lambda: app.metrics.store.records, timeout=60, what="first metrics")
        # ... to the end: the trainer finishes, the supervisor stops the server.
        await wait_for(pilot, lambda: app.processes.run is not None and app.processes.run.status == "completed",
                       timeout=600, what="run completed")
        await wait_for(pilot, lambda: state("trainer") == "exited(0)", what="trainer exited(0)")
        await pilot.press("q")  # the run it started has ended: no question
        await pilot.pause(0.2)
    assert app.return_value is None


@pytest.mark.asyncio
async def test_a_finished_real_run(real_run: Path) -> None:
    app = VlmrlApp(real_run, gpu=False, poll_s=0.05, redraw_s=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.batches > 0 and app.processes.run is not None, what="loaded")
        table = app.processes.table
        assert str(table.get_cell("trainer", "state")) == "exited(0)"
        assert str(table.get_cell("server", "state")) == "stopped"
        assert app.processes.run.status == "completed"

        # Log lines arrived, and search finds the trainer's last progress line.
        app.logs.show_proc("trainer")
        view = app.logs.views["trainer"]
        await pilot.pause()
        view.focus()
        await pilot.pause()
        await pilot.press("slash", *f"step {STEPS}/{STEPS}", "enter")
        assert view.cursor is not None and view.plain_line(view.cursor).startswith(f"step {STEPS}/{STEPS} reward=")
        assert f"step {STEPS}/{STEPS} reward=" in screen_text(app)

        # The last step's rollouts: image, completion, reward and its parts.
        await pilot.press("3")
        await pilot.pause()
        pane = app.rollouts
        assert pane.step == STEPS and pane.selected is not None
        rec = pane.selected
        assert rec.images and (real_run / rec.images[0]).is_file()
        assert pane.shown_images and pane.shown_images[0].image.size == (64, 64)
        text = screen_text(app)
        assert text.count("▀") >= 100
        assert f"{rec.reward:.3f}" in text and "correct" in text and rec.completion in text

        await pilot.press("2")
        await wait_for(pilot, lambda: f"step {STEPS}/{STEPS}" in screen_text(app), what="metrics progress")
        assert app.metrics.latest_values["reward_mean"] != "—"


def test_the_headless_run_never_imported_textual(real_launch: tuple[LaunchedRun, Path], real_run: Path) -> None:
    _, record = real_launch
    assert not record.exists(), record.read_text()
    info = read_json(real_run / "run.json") or {}
    assert info.get("status") == "completed"
    assert {"server", "trainer"} <= set(info.get("processes", {}))
