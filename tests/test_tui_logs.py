"""The log pane under Pilot: batches, the scrollback cap, follow, search, error jump, copy."""

from __future__ import annotations

from typing import Callable

import pytest
from textual.app import App, ComposeResult
from textual.pilot import Pilot

from vlmrl_tui.watch import LogChunk
from vlmrl_tui.panes.logs import LogsPane, LogView



class LogsApp(App[None]):
    def __init__(self, scrollback: int = 10_000) -> None:
        super().__init__()
        self.scrollback = scrollback

    def compose(self) -> ComposeResult:
        yield LogsPane(scrollback=self.scrollback, id="logs")

    @property
    def pane(self) -> LogsPane:
        return self.query_one(LogsPane)

    def view(self, proc: str = "server") -> LogView:
        return self.pane.views[proc]


async def wait_for(pilot: Pilot, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await pilot.pause(0.02)
    raise AssertionError("condition not met in time")


def visible_lines(view: LogView) -> list[str]:
    """The plain text of the rows the view shows now."""
    return [view.render_line(y).text.rstrip() for y in range(view.scrollable_content_region.height)]


@pytest.mark.asyncio
async def test_batches_follow_and_the_cap() -> None:
    app = LogsApp(scrollback=500)
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.view()
        view.focus()
        app.pane.ingest({"server": LogChunk([f"line {i}" for i in range(2000)], skipped=3)})
        await pilot.pause()
        assert view.line_count == 500 and view.total_lines == 2003
        assert view.first_line == 1503 and view.line(2002) == "line 1999"
        assert visible_lines(view)[-1] == "line 1999"  # following: the newest line is on screen
        # Once the cap is reached the screen must still move (Log(max_lines) froze here).
        app.pane.ingest({"server": LogChunk(["fresh"])})
        await pilot.pause()
        assert visible_lines(view)[-1] == "fresh"
        assert view.line_count == 500


@pytest.mark.asyncio
async def test_scrolled_up_shows_new_line_count_and_keeps_its_place() -> None:
    app = LogsApp(scrollback=300)
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.view()
        view.focus()
        app.pane.ingest({"server": LogChunk([f"line {i}" for i in range(300)])})
        await pilot.pause()
        await pilot.press("up", "pageup")  # select a line: follow stops
        assert not view.follow and view.cursor is not None
        selected = view.plain_line(view.cursor)
        app.pane.ingest({"server": LogChunk([f"new {i}" for i in range(50)])})
        await pilot.pause()
        assert view.pending == 50
        assert "50 new lines" in app.pane.status_text()
        assert view.plain_line(view.cursor) == selected  # same line selected though 50 left the top
        assert selected in visible_lines(view)
        await pilot.press("end")
        assert view.follow and view.pending == 0 and visible_lines(view)[-1] == "new 49"


@pytest.mark.asyncio
async def test_ansi_colours_are_rendered_not_printed() -> None:
    app = LogsApp()
    async with app.run_test(size=(100, 20)) as pilot:
        view = app.view()
        app.pane.ingest({"server": LogChunk(["\x1b[32mINFO\x1b[0m: ready", "\x1b[1;31mERROR\x1b[0m boom"])})
        await pilot.pause()
        rows = visible_lines(view)
        assert rows[:3] == ["INFO: ready", "ERROR boom", ""]  # few lines: they start at the top
        first = view.render_line(0)
        green = [seg for seg in first if seg.text == "INFO"]
        assert green and green[0].style.color is not None and green[0].style.color.number == 2  # ANSI green
        assert "\x1b" not in first.text


@pytest.mark.asyncio
async def test_search_highlights_and_moves_between_matches() -> None:
    app = LogsApp()
    async with app.run_test(size=(100, 20)) as pilot:
        view = app.view()
        view.focus()
        lines = [f"step {i} ok" for i in range(100)]
        lines[10] = "step 10 \x1b[33mWARNING\x1b[0m slow sync"
        lines[60] = "step 60 warning: slow sync again"
        app.pane.ingest({"server": LogChunk(lines)})
        await pilot.pause()
        await pilot.press("slash")
        await pilot.press(*"slow sync")
        await pilot.press("enter")
        assert view.query_text == "slow sync" and view.match_count == 2
        assert view.cursor == 60  # newest match first
        assert "1/2" not in app.pane.status_text() and "2/2" in app.pane.status_text()
        row = visible_lines(view).index("step 60 warning: slow sync again")
        strip = view.render_line(row)
        match_bg = view.get_component_rich_style("logview--match").bgcolor
        assert any(seg.text == "slow sync" and seg.style.bgcolor == match_bg for seg in strip)
        await pilot.press("n")
        assert view.cursor == 10  # wraps around
        await pilot.press("N")
        assert view.cursor == 60
        await pilot.press("slash", *"nothing here", "enter")
        assert view.match_count == 0 and view.cursor == 60


@pytest.mark.asyncio
async def test_jump_to_last_traceback_and_copy_the_line() -> None:
    app = LogsApp()
    async with app.run_test(size=(100, 20)) as pilot:
        view = app.view("trainer")
        app.pane.show_proc("trainer")
        view.focus()
        lines = [f"step {i}" for i in range(50)]
        lines += ["Traceback (most recent call last):", '  File "a.py", line 1', "    x()",
                  "ValueError: first"]
        lines += [f"step {i}" for i in range(50, 80)]
        lines += ["\x1b[31mTraceback (most recent call last):\x1b[0m", '  File "b.py", line 2', "    y()",
                  "\x1b[31mRuntimeError: second\x1b[0m"]
        lines += [f"step {i}" for i in range(80, 120)]
        app.pane.ingest({"trainer": LogChunk(lines)})
        await pilot.pause()
        await pilot.press("e")
        assert view.plain_line(view.cursor) == "Traceback (most recent call last):"
        assert view.cursor == 84  # the second traceback, not the first
        assert "Traceback (most recent call last):" in visible_lines(view)
        await pilot.press("down", "down", "down", "y")
        assert app.clipboard == "RuntimeError: second"


@pytest.mark.asyncio
async def test_a_new_process_gets_its_own_tab() -> None:
    app = LogsApp()
    async with app.run_test(size=(100, 20)) as pilot:
        app.pane.ingest({"supervisor": LogChunk(["started"])})
        await pilot.pause()
        app.pane.show_proc("supervisor")
        await pilot.pause()
        assert app.pane.active_view is app.view("supervisor")
        assert visible_lines(app.view("supervisor"))[0] == "started"
        await pilot.press("left_square_bracket")
        assert app.pane.active_view is app.view("trainer")


@pytest.mark.asyncio
async def test_plain_lines_take_the_theme_background() -> None:
    app = LogsApp()
    async with app.run_test(size=(60, 10)) as pilot:
        view = app.view()
        app.pane.ingest({"server": LogChunk(["plain line", "\x1b[32mgreen\x1b[0m tail"])})
        await pilot.pause()
        for theme in ("textual-dark", "textual-light"):
            app.theme = theme
            await pilot.pause()
            bg = view.rich_style.bgcolor
            for y in (0, 1):
                assert all(seg.style is not None and seg.style.bgcolor == bg for seg in view.render_line(y))


@pytest.mark.asyncio
async def test_a_hidden_tab_catches_up_when_shown() -> None:
    app = LogsApp(scrollback=200)
    async with app.run_test(size=(80, 20)) as pilot:
        await pilot.pause()
        trainer = app.view("trainer")
        assert not trainer.is_on_screen
        for start in range(0, 1000, 100):  # more than the scrollback, in several batches
            app.pane.ingest({"trainer": LogChunk([f"t {i}" for i in range(start, start + 100)])})
            await pilot.pause()
        assert trainer.line_count == 200 and trainer.first_line == 800
        app.pane.show_proc("trainer")
        await pilot.pause()
        assert trainer.is_on_screen and visible_lines(trainer)[-1] == "t 999"
        assert trainer.max_scroll_y == trainer.virtual_size.height - trainer.scrollable_content_region.height
