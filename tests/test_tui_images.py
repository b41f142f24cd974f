"""How the rollouts pane draws images: the renderer choice, the enlarged view, textual-image.

The choice is a pure function of the environment, the headless flag and what the terminal
said (the one boundary we do not own, given here as a :class:`GraphicsProbe`). The
enlarged view runs in the real app under Pilot, which is headless: half blocks.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from textual.geometry import Size

from tests.test_tui_app import SIZE, loaded, make_app
from tests.tui_rundir import EPISODE_TURNS, add_episode, make_run_dir, screen_text, wait_for
from vlmrl_tui.panes.images import (HALFBLOCK, KITTY, SIXEL, FittedImage, GraphicsProbe, ImageScreen,
                                    choose_renderer, graphics_image, probe_graphics, under_multiplexer)

BOTH = GraphicsProbe(installed=True, detected=KITTY)
TMUX = {"TMUX": "/tmp/tmux-0/default,1,0", "TERM": "tmux-256color"}


@pytest.mark.parametrize(("env", "headless", "probe", "want"), [
    ({}, False, BOTH, KITTY),  # the terminal said kitty
    ({}, False, GraphicsProbe(True, SIXEL), SIXEL),
    ({}, False, GraphicsProbe(True, None), HALFBLOCK),  # it said nothing
    ({}, False, GraphicsProbe(False, None), HALFBLOCK),  # textual-image not installed
    ({}, True, BOTH, HALFBLOCK),  # headless: Pilot, snapshots
    ({"VLMRL_IMAGES": "halfblock"}, False, BOTH, HALFBLOCK),
    ({"VLMRL_IMAGES": "HalfBlock "}, False, BOTH, HALFBLOCK),
    (TMUX, False, BOTH, HALFBLOCK),  # tmux drops the escapes unless set up to pass them
    ({"STY": "1234.pts-0.host"}, False, BOTH, HALFBLOCK),  # GNU screen
    ({"TERM": "screen-256color"}, False, BOTH, HALFBLOCK),
    ({"TERM_PROGRAM": "tmux"}, False, BOTH, HALFBLOCK),
    ({"VLMRL_IMAGES": "sixel"}, False, GraphicsProbe(True, None), SIXEL),  # forced, though not detected
    ({**TMUX, "VLMRL_IMAGES": "kitty"}, False, GraphicsProbe(True, None), KITTY),  # forced, under tmux
    ({"VLMRL_IMAGES": "kitty"}, True, BOTH, HALFBLOCK),  # headless wins over a force
    ({"VLMRL_IMAGES": "kitty"}, False, GraphicsProbe(False, None), HALFBLOCK),  # nothing to draw it with
    ({"VLMRL_IMAGES": "auto"}, False, BOTH, KITTY),
    ({"VLMRL_IMAGES": "bogus"}, False, GraphicsProbe(True, SIXEL), SIXEL),  # unknown: as if unset
])
def test_renderer_choice(env: dict[str, str], headless: bool, probe: GraphicsProbe, want: str) -> None:
    assert choose_renderer(env, headless, probe) == want


def test_probe_asks_nothing_where_the_answer_cannot_matter() -> None:
    installed = importlib.util.find_spec("textual_image") is not None
    no_terminal = sys.__stdout__ is None or not sys.__stdout__.isatty()  # pytest captures it (unless -s)
    for env in ({"VLMRL_IMAGES": "halfblock"}, TMUX, *([{}] if no_terminal else [])):
        assert probe_graphics(env) == GraphicsProbe(installed, None)
    assert under_multiplexer(TMUX) and not under_multiplexer({"TERM": "xterm-kitty"})


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run_dir = make_run_dir(tmp_path / "fixture")
    add_episode(run_dir, 40, 8, group=2)
    return run_dir


@pytest.mark.asyncio
async def test_enlarge_shows_a_larger_half_block_render_and_esc_returns(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("3")
        pane = app.rollouts
        await wait_for(pilot, lambda: pane.step == 40 and pane.shown_images, what="step 40")
        assert pane.image_mode == HALFBLOCK  # headless
        sel = pane.selected
        small = pane.shown_images[0].cell_size(200)
        blocks = screen_text(app).count("▀")

        await pilot.press("f")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ImageScreen)
        fitted = screen.shown
        assert isinstance(fitted, FittedImage) and fitted.picture is not None
        cols, rows = fitted.picture.cell_size(fitted.content_size.width)
        assert rows > small[1] and cols > small[0] and rows >= fitted.content_size.height - 1  # fills the height
        assert fitted.image.getpixel((0, 0)) == pane.shown_images[0].image.getpixel((0, 0))
        text = screen_text(app)
        assert text.count("▀") > 2 * blocks and f"step 40 · #{sel.index}" in text and "0_0.png" in text
        await pilot.press("right")  # one image: nothing else to show
        assert screen.index == 0

        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, ImageScreen) and pane.selected is sel and pane.table.has_focus
        assert screen_text(app).count("▀") == blocks


@pytest.mark.asyncio
async def test_enlarge_of_an_episode_shows_the_turn_shown(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("3")
        pane = app.rollouts
        await wait_for(pilot, lambda: pane.step == 40 and len(pane._shown_rows) == 9, what="step 40")
        await pilot.press(*("down",) * 8, "full_stop", "full_stop")
        assert pane.selected.turns and pane.turn == 2
        await pilot.press("f")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ImageScreen) and "turn 3/5" in screen_text(app)
        assert screen.images[0][0].name == "crafter-7-e8-2.png"
        assert screen.shown.image.getpixel((0, 0)) == EPISODE_TURNS[2][6]
        await pilot.press("f")  # f closes it too
        await pilot.pause()
        assert not isinstance(app.screen, ImageScreen) and pane.turn == 2


@pytest.mark.asyncio
async def test_enlarge_without_an_image_says_so(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("3", "slash", *"no-such-word", "enter", "f")
        await pilot.pause()
        assert not isinstance(app.screen, ImageScreen)
        assert any(n.message == "No image to enlarge." for n in app._notifications)


@pytest.mark.parametrize("mode", [KITTY, SIXEL])
def test_textual_image_widget_for_a_real_png(run_dir: Path, mode: str) -> None:
    pytest.importorskip("textual_image")
    from textual_image.widget import SixelImage, TGPImage

    assert choose_renderer({"VLMRL_IMAGES": mode}, False, GraphicsProbe(True, None)) == mode
    png = run_dir / "rollouts" / "40" / "0_0.png"
    widget = graphics_image(mode, png)
    assert isinstance(widget, TGPImage if mode == KITTY else SixelImage) and widget.image == png
    widget.styles.height = 12
    assert widget.get_content_width(Size(80, 40), Size(80, 40)) > 0  # it read the PNG's size


@pytest.mark.asyncio
async def test_sixel_mode_draws_graphics_widgets_instead_of_half_blocks(run_dir: Path) -> None:
    """What a sixel terminal gets. Pilot is headless, so the terminal's answer (the boundary
    we do not own) is given by setting the mode; sixel, unlike kitty, draws through
    Textual's own output (kitty's writes to the real stdout)."""
    pytest.importorskip("textual_image")
    from textual_image.widget import SixelImage

    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        pane = app.rollouts
        pane.image_mode = SIXEL
        await pilot.press("3")
        await wait_for(pilot, lambda: pane.step == 40 and pane.selected is not None, what="step 40")
        (widget,) = pane.query_one("#rollout-gfx").children
        assert isinstance(widget, SixelImage) and widget.image is pane.shown_images[0].image
        assert widget.size.height == pane.image_height and "▀" not in screen_text(app)

        await pilot.press(*("down",) * 8, "full_stop")  # the episode, turn 2: its frame as sixels
        (widget,) = pane.query_one("#rollout-gfx").children
        text = screen_text(app)
        assert widget.image.getpixel((0, 0)) == EPISODE_TURNS[1][6]
        assert re.search(r"turn\s+2/5", text) and "(no frame in this turn)" not in text

        await pilot.press("f")  # enlarged: the file itself, at full resolution
        await pilot.pause()
        assert isinstance(app.screen.shown, SixelImage) and app.screen.shown.image.name == "crafter-7-e8-1.png"
        await pilot.press("escape", "slash", *"no-such-word", "enter")
        await pilot.pause()
        assert not pane.query_one("#rollout-gfx").children and not pane.query_one("#rollout-gfx").display
