"""Rollouts pane: the images the model saw, beside prompt, completion, reward and advantage.

An episode (a record with ``turns``) is shown as a filmstrip (episode.py renders it);
``,``/``.`` browse its turns, ``<``/``>`` jump to the first/last one. Examples the step
left out (drop records: a broken image, ...) are listed last, with their reason.
Triage (triage.py): ``/`` filters by reward range, reward part or text, ``w`` switches to
the whole run (scanned in a thread, ``RUN_ROWS_MAX`` rows listed), groups whose rewards
were all equal are marked ``=``, and a line above the table counts matches and such groups
and sketches the completion lengths. ``f`` enlarges the image (images.py draws images:
half blocks, or kitty/sixel graphics where the terminal has them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Group
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Static
from textual.worker import get_current_worker

from backend.records import DropRecord, RolloutRecord
from vlmrl_tui.panes.episode import (Prerendered, completion_cell, episode_header, one_line, rollout_detail,
                                     signed_text, turn_detail, turn_extra, turn_view)
from vlmrl_tui.panes.images import (HALFBLOCK, GraphicsProbe, GraphicsStrip, HalfBlockImage, ImageScreen,
                                    PictureCache, choose_renderer, probe_graphics)
from vlmrl_tui.panes.table import RowTable
from vlmrl_tui.panes.triage import (FILTER_HELP, NO_FILTER, FilterError, RolloutFilter, RolloutStore, RunScan,
                                    Scanned, parse_filter, scan_snapshot, sort_rows, triage_text)

__all__ = ["HalfBlockImage", "RolloutStore", "RolloutsPane", "probe_graphics"]  # the app and tests import these

SORT_MODES = ("index", "best", "worst")
RUN_ROWS_MAX = 1000  # rows the whole-run scope lists (the header counts them all)
COLUMNS, WIDTHS = ("#", "grp", "reward", "adv", "completion"), (3, 3, 6, 7, 40)
RUN_COLUMNS, RUN_WIDTHS = ("step:#",) + COLUMNS[1:], (7,) + WIDTHS[1:]
_TURN_ACTIONS = ("turn", "turn_at")
_STEP_KEYS = Binding.Group("Step", compact=True)  # the footer shows "[] Step": room for the rest
_TURN_KEYS = Binding.Group("Turn", compact=True)  # the footer shows ",. Turn"
_TURN_ENDS = Binding.Group("First/last turn", compact=True)


class RolloutsPane(Horizontal):
    """Browse rollouts by step and within a step; sort, filter, triage; see the image."""

    DEFAULT_CSS = """
    RolloutsPane { height: 1fr; }
    RolloutsPane > #rollout-list { width: 2fr; min-width: 30; }
    RolloutsPane #rollout-header { height: 1; padding: 0 1; background: $panel; }
    RolloutsPane #rollout-triage { height: auto; padding: 0 1; background: $panel; color: $text-muted; }
    RolloutsPane #rollout-filter { display: none; }
    RolloutsPane #rollout-filter.-visible { display: block; }
    RolloutsPane #rollout-table { height: 1fr; }
    RolloutsPane > #rollout-detail { width: 3fr; padding: 0 1; border-left: vkey $panel; }
    RolloutsPane #rollout-episode { height: auto; display: none; }
    RolloutsPane #rollout-image { height: auto; }
    RolloutsPane #rollout-text { height: auto; }
    """

    BINDINGS = [
        Binding("left_square_bracket", "step(-1)", "Prev step", key_display="[", id="rollouts.prev_step",
                group=_STEP_KEYS),
        Binding("right_square_bracket", "step(1)", "Next step", key_display="]", id="rollouts.next_step",
                group=_STEP_KEYS),
        Binding("g", "step_at(0)", "First step", show=False, id="rollouts.first_step"),
        Binding("l", "step_at(-1)", "Latest step", id="rollouts.last_step"),
        Binding("s", "cycle_sort", "Sort", id="rollouts.sort"),
        Binding("slash", "filter", "Filter", key_display="/", id="rollouts.filter"),  # grammar: the input's tooltip
        Binding("escape", "clear_filter", "Clear filter", show=False, id="rollouts.clear_filter"),
        Binding("w", "toggle_scope", "Whole run", id="rollouts.scope", tooltip="the whole run, or back to a step"),
        Binding("f", "enlarge", "Enlarge", id="rollouts.enlarge", tooltip="the image as large as the screen"),
        Binding("y", "copy_path", "Copy PNG path", id="rollouts.copy_path"),
        # Shown (and active) only while an episode is selected: see check_action.
        Binding("comma", "turn(-1)", "Prev turn", key_display=",", id="rollouts.prev_turn", group=_TURN_KEYS),
        Binding("full_stop", "turn(1)", "Next turn", key_display=".", id="rollouts.next_turn", group=_TURN_KEYS),
        Binding("less_than_sign", "turn_at(0)", "First turn", key_display="<", id="rollouts.first_turn",
                group=_TURN_ENDS),
        Binding("greater_than_sign", "turn_at(-1)", "Last turn", key_display=">", id="rollouts.last_turn",
                group=_TURN_ENDS),
    ]

    class RunScanned(Message):
        """The whole-run scan's result: per step, (version, its parsed rollouts, its scan)."""

        def __init__(self, ticket: int, steps: Scanned) -> None:
            super().__init__()
            self.ticket = ticket
            self.steps = steps

    def __init__(self, run_dir: Path | None = None, image_height: int = 12, redraw_s: float = 2.0,
                 *, graphics: GraphicsProbe | None = None, id: str | None = None) -> None:
        super().__init__(id=id)
        self.redraw_s = redraw_s
        self._stale = False
        self._timer_pending = False
        self._last_redraw = -1e9
        self.run_dir = run_dir
        self.image_height = image_height
        self.store = RolloutStore()
        self.step: int | None = None
        self.follow_latest = True
        self.sort = "index"
        self.whole_run = False  # the scope: the whole run, or one step
        self.filter: RolloutFilter = NO_FILTER
        self.selected: RolloutRecord | None = None
        self.turn = 0  # the turn shown when the selected rollout is an episode
        self._probe = graphics or GraphicsProbe()
        self.image_mode = HALFBLOCK  # decided on mount, when the app knows whether it is headless
        self.pictures = PictureCache(image_height)
        self._shown_rows: list[RolloutRecord] = []
        self._hits: list[RolloutRecord] = []  # every row that matches (the table may list fewer)
        self.shown_images: list[HalfBlockImage] = []  # what the detail view draws now
        self._shapes: dict[int, tuple[int, int | None]] = {}  # id(static) -> (width, lines) last shown
        self.run_scan = RunScan()
        self._header = Static("no rollouts yet", id="rollout-header")
        self._triage = Static("", id="rollout-triage")
        self._triage_text = ""
        self.filter_input = Input(placeholder="filter: 0.5..1  <0.2  format=0  /regex/  text   (Esc clears)",
                                  id="rollout-filter", compact=True)
        self.filter_input.tooltip = FILTER_HELP
        self.table = RowTable(COLUMNS, WIDTHS, id="rollout-table")
        self._episode = Static("", id="rollout-episode")  # an episode's header and turn strip
        self._gfx = GraphicsStrip(image_height, id="rollout-gfx")  # kitty/sixel mode only
        self._image = Static("", id="rollout-image")
        self._text = Static("Rollouts appear here once the trainer logs its first step.", id="rollout-text")

    def compose(self) -> ComposeResult:
        with Vertical(id="rollout-list"):
            yield self._header
            yield self._triage
            yield self.filter_input
            yield self.table
        with VerticalScroll(id="rollout-detail"):
            yield self._episode
            yield self._gfx
            yield self._image
            yield self._text

    def on_mount(self) -> None:
        self.image_mode = choose_renderer(os.environ, self.app.is_headless, self._probe)

    # ---- data -------------------------------------------------------------------------
    def add(self, records: list[dict[str, Any]]) -> None:
        """Take new rollout records; the view follows the latest step, redrawn at most once
        per ``redraw_s`` and only while on screen (a hidden pane catches up when shown)."""
        changed = self.store.add(records)
        if not changed:
            return
        self.run_scan.changed |= changed
        if self.whole_run or self.step is None or self.follow_latest or self.step in changed:
            self._stale = True
            self._schedule()

    def _schedule(self) -> None:
        if not self._timer_pending and self.is_mounted:
            self._timer_pending = True
            self.set_timer(self._next_redraw_in(), self._timer_redraw)

    def _next_redraw_in(self) -> float:
        return max(0.01, self._last_redraw + self.redraw_s - time.monotonic())  # set_timer(0) divides by 0

    def _timer_redraw(self) -> None:
        self._timer_pending = False
        self.catch_up()

    def on_show(self) -> None:
        self.catch_up()

    def catch_up(self) -> None:
        """Show the latest step (or redraw the current one) if new rollouts changed it."""
        if not self._stale or not self.is_on_screen or not self.store.steps:
            return
        self._stale = False
        self._last_redraw = time.monotonic()
        if self.whole_run:
            self._update_run()
            return
        self.run_scan.changed.clear()
        self.show_step(self.store.steps[-1] if self.step is None or self.follow_latest else self.step)

    def show_step(self, step: int) -> None:
        """Fill the table with the rollouts of ``step`` that match the filter."""
        steps = self.store.steps
        if not steps:
            return
        if step not in self.store:
            step = min(steps, key=lambda s: abs(s - step))
        self.step = step
        self.follow_latest = step == steps[-1]
        rows = self.store.rows(step, self.sort)
        self._hits = [r for r in rows if self.filter(r)] if self.filter else rows
        zero, _ = self.store.variance(step)
        drops = [] if self.filter else self.store.drops(step)  # a drop has no reward or completion to match
        self._fill(self._hits, lambda s: zero, drops)

    def _fill(self, rows: list[RolloutRecord], zero_of: Callable[[int], frozenset[int]],
              drops: list[DropRecord]) -> None:
        """List ``rows`` (then ``drops``); the selected rollout stays selected if listed."""
        run = self.whole_run
        sel = self.selected
        self._shown_rows = rows
        # The run's rows name their step; a new header too, so no strip cached at other widths is reused.
        self.table.columns, self.table.widths = (RUN_COLUMNS, RUN_WIDTHS) if run else (COLUMNS, WIDTHS)
        self.table.set_rows([
            (f"{r.step}:{r.index}" if run else str(r.index),
             (f"{r.step}:{r.index}" if run else str(r.index),
              Text(f"{r.group}=", style="yellow") if r.group in zero_of(r.step) else str(r.group),
              signed_text(r.reward, ".2f"), signed_text(r.advantage), completion_cell(r)))
            for r in rows
        ] + [(f"drop-{d.index}", (str(d.index), str(d.group), "-", "-",
                                  Text(f"dropped: {one_line(d.drop_reason)}", style="red")))
             for d in drops])  # after the rollouts; selecting one shows nothing new
        row = 0
        if sel is not None:
            row = next((i for i, r in enumerate(rows) if (r.step, r.index) == (sel.step, sel.index)), 0)
        if rows:
            self.table.move_cursor(row)
            self._select(rows[row])
        else:
            self._show_nothing()
        self._update_header()

    def _update_header(self) -> None:
        steps = self.store.steps
        if self.step is None or not steps:
            return
        if self.whole_run:
            if self.scanning:
                self._header.update(f"whole run · scanning {len(steps)} steps…", layout=False)
                return
            records, zero, groups = self.run_scan.totals()
            where, dropped = f"whole run · {len(self.run_scan.scans or ())} steps", 0
        else:
            records = self.store.records(self.step)
            latest = " latest" if self.follow_latest else ""
            dropped = len(self.store.drops(self.step))
            where = f"step {self.step} · {steps.index(self.step) + 1}/{len(steps)}{latest}"
            zero_set, groups = self.store.variance(self.step)
            zero = len(zero_set)
        mean = sum(r.reward for r in records) / len(records) if records else 0.0
        dropped_text = f" · {dropped} dropped" if dropped else ""
        self._header.update(f"{where} · mean {mean:.2f}{dropped_text} · {self.sort}", layout=False)
        text = triage_text(records, self._hits, len(self._shown_rows), bool(self.filter), zero, groups,
                           self._triage.content_size.width or 48)
        if text != self._triage_text:  # its height may change: a layout only then
            self._triage_text = text
            self._triage.update(text)

    @on(RowTable.Highlighted, "#rollout-table")
    def _row_highlighted(self, event: RowTable.Highlighted) -> None:
        event.stop()
        if 0 <= event.row < len(self._shown_rows) and self._shown_rows[event.row] is not self.selected:
            self._select(self._shown_rows[event.row])

    # ---- the whole run ----------------------------------------------------------------
    @property
    def scanning(self) -> bool:
        """True while the whole-run scan runs."""
        return self.whole_run and self.run_scan.scans is None

    def _start_scan(self) -> None:
        """Scan every step under the filter in a thread (parsing what was never shown)."""
        ticket = self.run_scan.start()
        self._update_header()
        self._scan_worker(self.store.snapshot(), self.filter, ticket)

    @work(thread=True, exclusive=True, group="rollout-scan", name="rollout-scan")
    def _scan_worker(self, snapshot: list[tuple[int, int, list[Any]]], flt: RolloutFilter, ticket: int) -> None:
        worker = get_current_worker()
        steps = scan_snapshot(snapshot, flt, lambda: worker.is_cancelled)
        if steps is not None:
            self.post_message(self.RunScanned(ticket, steps))

    @on(RunScanned)
    def _run_scanned(self, message: RunScanned) -> None:
        message.stop()
        if self.whole_run and self.run_scan.landed(message.ticket, message.steps, self.store):
            self._update_run()

    def _update_run(self) -> None:
        """List the whole run's matches (the steps changed since rescanned first)."""
        if self.scanning:
            return  # what changed meanwhile is applied when the scan lands
        self._hits = sort_rows(self.run_scan.update(self.store, self.filter), self.sort)
        self._fill(self._hits[:RUN_ROWS_MAX], self.run_scan.zero_of, [])

    def _redraw(self) -> None:
        if self.whole_run:
            self._start_scan()
        elif self.step is not None:
            self.show_step(self.step)

    # ---- detail -----------------------------------------------------------------------
    def image_path(self, rel: str) -> Path:
        """Where an image named in rollouts.jsonl lives."""
        p = Path(rel)
        if p.is_absolute() or self.run_dir is None:
            return p
        return self.run_dir / p

    def _select(self, r: RolloutRecord) -> None:
        """Show rollout ``r``; another rollout than the one shown starts at its first turn."""
        prev = self.selected
        if prev is None or (prev.step, prev.index) != (r.step, r.index):
            self.turn = 0
        self.selected = r
        if r.turns:
            self.turn = min(self.turn, len(r.turns) - 1)
        if bool(r.turns) != bool(prev is not None and prev.turns):
            self.refresh_bindings()  # the turn keys are shown for episodes only
        self._show_selected()

    def _show_nothing(self) -> None:
        """No row to show (the filter matched none)."""
        self.selected = None
        self.shown_images = []
        self._gfx.show(self.image_mode, [])
        self._episode.display = False
        self._show(self._image, Text(""))
        what = f"No rollout matches {self.filter.text!r}." if self.filter else "No rollouts here."
        self._show(self._text, Text(what, style="dim"))
        self.refresh_bindings()  # no turn keys

    def _frames(self, rels: list[str]) -> list[Any]:
        """What the detail draws for these images: half blocks, or in a graphics mode only
        the lines of missing images (the images go to graphics widgets above)."""
        paths = [self.image_path(rel) for rel in rels]
        pictures = [self.pictures.picture(p) for p in paths]
        drawn = [(p, x) for p, x in zip(paths, pictures) if isinstance(x, HalfBlockImage)]
        self.shown_images = [x for _, x in drawn]
        if self.image_mode == HALFBLOCK:
            return pictures
        self._gfx.show(self.image_mode, [(p, x.image) for p, x in drawn])
        return [x for x in pictures if not isinstance(x, HalfBlockImage)]

    def _show_selected(self) -> None:
        r = self.selected
        if r is None:
            return
        if r.turns:
            self._show_turn(r, self.turn)
            return
        if self._episode.display:
            self._episode.display = False
        images = self._frames(r.images)
        if not r.images:
            images.append(Text("(no image in this rollout)", style="dim"))
        self._show(self._image, Group(*images))
        self._show(self._text, rollout_detail(r, [self.image_path(rel).resolve() for rel in r.images]))

    def _show_turn(self, r: RolloutRecord, k: int) -> None:
        """An episode: its header and strip, turn ``k``'s frame beside what the model did."""
        t = r.turns[k]
        frames = self._frames(t.images)
        if not self._episode.display:
            self._episode.display = True
        self._show(self._episode, episode_header(r, k))
        drawn_above = self.image_mode != HALFBLOCK and t.images and not frames  # by graphics widgets
        self._show(self._image, turn_detail(r, k) if drawn_above else turn_view(frames, r, k))
        self._show(self._text, turn_extra(r, k, [self.image_path(rel).resolve() for rel in t.images]))

    def _show(self, static: Static, renderable: Any) -> None:
        # Each part is rendered once here, at the width it will be shown at, and the Static
        # replays those lines; a layout (it re-arranges the whole screen) is asked for only
        # when a part's height changes (the next rollout usually has the same shape).
        width = static.size.width
        height = None
        if width > 0:
            console = self.app.console
            lines = console.render_lines(renderable, console.options.update_width(width), pad=False)
            renderable = Prerendered(renderable, lines, width)
            height = len(lines)
        static.update(renderable, layout=height is None or (width, height) != self._shapes.get(id(static)))
        self._shapes[id(static)] = (width, height)

    # ---- actions ----------------------------------------------------------------------
    def _goto(self, step: int) -> None:
        """Show ``step`` (back in the step scope: a step key leaves the whole run)."""
        self.whole_run = False
        self.workers.cancel_group(self, "rollout-scan")
        self.show_step(step)

    def action_step(self, delta: int) -> None:
        steps = self.store.steps
        if not steps or self.step is None:
            return
        i = min(max(steps.index(self.step) + delta, 0), len(steps) - 1)
        self._goto(steps[i])

    def action_step_at(self, i: int) -> None:
        if self.store.steps:
            self._goto(self.store.steps[i])

    def action_cycle_sort(self) -> None:
        self.sort = SORT_MODES[(SORT_MODES.index(self.sort) + 1) % len(SORT_MODES)]
        self.table.move_cursor(0)
        self.selected = None
        if self.whole_run:
            self._update_run()
        elif self.step is not None:
            self.show_step(self.step)

    def action_toggle_scope(self) -> None:
        """The whole run, or back to the step of the selected rollout."""
        if self.step is None:
            return
        if not self.whole_run:
            self.whole_run = True
            self._start_scan()
        else:
            self._goto(self.selected.step if self.selected is not None else self.step)

    def action_filter(self) -> None:
        self.filter_input.value = self.filter.text
        self.filter_input.add_class("-visible")
        self.filter_input.focus()

    @on(Input.Submitted, "#rollout-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            flt = parse_filter(event.value)
        except FilterError as e:
            self.notify(f"Filter: {e}", severity="error")
            return
        self.filter = flt
        self.filter_input.set_class(bool(flt), "-visible")  # stays up to show what filters the rows
        self.table.focus()
        self._redraw()

    def action_clear_filter(self) -> None:
        self.filter_input.value = ""
        self.filter_input.remove_class("-visible")
        self.table.focus()
        if self.filter:
            self.filter = NO_FILTER
            self._redraw()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The turn keys work (and show in the footer) only while an episode is selected;
        Esc clears a filter only when there is one (else it does what it does elsewhere)."""
        if action in _TURN_ACTIONS:
            return self.selected is not None and bool(self.selected.turns)
        if action == "clear_filter":
            return bool(self.filter) or self.filter_input.has_class("-visible")
        return True

    def action_turn(self, delta: int) -> None:
        r = self.selected
        if r is not None and r.turns:
            self.show_turn(self.turn + delta)

    def action_turn_at(self, k: int) -> None:
        r = self.selected
        if r is not None and r.turns:
            self.show_turn(k if k >= 0 else len(r.turns) + k)

    def show_turn(self, k: int) -> None:
        """Show turn ``k`` (from 0, clamped) of the selected episode."""
        r = self.selected
        if r is None or not r.turns:
            return
        k = min(max(k, 0), len(r.turns) - 1)
        if k != self.turn:
            self.turn = k
            self._show_turn(r, k)

    def _selected_images(self) -> list[str]:
        """The images of the selected rollout, or of the turn shown of an episode."""
        r = self.selected
        if r is None:
            return []
        return r.turns[self.turn].images if r.turns else r.images

    def action_enlarge(self) -> None:
        r = self.selected
        paths = [self.image_path(rel) for rel in self._selected_images()]
        images = [(p, img) for p in paths if (img := self.pictures.load(p)) is not None]
        if r is None or not images:
            self.notify("No image to enlarge.", severity="warning")
            return
        title = f"step {r.step} · #{r.index}" + (f" · turn {self.turn + 1}/{len(r.turns)}" if r.turns else "")
        self.app.push_screen(ImageScreen(images, title, self.image_mode))

    def action_copy_path(self) -> None:
        images = self._selected_images()
        if not images:
            self.notify("No image selected.", severity="warning")
            return
        path = str(self.image_path(images[0]).resolve())
        self.app.copy_to_clipboard(path)
        self.notify(f"Copied {path}")
