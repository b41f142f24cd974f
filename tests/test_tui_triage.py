"""Rollout triage in the rollouts pane: filters, the whole-run scope, zero-variance groups, lengths.

The fixed run directory (tests/tui_rundir.py) gets one more step, 44, with known rewards and
completions (:data:`GROUPS`); the real app runs under Pilot. The filter grammar, the
histogram and the whole-run scan's bookkeeping are also checked as pure functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.pilot import Pilot

from tests.test_tui_app import SIZE, loaded, make_app
from tests.tui_rundir import add_step, episode_record, make_run_dir, screen_text, wait_for
from vlmrl_tui.app import VlmrlApp
from vlmrl_tui.panes.rollouts import RolloutsPane
from vlmrl_tui.panes.triage import (FilterError, RolloutStore, RunScan, completion_lengths, group_variance,
                                    histogram_text, length_histogram, parse_filter, scan_snapshot, spark)

STEP = 44
GROUPS = [
    [(1.0, "red"), (1.0, "red"), (1.0, "red"), (1.0, "red")],  # all equal: zero variance
    [(0.0, "blue"), (1.0, "Blue!!"), (0.5, "bl ue ue ue ### garbled"), (0.25, "the answer is blue")],
    [(0.0, "green"), (0.0, ""), (0.0, "zzzz zzzz"), (0.0, "purple")],  # all equal: zero variance
    [(0.2, "yellow"), (0.7, "yellow or red")],
]
ALL = [(i, r, c) for i, (r, c) in enumerate(x for g in GROUPS for x in g)]  # (index, reward, completion)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run_dir = make_run_dir(tmp_path / "fixture")
    add_step(run_dir, STEP, GROUPS)
    return run_dir


async def open_step(pilot: Pilot, app: VlmrlApp) -> RolloutsPane:
    await loaded(pilot, app)
    await pilot.press("3")
    pane = app.rollouts
    await wait_for(pilot, lambda: pane.step == STEP and len(pane._shown_rows) == len(ALL), what="step 44")
    return pane


async def apply_filter(pilot: Pilot, text: str) -> None:
    await pilot.press("slash", *text, "enter")
    await pilot.pause()


def listed(pane: RolloutsPane) -> list[str]:
    return pane.table.rows


@pytest.mark.asyncio
async def test_reward_part_and_text_filters_list_exactly_the_matches(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_step(pilot, app)
        text = screen_text(app)
        assert f"{len(ALL)} rollouts" in text and "match" not in text

        cases = {
            "0.5..1": [i for i, r, _ in ALL if 0.5 <= r <= 1],
            "<0.2": [i for i, r, _ in ALL if r < 0.2],
            ">=1": [i for i, r, _ in ALL if r >= 1],
            "format=0": [5, 6, 9],  # "Blue!!", the garbled one, the empty one
            "correct>0.5": [i for i, r, _ in ALL if r > 0.5],
            "blue": [4, 5, 7],  # case-insensitive
            "Blue": [5],  # a capital: case-sensitive
            "/^z+ z+$/": [10],
            '"yellow or"': [13],
            "!format=1 <0.6": [6, 9],  # not well-formed, and reward under 0.6
        }
        for query, want in cases.items():
            before = pane.selected.index
            await apply_filter(pilot, query)
            assert pane.filter.text == query
            assert listed(pane) == [str(i) for i in want], query
            assert f"{len(want)} of {len(ALL)} rollouts match" in screen_text(app), query
            # The rollout shown stays shown if it matches; else the first match is.
            assert pane.selected.index == (before if before in want else want[0])
            assert pane.table.cursor_row == want.index(pane.selected.index)

        # Nothing matches: an empty table, and the detail says so.
        await apply_filter(pilot, "no-such-word")
        assert listed(pane) == [] and pane.selected is None
        text = screen_text(app)
        assert f"0 of {len(ALL)} rollouts match" in text and "No rollout matches 'no-such-word'." in text

        # Esc clears the filter: every row again, the input gone.
        await pilot.press("escape")
        await pilot.pause()
        assert not pane.filter and len(listed(pane)) == len(ALL) and not pane.filter_input.display
        assert f"{len(ALL)} rollouts" in screen_text(app) and "match" not in screen_text(app)


@pytest.mark.asyncio
async def test_a_wrong_filter_is_refused_and_keeps_the_rows(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_step(pilot, app)
        await apply_filter(pilot, "format=x")
        assert not pane.filter and len(listed(pane)) == len(ALL)
        assert pane.filter_input.has_focus  # still there to fix the term
        assert any("'x' is not a number" in n.message for n in app._notifications)


@pytest.mark.asyncio
async def test_zero_variance_groups_are_marked_and_counted(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_step(pilot, app)
        marked = {key for key in listed(pane) if str(pane.table.get_cell(key, "grp")).endswith("=")}
        assert marked == {str(i) for i in range(4)} | {str(i) for i in range(8, 12)}  # groups 0 and 2
        assert str(pane.table.get_cell("0", "grp")) == "0=" and pane.table.get_cell("4", "grp") == "1"
        assert "zero-variance groups (=) 2/4 (50%)" in screen_text(app)


@pytest.mark.asyncio
async def test_the_length_histogram_follows_the_filter(run_dir: Path) -> None:
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await open_step(pilot, app)
        lengths = [len(c) for _, _, c in ALL]  # 0 (the empty one) to 23 (the garbled one)
        lo, hi, counts = length_histogram(lengths)
        assert (lo, hi) == (0, 23) and sum(counts) == len(ALL)
        assert f"len ch 0▕{spark(counts)}▏23" in screen_text(app)
        await apply_filter(pilot, ">=1")  # "red" x4 and "Blue!!": 3,3,3,3,6 in four bins of one
        assert "len ch 3▕█  ▂▏6" in screen_text(app)


@pytest.mark.asyncio
async def test_whole_run_scope_filters_every_step(run_dir: Path) -> None:
    lines = [json.loads(x) for x in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    purple = [(d["step"], d["index"]) for d in lines if "purple" in d["completion"].lower()]
    assert len({s for s, _ in purple}) > 2  # the check below spans several steps
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        pane = await open_step(pilot, app)
        await apply_filter(pilot, "purple")
        assert listed(pane) == ["11"]
        await pilot.press("w")
        await wait_for(pilot, lambda: not pane.scanning, what="the whole-run scan")
        await pilot.pause()
        assert pane.whole_run
        assert listed(pane) == [f"{s}:{i}" for s, i in sorted(purple)]
        text = screen_text(app)
        assert f"{len(purple)} of {len(lines)} rollouts match" in text and "whole run · 11 steps" in text

        assert (pane.selected.step, pane.selected.index) == (STEP, 11)  # still the rollout shown before
        assert pane.table.cursor_row == len(purple) - 1

        # Back to a step: the one of the selected rollout.
        await pilot.press("up", "w")
        await pilot.pause()
        assert not pane.whole_run and pane.step == sorted(purple)[-2][0]
        assert listed(pane) == [str(i) for s, i in purple if s == pane.step]

        # The whole run follows a live run: a new step's matches join without a rescan.
        await pilot.press("w")
        await wait_for(pilot, lambda: not pane.scanning, what="the whole-run scan")
        add_step(run_dir, STEP + 4, [[(1.0, "purple"), (0.0, "Purple?")]])
        await wait_for(pilot, lambda: len(listed(pane)) == len(purple) + 2, what="the new step's matches")
        assert f"{len(purple) + 2} of {len(lines) + 2} rollouts match" in screen_text(app)

        await pilot.press("escape")  # no filter: every rollout of the run
        await wait_for(pilot, lambda: not pane.scanning and len(listed(pane)) == len(lines) + 2, what="all rows")
        assert f"{len(lines) + 2} rollouts" in screen_text(app)


# ---- pure functions ---------------------------------------------------------------------
def test_filter_grammar() -> None:
    recs = {r.index: r for r in add_step_records()}
    f = parse_filter("correct=0..0.5 !purple")
    assert sorted(i for i, r in recs.items() if f(r)) == [4, 6, 7, 8, 9, 10, 12]
    assert sorted(i for i, r in recs.items() if parse_filter("adv<0")(r)) == []  # advantages are 0
    assert sorted(i for i, r in recs.items() if parse_filter("len>=18")(r)) == [6, 7]
    assert sorted(i for i, r in recs.items() if parse_filter("missing=1")(r)) == []  # no such part
    assert not parse_filter("  ") and parse_filter("  ").text == ""
    for bad in ("format=x", "/[/", '"open', "reward>=high", "correct=1..x"):
        with pytest.raises(FilterError):
            parse_filter(bad)


def add_step_records() -> list:
    """GROUPS as records, written to a throwaway run directory."""
    import tempfile

    return add_step(Path(tempfile.mkdtemp()), STEP, GROUPS)


def test_length_histogram_counts_and_spark() -> None:
    assert length_histogram([1, 2, 2, 3, 10], bins=3) == (1, 10, [4, 0, 1])
    assert length_histogram([5, 5]) == (5, 5, [2])
    assert length_histogram([3, 4, 5], bins=12) == (3, 5, [1, 1, 1])  # one bin per value
    assert length_histogram([]) == (0, 0, [])
    assert spark([8, 0, 1, 4]) == "█ ▁▄"
    ep = episode_record(Path(__import__("tempfile").mkdtemp()), 1, 0, 0)
    assert completion_lengths([ep]) == ([17], "tok")  # the turns' completion_tokens
    assert histogram_text([ep]) == "len tok 17▕█▏17"


def test_group_variance() -> None:
    recs = add_step_records()
    assert group_variance(recs) == (frozenset({0, 2}), 4)
    assert group_variance(recs[4:5]) == (frozenset({1}), 1)  # one rollout: no signal either


def test_the_whole_run_scan_keeps_only_what_did_not_change_meanwhile() -> None:
    recs = [r.to_json() for r in add_step_records()]
    store = RolloutStore()
    store.add([dict(d, step=s) for s in (1, 2, 3) for d in recs])
    scan = RunScan()
    token = scan.start()
    flt = parse_filter("purple")
    result = scan_snapshot(store.snapshot(), flt, lambda: False)
    assert result is not None and scan_snapshot(store.snapshot(), flt, lambda: True) is None
    store.add([dict(recs[0], step=2, completion="purple now")])  # while the scan ran
    scan.changed.add(2)
    assert scan.landed(token, result, store) and not scan.landed(token - 1, result, store)
    assert store._parsed.keys() == {1, 3}  # step 2's parse was stale: not kept
    hits = scan.update(store, flt)
    assert [(r.step, r.index) for r in hits] == [(1, 11), (2, 0), (2, 11), (3, 11)]
