"""The dashboard under Pilot on the fixed run directory (tests/tui_rundir.py).

Processes, logs, metrics, rollouts, GPUs (NVML absent and a faked two-GPU NVML), keys
that reach the control channel, help, command palette, themes and the run picker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from textual.containers import VerticalScroll
from textual.pilot import Pilot

from backend.rundir import write_json_atomic
from tests.tui_rundir import T0, FakeNvmlError, FakePynvml, make_run_dir, run_json, screen_text, wait_for
from vlmrl_tui.app import VlmrlApp
from vlmrl_tui.gpu import Nvml
from vlmrl_tui.panes.gpus import build_report
from vlmrl_tui.panes.rollouts import HalfBlockImage
from vlmrl_tui.panes.screens import ConfirmScreen, HelpScreen


SIZE = (130, 42)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("tui") / "fixture")


def no_nvml() -> Nvml:
    def loader() -> Any:
        raise ImportError("pynvml")

    return Nvml(loader=loader)


def make_app(run_dir: Path | None, **kw: Any) -> VlmrlApp:
    kw.setdefault("nvml", no_nvml())
    kw.setdefault("clock", lambda: T0 + 200)
    kw.setdefault("redraw_s", 0.02)
    kw.setdefault("poll_s", 0.05)
    return VlmrlApp(run_dir, **kw)


async def loaded(pilot: Pilot, app: VlmrlApp) -> None:
    await wait_for(pilot, lambda: app.batches > 0 and app.processes.run is not None, what="first batch")
    await pilot.pause()


@pytest.mark.asyncio
async def test_processes_logs_metrics_and_rollouts_of_a_finished_run(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        table = app.processes.table
        assert list(table.rows) == ["server", "trainer"]
        assert str(table.get_cell("trainer", "state")) == "exited(0)"
        assert table.get_cell("trainer", "restarts") == "1"
        assert table.get_cell("server", "uptime") == "2m09s"  # ended_at - started_at, not the clock
        text = screen_text(app)
        assert "completed" in text and '"POST /v1/chat/completions HTTP/1.1" 200 OK' in text
        assert "Uvicorn running on http://127.0.0.1:8000" not in text  # line 2: scrolled off
        await pilot.press("home")
        assert "Uvicorn running on http://127.0.0.1:8000" in screen_text(app)
        assert app.logs.views["trainer"].line_count == len(
            (run_dir / "logs" / "trainer.log").read_text().splitlines())

        await pilot.press("2")
        await wait_for(pilot, lambda: "step 40/40" in screen_text(app), what="metrics progress")
        text = screen_text(app)
        assert "finished" in text and "reward" in text
        assert app.metrics.latest_values["step_s"] == "1.7"

        await pilot.press("3")
        await pilot.pause()
        pane = app.rollouts
        assert pane.step == 40 and pane.selected is not None
        assert [img.image.size for img in pane.shown_images] == [(64, 64)]
        text = screen_text(app)
        assert text.count("▀") >= 200  # the image, drawn with half blocks
        sel = pane.selected
        assert f"step 40 · #{sel.index} · group {sel.group}" in text
        assert f"{sel.reward:.3f}" in text and "correct" in text
        assert "rollouts/40/0_0.png" in text


@pytest.mark.asyncio
async def test_search_and_error_jump_in_the_trainer_log(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("right_square_bracket")  # next log tab: trainer
        view = app.logs.active_view
        assert view is not None and view.proc == "trainer"
        await pilot.press("slash", *"closed the connection", "enter")
        assert view.match_count == 2 and view.cursor is not None
        assert view.plain_line(view.cursor) == "ConnectionError: server closed the connection"
        assert "ConnectionError: server closed the connection" in screen_text(app)
        await pilot.press("escape", "escape", "end")  # clear the query, then follow again
        await pilot.press("e")
        assert view.plain_line(view.cursor) == "Traceback (most recent call last):"


@pytest.mark.asyncio
async def test_browse_rollouts_by_step_and_sort(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("3")
        pane = app.rollouts
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert pane.step == 32 and not pane.follow_latest
        await pilot.press("s")  # best first
        rewards = [r.reward for r in pane._shown_rows]
        assert pane.sort == "best" and rewards == sorted(rewards, reverse=True)
        assert pane.selected is pane._shown_rows[0]
        await pilot.press("s")
        assert pane.sort == "worst" and pane.selected.reward == min(rewards)
        await pilot.press("down")
        assert pane.selected is pane._shown_rows[1]
        await pilot.press("l")
        assert pane.step == 40 and pane.follow_latest
        await pilot.press("g")
        assert pane.step == 4


@pytest.mark.asyncio
async def test_gpu_pane_without_nvml_says_so_and_the_rest_works(run_dir: Path) -> None:
    app = make_app(run_dir, nvml=no_nvml())
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await wait_for(pilot, lambda: app.gpus.report is not None, what="gpu report")
        assert "No GPU stats: nvidia-ml-py is not" in screen_text(app)  # (wraps beside the processes)
        assert app.gpus.report.snapshot.error == "nvidia-ml-py is not installed"
        assert app.logs.views["server"].line_count > 0


@pytest.mark.asyncio
async def test_gpu_pane_on_this_machine(run_dir: Path) -> None:
    """The real NVML path: on a machine without a driver it says so; with one, it lists GPUs."""
    nvml = Nvml()
    app = make_app(run_dir, nvml=nvml)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.gpus.report is not None, what="gpu report")
        report = app.gpus.report
        if nvml.available:
            assert report.snapshot.gpus and "No GPU stats" not in screen_text(app)
        else:
            assert not report.snapshot.gpus and "No GPU stats" in screen_text(app)


class FlakyPynvml(FakePynvml):
    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        if h == 1:
            raise FakeNvmlError("GPU is lost")
        return super().nvmlDeviceGetTemperature(h, sensor)


@pytest.mark.asyncio
async def test_gpu_pane_with_two_fake_gpus_and_our_processes(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "live", steps=5)
    server, trainer = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2))
    try:
        info = run_json("running", server_pid=server.pid, trainer_pid=trainer.pid)
        for proc in info["processes"].values():
            proc["status"], proc["ended_at"], proc["exit_code"] = "running", None, None
        write_json_atomic(run_dir / "run.json", info)
        fake = FlakyPynvml({0: [(server.pid, 3 * 2**30), (999_999, 2**30)], 1: [(trainer.pid, 5 * 2**30)]})
        app = make_app(run_dir, nvml=Nvml(loader=lambda: fake), gpu_s=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot, app)
            await wait_for(pilot, lambda: app.gpus.report is not None and app.gpus.report.ours, what="ours")
            report = app.gpus.report
            assert [g.index for g in report.snapshot.gpus] == [0, 1]
            assert report.ours == {0: {"server": 3 * 2**30}, 1: {"trainer": 5 * 2**30}}
            text = screen_text(app)
            assert "0 H100 80GB" in text and "1 H100 80GB" in text
            assert "31.0/80.0" in text and "87%" in text and " 64 " in text and "412/700" in text
            assert "s:3.0" in text and "t:5.0" in text
            assert "N/A" in text  # GPU 1's temperature failed: shown as N/A, nothing raised
    finally:
        for p in (server, trainer):
            p.kill()
            p.wait()


def test_build_report_ignores_other_processes() -> None:
    nvml = Nvml(loader=lambda: FakePynvml({0: [(123456789, 2**30)]}))
    from vlmrl_tui.gpu import take_snapshot

    report = build_report(take_snapshot(nvml), {"server": os.getpid()})
    assert report.ours == {} and len(report.snapshot.gpus) == 2


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, run_dir: Path, cmd: str, proc: str | None = None, timeout: float = 5.0) -> dict:
        self.calls.append((cmd, proc))
        return {"ok": True}


@pytest.mark.asyncio
async def test_restart_kill_and_stop_keys_call_the_control_channel(run_dir: Path) -> None:
    rec = Recorder()
    app = make_app(run_dir, send_command=rec)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("p", "down", "r")  # trainer row
        await wait_for(pilot, lambda: rec.calls == [("restart", "trainer")], what="restart")
        await pilot.press("K")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # declined: nothing sent
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_for(pilot, lambda: rec.calls[-1] == ("stop", None), what="stop")
        assert len(rec.calls) == 2 and len(app.commands) == 2


@pytest.mark.asyncio
async def test_help_palette_and_theme(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        assert "logs.search" in text and "app.restart" in text
        app.screen.query_one(VerticalScroll).scroll_end(animate=False)  # the last group, below the fold
        await pilot.pause(0.3)
        text = screen_text(app)
        assert "metrics.zoom" in text and "app.quit" not in text  # scrolled past the first group
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

        titles = [c.title for c in app.palette_commands()]
        for b in (b for _, group in app.binding_groups() for b in group):
            if b.show and b.action != "command_palette":
                assert any(b.description in t for t in titles), b.description
        assert {"Restart server", "Restart trainer", "Kill server", "Kill trainer"} <= set(titles)

        # Run one action through the real palette: jump to the last error of the active log.
        app.logs.show_proc("trainer")
        await pilot.press("ctrl+p")
        await pilot.press(*"Logs: Last error")
        await pilot.pause(0.3)
        await pilot.press("enter")
        view = app.logs.views["trainer"]
        await wait_for(pilot, lambda: view.cursor is not None, what="palette action")
        assert view.plain_line(view.cursor) == "Traceback (most recent call last):"

        assert app.theme == "textual-dark"
        await pilot.press("escape", "t")
        assert app.theme == "textual-light"
        await pilot.press("t")
        assert app.theme == "textual-dark"


@pytest.mark.asyncio
async def test_picker_lists_runs_newest_first_and_attaches(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    old = make_run_dir(out / "older", steps=3)
    new = make_run_dir(out / "newer", steps=5)
    os.utime(old / "run.json", (T0, T0))
    os.utime(old / "metrics.jsonl", (T0, T0))
    os.utime(old / "logs", (T0, T0))
    app = make_app(None, output_dir=out)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        text = screen_text(app)
        assert "2 run(s)" in text and text.index(str(new)) < text.index(str(old))
        await pilot.press("enter")
        await loaded(pilot, app)
        assert app.run_dir == new
        assert app.processes.run is not None and app.processes.run.name == "fixture"


@pytest.mark.asyncio
async def test_picker_with_no_runs_explains_and_quits(tmp_path: Path) -> None:
    app = make_app(None, output_dir=tmp_path / "empty")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "No runs under" in screen_text(app) and "vlmrl-tui configs/colors-tiny.toml" in screen_text(app)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_value is None


@pytest.mark.asyncio
async def test_quit_of_an_attached_run_does_not_ask(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_value is None


def test_half_block_image_keeps_aspect_and_pixels() -> None:
    from PIL import Image
    from rich.console import Console

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 10, 40, 20))  # bottom half blue
    hb = HalfBlockImage(img, max_width=20, max_height=50)
    assert hb.cell_size(100) == (20, 5)
    console = Console(width=30, color_system="truecolor", record=True)
    segs = list(console.render(hb))
    cells = [s for s in segs if s.text and set(s.text) == {"▀"}]
    assert sum(len(s.text) for s in cells) == 100  # 20 columns x 5 rows
    assert cells[0].style.color.triplet == (255, 0, 0) and cells[0].style.bgcolor.triplet == (255, 0, 0)
    assert cells[-1].style.color.triplet == (0, 0, 255)


def test_braille_chart_draws_a_line_with_labels() -> None:
    from rich.console import Console
    from rich.style import Style
    from rich.text import Text

    from vlmrl_tui.panes.chart import ChartRender, Series

    styles = {name: Style() for name in ("band", "extra", "main", "axis", "title")}
    chart = ChartRender(Text("reward"), [Series([1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0])], 20, 6, styles)
    rows = ["".join(seg.text for seg in line) for line in chart.lines(Console(width=20))]
    assert len(rows) == 6 and rows[0].strip() == "reward"
    assert rows[1].startswith("3┤") and rows[4].startswith("0┤")  # max on top, min at the bottom
    plot = [r[2:] for r in rows[1:5]]
    assert plot[3][0] != " " and plot[0][-1] != " "  # the line starts bottom-left, ends top-right
    assert all(ch == " " or 0x2800 <= ord(ch) <= 0x28FF for r in plot for ch in r)
    assert rows[5].startswith(" └1") and rows[5].rstrip().endswith("4")
    empty = ChartRender(Text("loss"), [], 20, 6, styles)
    assert any("waiting for data" in "".join(s.text for s in line) for line in empty.lines(Console(width=20)))


@pytest.mark.asyncio
async def test_a_run_dir_of_another_format_gets_a_clear_message(tmp_path: Path) -> None:
    from backend.records import RunInfo

    run_dir = tmp_path / "old"
    (run_dir / "logs").mkdir(parents=True)
    data = RunInfo(name="old", status="completed").to_json()
    data["version"] = 1
    write_json_atomic(run_dir / "run.json", data)
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        def told() -> list[str]:
            return [n.message for n in app._notifications if n.severity == "error"]  # the toasts shown

        await wait_for(pilot, lambda: any("written by an older vlmrl" in m for m in told()), what="the message")
        assert any("schema version 1" in m and str(run_dir / "run.json") in m for m in told())
