"""Snapshots (pytest-textual-snapshot) of the dashboard on the fixed run directory.

Everything shown is fixed: the run directory (tests/tui_rundir.py), the clock, the GPUs
(a faked NVML with two GPUs) and the working directory (paths are shown relative to it).
Update after an intended change with ``pytest tests/test_tui_snapshots.py --snapshot-update``
and look at the SVGs under tests/__snapshots__/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.pilot import Pilot

from tests.tui_rundir import T0, FakePynvml, make_run_dir, wait_for
from vlmrl_tui.app import VlmrlApp
from vlmrl_tui.gpu import Nvml

SIZE = (130, 42)


@pytest.fixture
def fixed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_run_dir(tmp_path / "runs" / "fixture")
    return Path("runs/fixture")


def dashboard(run_dir: Path) -> VlmrlApp:
    fake = FakePynvml()
    return VlmrlApp(run_dir, nvml=Nvml(loader=lambda: fake), clock=lambda: T0 + 200,
                    poll_s=0.05, gpu_s=0.05, redraw_s=0.01)


def ready(*keys: str):
    async def run_before(pilot: Pilot) -> None:
        app = pilot.app
        assert isinstance(app, VlmrlApp)
        await wait_for(pilot, lambda: app.batches > 0 and app.gpus.report is not None, what="data")
        await pilot.press(*keys)
        await wait_for(pilot, lambda: not (app.metrics.redraw.dirty and app.metrics.is_on_screen), what="metrics drawn")
        await pilot.pause(0.1)

    return run_before


def test_snapshot_logs(fixed_run: Path, snap_compare) -> None:
    assert snap_compare(dashboard(fixed_run), terminal_size=SIZE, run_before=ready())


def test_snapshot_metrics(fixed_run: Path, snap_compare) -> None:
    assert snap_compare(dashboard(fixed_run), terminal_size=SIZE, run_before=ready("2"))


def test_snapshot_rollouts(fixed_run: Path, snap_compare) -> None:
    assert snap_compare(dashboard(fixed_run), terminal_size=SIZE, run_before=ready("3", "down", "down"))


def test_snapshot_light_theme_with_search(fixed_run: Path, snap_compare) -> None:
    keys = ("t", "right_square_bracket", "slash", *"ConnectionError", "enter")
    assert snap_compare(dashboard(fixed_run), terminal_size=SIZE, run_before=ready(*keys))
