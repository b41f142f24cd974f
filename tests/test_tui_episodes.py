"""The rollouts pane on an episode (a record with turns): the filmstrip view, browsed by turn.

The fixed run directory (tests/tui_rundir.py) gets one Crafter-like episode of five turns
(real PNG frames, one colour per turn) in its latest step, beside the step's single-turn
rollouts; the real app runs under Pilot.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from textual.pilot import Pilot

from tests.test_tui_app import SIZE, loaded, make_app
from tests.test_tui_snapshots import dashboard, ready
from tests.tui_rundir import EPISODE_TURNS, add_episode, episode_record, make_run_dir, screen_text, wait_for
from vlmrl_tui.app import VlmrlApp
from vlmrl_tui.panes.episode import episode_strip
from vlmrl_tui.panes.rollouts import HalfBlockImage, RolloutsPane

STEP, INDEX = 40, 8  # the episode: after the step's eight single-turn rollouts
ROW_DOWN = ("down",) * INDEX


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run_dir = make_run_dir(tmp_path / "fixture")
    add_episode(run_dir, STEP, INDEX, group=2)
    return run_dir


def frame_lines(img: HalfBlockImage) -> list[str]:
    """The half-block image as it is drawn (colours included)."""
    console = Console(width=80, color_system="truecolor", force_terminal=True, record=True)
    console.print(img)
    return console.export_text(styles=True).splitlines()


def shown_frame(pane: RolloutsPane) -> tuple[tuple[int, int, int], list[str]]:
    assert len(pane.shown_images) == 1
    img = pane.shown_images[0]
    return img.image.getpixel((0, 0)), frame_lines(img)


async def open_episode(pilot: Pilot, app: VlmrlApp) -> RolloutsPane:
    await loaded(pilot, app)
    await pilot.press("3")
    pane = app.rollouts
    await wait_for(pilot, lambda: pane.step == STEP and len(pane._shown_rows) == INDEX + 1, what="step 40")
    await pilot.press(*ROW_DOWN)
    await pilot.pause()
    assert pane.selected is not None and pane.selected.index == INDEX
    return pane


@pytest.mark.asyncio
async def test_episode_is_shown_as_a_filmstrip_and_browsed_by_turn(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_episode(pilot, app)
        rec = pane.selected
        assert len(rec.turns) == len(EPISODE_TURNS) == 5 and pane.turn == 0

        # The table row lists the episode's turns and actions.
        assert str(pane.table.get_cell(str(INDEX), "completion")) == "5 turns: move_left do noop place_table sleep"

        # Episode header, strip and turn 1.
        text = screen_text(app)
        assert "step 40 · #8 · group 2 · crafter-7" in text
        assert "1.900  (achievements 2.00, format -0.10)" in text
        assert "done · 5 turns" in text
        assert "collect_wood, place_table  (2/4)" in text  # the summary's achievements at 1.0
        assert "1·move_left 2·do+1 3·noop-0.1 4·place_table+1 5·sleep" in text
        assert re.search(r"turn\s+1/5", text)
        assert "move_left (exact)" in text and "0.000  (achievements 0.00, format 0.00)" in text
        assert re.search(r"reply\s+move_left", text) and "health 9" in text
        assert "rollouts/40/crafter-7-e8-0.png" in text
        assert ",. Turn" in text and "<> First/last turn" in text  # the footer shows the turn keys
        colour, lines = shown_frame(pane)
        assert colour == EPISODE_TURNS[0][6]
        assert text.count("▀") >= 200

        # The strip highlights the selected turn.
        strip = episode_strip(rec, pane.turn)
        assert [strip.plain[s.start:s.end] for s in strip.spans if "reverse" in str(s.style)] == ["1·move_left"]

        # Next turn: its frame, action, reward parts, unlocked achievement and reply.
        await pilot.press("full_stop")
        text = screen_text(app)
        assert pane.turn == 1 and re.search(r"turn\s+2/5", text)
        assert "do (fuzzy)" in text and "1.000  (achievements 1.00, format 0.00)" in text
        assert re.search(r"unlocked\s+collect_wood", text)
        assert re.search(r"reply\s+I face a tree, so: do", text)
        assert "rollouts/40/crafter-7-e8-1.png" in text and "crafter-7-e8-0.png" not in text
        colour2, lines2 = shown_frame(pane)
        assert colour2 == EPISODE_TURNS[1][6] and lines2 != lines
        strip = episode_strip(rec, pane.turn)
        assert [strip.plain[s.start:s.end] for s in strip.spans if "reverse" in str(s.style)] == ["2·do+1"]

        await pilot.press("full_stop")
        text = screen_text(app)
        assert re.search(r"turn\s+3/5", text) and "noop (none)" in text and "format -0.10" in text

        # Last turn, and no further.
        await pilot.press("greater_than_sign")
        text = screen_text(app)
        assert pane.turn == 4 and re.search(r"turn\s+5/5", text) and "sleep (exact)" in text
        assert "rollouts/40/crafter-7-e8-4.png" in text
        assert shown_frame(pane)[0] == EPISODE_TURNS[4][6]
        await pilot.press("full_stop")
        assert pane.turn == 4

        # First turn, and no further back.
        await pilot.press("less_than_sign")
        assert pane.turn == 0 and re.search(r"turn\s+1/5", screen_text(app))
        assert shown_frame(pane)[0] == EPISODE_TURNS[0][6]
        await pilot.press("comma")
        assert pane.turn == 0

        # y copies the frame of the turn shown.
        await pilot.press("full_stop", "y")
        assert app.clipboard == str((run_dir / "rollouts/40/crafter-7-e8-1.png").resolve())


@pytest.mark.asyncio
async def test_single_turn_rollout_beside_an_episode_keeps_its_view(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_episode(pilot, app)
        await pilot.press("full_stop", "full_stop")
        assert pane.turn == 2

        await pilot.press("up")  # rollout #7: single-turn
        text = screen_text(app)
        sel = pane.selected
        assert sel.index == INDEX - 1 and not sel.turns
        assert [img.image.size for img in pane.shown_images] == [(64, 64)]
        assert f"step 40 · #{INDEX - 1} · group 1" in text
        assert re.search(r"completion\s+" + re.escape(sel.completion), text)
        assert "What colour is this image? Answer with one word." in text
        assert "rollouts/40/7_0.png" in text
        assert not re.search(r"turn\s+\d+/5", text) and "done · 5 turns" not in text
        assert ",. Turn" not in text  # the turn keys are not offered here...
        await pilot.press("full_stop", "greater_than_sign")  # ...and do nothing
        assert pane.selected is sel and screen_text(app) == text

        await pilot.press("down")  # back to the episode: it starts at its first turn again
        assert pane.selected.index == INDEX and pane.turn == 0
        assert re.search(r"turn\s+1/5", screen_text(app))
        titles = {c.title for c in app.palette_commands()}
        assert {"Rollouts: Next turn", "Rollouts: Prev turn", "Rollouts: First turn", "Rollouts: Last turn"} <= titles


@pytest.mark.asyncio
async def test_new_rollouts_of_the_step_keep_the_turn_shown(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_episode(pilot, app)
        await pilot.press("full_stop", "full_stop")
        # The trainer writes another episode of the same step: the step is parsed and drawn again.
        with open(run_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(episode_record(run_dir, STEP, INDEX + 1, group=2, seed=8).to_json()) + "\n")
        await wait_for(pilot, lambda: len(pane._shown_rows) == INDEX + 2, what="the new episode")
        assert pane.selected.index == INDEX and pane.turn == 2
        assert re.search(r"turn\s+3/5", screen_text(app))


@pytest.fixture
def fixed_run_with_episode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    add_episode(make_run_dir(tmp_path / "runs" / "fixture"), STEP, INDEX, group=2)
    return Path("runs/fixture")


def test_snapshot_episode(fixed_run_with_episode: Path, snap_compare) -> None:
    keys = ("3", *ROW_DOWN, "full_stop")
    assert snap_compare(dashboard(fixed_run_with_episode), terminal_size=SIZE, run_before=ready(*keys))
