"""Rollouts pane: the images the model saw, beside prompt, completion, reward and advantage.

An episode (a record with ``turns``) is shown as a filmstrip (episode.py renders it);
``,``/``.`` browse its turns, ``<``/``>`` jump to the first/last one. Examples the step
left out (drop records: a broken image, ...) are listed last, with their reason.

Images are drawn with half blocks (``▀``, foreground = upper pixel, background = lower
pixel) as a Rich renderable: every true-colour terminal shows them, Rich downgrades
colours for the others, and SVG snapshots capture them, unlike sixel/kitty protocols.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

from PIL import Image
from rich.color import Color
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.cache import LRUCache
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static

from backend.records import DropRecord, RolloutRecord, rollout_position
from vlmrl_tui.panes.episode import (Prerendered, episode_header, field_grid, one_line, png_link, reward_text,
                                     signed_text, turn_action, turn_extra, turn_view)
from vlmrl_tui.panes.table import RowTable

SORT_MODES = ("index", "best", "worst")
ROW_MAX_TURNS = 40  # actions the table row of an episode lists
_TURN_ACTIONS = ("turn", "turn_at")
_TURN_KEYS = Binding.Group("Turn", compact=True)  # the footer shows ",. Turn"
_TURN_ENDS = Binding.Group("First/last turn", compact=True)


class HalfBlockImage:
    """A PIL image as terminal cells: two pixel rows per cell row, aspect ratio kept."""

    def __init__(self, image: Image.Image, max_width: int = 48, max_height: int = 24) -> None:
        if image.mode != "RGB":
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (0, 0, 0))
            image.paste(rgba, mask=rgba.getchannel("A"))
        self.image = image
        self.max_width = max(1, max_width)
        self.max_height = max(1, max_height)
        self._cache: dict[int, list[list[Segment]]] = {}

    def cell_size(self, width: int) -> tuple[int, int]:
        """(columns, rows) the image takes when at most ``width`` columns are free."""
        w, h = self.image.size
        cols = max(1, min(width, self.max_width))
        rows = max(1, math.ceil(h * cols / w / 2))
        if rows > self.max_height:
            rows = self.max_height
            cols = max(1, min(cols, round(w * rows * 2 / h)))
        return cols, rows

    def _lines(self, width: int) -> list[list[Segment]]:
        lines = self._cache.get(width)
        if lines is not None:
            return lines
        cols, rows = self.cell_size(width)
        shrinking = cols < self.image.width
        method = Image.Resampling.BOX if shrinking else Image.Resampling.NEAREST
        small = self.image.resize((cols, rows * 2), method)
        px = small.load()
        styles: dict[tuple[tuple[int, int, int], tuple[int, int, int]], Style] = {}
        lines = []
        for r in range(rows):
            line: list[Segment] = []
            for c in range(cols):
                top, bottom = px[c, 2 * r], px[c, 2 * r + 1]
                style = styles.get((top, bottom))
                if style is None:
                    style = styles[(top, bottom)] = Style(
                        color=Color.from_rgb(*top[:3]), bgcolor=Color.from_rgb(*bottom[:3])
                    )
                line.append(Segment("▀", style))
            lines.append(list(Segment.simplify(line)))
        self._cache[width] = lines
        return lines

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        cols, _ = self.cell_size(options.max_width)
        return Measurement(cols, cols)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self._lines(options.max_width):
            yield from line
            yield Segment.line()


class RolloutStore:
    """Rollouts grouped by step (the newest ``max_steps`` steps are kept).

    Records stay as the feed parsed them until a step is shown: a live run brings hundreds
    a second and most are never looked at. A record for a (step, index) already held
    replaces it: a resumed trainer rewrites rollouts.jsonl, and the feed reads it again.
    """

    def __init__(self, max_steps: int = 1000) -> None:
        self.max_steps = max_steps
        self._raw: dict[int, dict[int, dict[str, Any]]] = {}  # step -> index -> record
        self._parsed: dict[int, list[RolloutRecord]] = {}  # steps converted since they last changed
        self._steps: list[int] | None = None

    def add(self, records: Iterable[dict[str, Any]]) -> set[int]:
        """Add raw records; return the steps that changed."""
        changed: set[int] = set()
        for rec in records:
            pos = rollout_position(rec)
            if pos is None:
                continue
            step, index = pos
            by_index = self._raw.get(step)
            if by_index is None:
                by_index = self._raw[step] = {}
                self._steps = None
            by_index[index] = rec
            changed.add(step)
        for step in changed:
            self._parsed.pop(step, None)
        if len(self._raw) > self.max_steps:
            for step in self.steps[: len(self._raw) - self.max_steps]:
                del self._raw[step]
                self._parsed.pop(step, None)
            self._steps = None
        return changed

    @property
    def steps(self) -> list[int]:
        if self._steps is None:
            self._steps = sorted(self._raw)
        return self._steps

    def __contains__(self, step: int) -> bool:
        return step in self._raw

    def records(self, step: int) -> list[RolloutRecord]:
        """The rollouts of ``step`` in index order (records that cannot be read are left out)."""
        parsed = self._parsed.get(step)
        if parsed is None:
            parsed = []
            for index in sorted(self._raw.get(step, {})):
                try:
                    parsed.append(RolloutRecord.from_json(self._raw[step][index]))
                except ValueError:
                    continue
            self._parsed[step] = parsed
        return parsed

    def drops(self, step: int) -> list[DropRecord]:
        """The examples left out of ``step``, in index order."""
        raw = self._raw.get(step, {})
        return [d for i in sorted(raw) if (d := DropRecord.from_json(raw[i])) is not None]

    def rows(self, step: int, sort: str) -> list[RolloutRecord]:
        rows = list(self.records(step))
        if sort == "best":
            rows.sort(key=lambda r: (-r.reward, -(r.advantage or 0.0), r.index))
        elif sort == "worst":
            rows.sort(key=lambda r: (r.reward, r.advantage or 0.0, r.index))
        return rows


def completion_cell(r: RolloutRecord) -> str:
    """The table's completion column: the reply, or an episode's turns and actions."""
    if not r.turns:
        return one_line(r.completion)
    n = len(r.turns)
    actions = " ".join(turn_action(t) for t in r.turns[:ROW_MAX_TURNS])
    return f"{n} turn{'s' if n != 1 else ''}: {actions}" + (" …" if n > ROW_MAX_TURNS else "")


class RolloutsPane(Horizontal):
    """Browse rollouts by step and within a step; sort best/worst; see the image."""

    DEFAULT_CSS = """
    RolloutsPane { height: 1fr; }
    RolloutsPane > #rollout-list { width: 2fr; min-width: 30; }
    RolloutsPane #rollout-header { height: 1; padding: 0 1; background: $panel; }
    RolloutsPane #rollout-table { height: 1fr; }
    RolloutsPane > #rollout-detail { width: 3fr; padding: 0 1; border-left: vkey $panel; }
    RolloutsPane #rollout-episode { height: auto; display: none; }
    RolloutsPane #rollout-image { height: auto; }
    RolloutsPane #rollout-text { height: auto; }
    """

    BINDINGS = [
        Binding("left_square_bracket", "step(-1)", "Prev step", key_display="[", id="rollouts.prev_step"),
        Binding("right_square_bracket", "step(1)", "Next step", key_display="]", id="rollouts.next_step"),
        Binding("g", "first_step", "First step", show=False, id="rollouts.first_step"),
        Binding("l", "last_step", "Latest step", id="rollouts.last_step"),
        Binding("s", "cycle_sort", "Sort", id="rollouts.sort"),
        Binding("y", "copy_path", "Copy PNG path", id="rollouts.copy_path"),
        # Shown (and active) only while an episode is selected: see check_action.
        Binding("comma", "turn(-1)", "Prev turn", key_display=",", id="rollouts.prev_turn", group=_TURN_KEYS),
        Binding("full_stop", "turn(1)", "Next turn", key_display=".", id="rollouts.next_turn", group=_TURN_KEYS),
        Binding("less_than_sign", "turn_at(0)", "First turn", key_display="<", id="rollouts.first_turn",
                group=_TURN_ENDS),
        Binding("greater_than_sign", "turn_at(-1)", "Last turn", key_display=">", id="rollouts.last_turn",
                group=_TURN_ENDS),
    ]

    def __init__(self, run_dir: Path | None = None, image_height: int = 12, redraw_s: float = 2.0,
                 *, id: str | None = None) -> None:
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
        self.selected: RolloutRecord | None = None
        self.turn = 0  # the turn shown when the selected rollout is an episode
        self._images: LRUCache[Path, Image.Image | None] = LRUCache(64)
        self._pictures: LRUCache[Path, HalfBlockImage] = LRUCache(64)  # keeps their rendered lines
        self._shown_rows: list[RolloutRecord] = []
        self.shown_images: list[HalfBlockImage] = []  # what the detail view draws now
        self._shapes: dict[int, tuple[int, int | None]] = {}  # id(static) -> (width, lines) last shown
        self._header = Static("no rollouts yet", id="rollout-header")
        self.table = RowTable(("#", "grp", "reward", "adv", "completion"), (3, 3, 6, 7, 40), id="rollout-table")
        self._episode = Static("", id="rollout-episode")  # an episode's header and turn strip
        self._image = Static("", id="rollout-image")
        self._text = Static("Rollouts appear here once the trainer logs its first step.", id="rollout-text")

    def compose(self) -> ComposeResult:
        with Vertical(id="rollout-list"):
            yield self._header
            yield self.table
        with VerticalScroll(id="rollout-detail"):
            yield self._episode
            yield self._image
            yield self._text

    # ---- data -------------------------------------------------------------------------
    def add(self, records: list[dict[str, Any]]) -> None:
        """Take new rollout records; the view follows the latest step, redrawn at most once
        per ``redraw_s`` and only while on screen (a hidden pane catches up when shown)."""
        changed = self.store.add(records)
        if not changed:
            return
        if self.step is None or self.follow_latest or self.step in changed:
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
        self.show_step(self.store.steps[-1] if self.step is None or self.follow_latest else self.step)

    def show_step(self, step: int) -> None:
        """Fill the table with the rollouts of ``step``."""
        steps = self.store.steps
        if not steps:
            return
        if step not in self.store:
            step = min(steps, key=lambda s: abs(s - step))
        same_step = step == self.step
        keep = self.selected.index if (same_step and self.selected is not None) else None
        self.step = step
        self.follow_latest = step == steps[-1]
        rows = self.store.rows(step, self.sort)
        self._shown_rows = rows
        table = self.table
        table.set_rows([
            (str(r.index), (str(r.index), str(r.group), signed_text(r.reward, ".2f"), signed_text(r.advantage),
                            completion_cell(r)))
            for r in rows
        ] + [(f"drop-{d.index}", (str(d.index), str(d.group), "-", "-",
                                  Text(f"dropped: {one_line(d.drop_reason)}", style="red")))
             for d in self.store.drops(step)])  # after the rollouts; selecting one shows nothing new
        row = 0
        if keep is not None:
            row = next((i for i, r in enumerate(rows) if r.index == keep), 0)
        if rows:
            table.move_cursor(row)
            self._select(rows[row])
        self._update_header()

    def _update_header(self) -> None:
        steps = self.store.steps
        if self.step is None or not steps:
            return
        pos = steps.index(self.step) + 1
        rows = self.store.records(self.step)
        mean = sum(r.reward for r in rows) / len(rows) if rows else 0.0
        latest = " latest" if self.follow_latest else ""
        dropped = len(self.store.drops(self.step))
        dropped_text = f" · {dropped} dropped" if dropped else ""
        self._header.update(
            f"step {self.step} · {pos}/{len(steps)}{latest} · mean {mean:.2f}{dropped_text} · {self.sort}",
            layout=False)

    @on(RowTable.Highlighted, "#rollout-table")
    def _row_highlighted(self, event: RowTable.Highlighted) -> None:
        event.stop()
        if 0 <= event.row < len(self._shown_rows) and self._shown_rows[event.row] is not self.selected:
            self._select(self._shown_rows[event.row])

    # ---- detail -----------------------------------------------------------------------
    def image_path(self, rel: str) -> Path:
        """Where an image named in rollouts.jsonl lives."""
        p = Path(rel)
        if p.is_absolute() or self.run_dir is None:
            return p
        return self.run_dir / p

    def _load(self, path: Path) -> Image.Image | None:
        if path in self._images:
            return self._images[path]
        try:
            with Image.open(path) as im:
                im.load()
                if max(im.size) > 512:
                    im.thumbnail((512, 512))
                image: Image.Image | None = im.copy()
        except (OSError, ValueError):
            image = None
        self._images[path] = image
        return image

    def _picture(self, rel: str) -> HalfBlockImage | Text:
        """The image at ``rel`` as half blocks (kept, with its rendered lines, for the next
        time it is shown), or a line saying it is missing."""
        path = self.image_path(rel)
        picture = self._pictures.get(path)
        if picture is not None:
            return picture
        img = self._load(path)
        if img is None:
            return Text(f"[image missing: {path}]", style="red")
        picture = HalfBlockImage(img, max_width=self.image_height * 2 * img.width // max(1, img.height),
                                 max_height=self.image_height)
        self._pictures[path] = picture
        return picture

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

    def _show_selected(self) -> None:
        r = self.selected
        if r is None:
            return
        if r.turns:
            self._show_turn(r, self.turn)
            return
        if self._episode.display:
            self._episode.display = False
        images: list[Any] = [self._picture(rel) for rel in r.images]
        if not r.images:
            images.append(Text("(no image in this rollout)", style="dim"))
        self.shown_images = [x for x in images if isinstance(x, HalfBlockImage)]
        self._show(self._image, Group(*images))
        self._show(self._text, self.detail(r))

    def _show_turn(self, r: RolloutRecord, k: int) -> None:
        """An episode: its header and strip, turn ``k``'s frame beside what the model did."""
        t = r.turns[k]
        frames: list[Any] = [self._picture(rel) for rel in t.images]
        self.shown_images = [x for x in frames if isinstance(x, HalfBlockImage)]
        if not self._episode.display:
            self._episode.display = True
        self._show(self._episode, episode_header(r, k))
        self._show(self._image, turn_view(frames, r, k))
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

    def detail(self, r: RolloutRecord) -> Table:
        """The text beside the image: ids, reward and parts, advantage, prompt, completion, paths."""
        grid = field_grid()
        grid.add_row("rollout", f"step {r.step} · #{r.index} · group {r.group} · {r.example_id}")
        grid.add_row("reward", reward_text(r.reward, r.reward_parts))
        grid.add_row("advantage", signed_text(r.advantage))
        grid.add_row("prompt", Text(r.prompt))
        grid.add_row("completion", Text(r.completion, style="bold"))
        if r.answer is not None:
            grid.add_row("answer", str(r.answer))
        for rel in r.images:
            grid.add_row("png", png_link(self.image_path(rel).resolve()))
        return grid

    # ---- actions ----------------------------------------------------------------------
    def action_step(self, delta: int) -> None:
        steps = self.store.steps
        if not steps or self.step is None:
            return
        i = min(max(steps.index(self.step) + delta, 0), len(steps) - 1)
        self.show_step(steps[i])

    def action_first_step(self) -> None:
        if self.store.steps:
            self.show_step(self.store.steps[0])

    def action_last_step(self) -> None:
        if self.store.steps:
            self.show_step(self.store.steps[-1])

    def action_cycle_sort(self) -> None:
        self.sort = SORT_MODES[(SORT_MODES.index(self.sort) + 1) % len(SORT_MODES)]
        if self.step is not None:
            self.table.move_cursor(0)
            self.selected = None
            self.show_step(self.step)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The turn keys work (and show in the footer) only while an episode is selected."""
        if action in _TURN_ACTIONS:
            return self.selected is not None and bool(self.selected.turns)
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

    def action_copy_path(self) -> None:
        r = self.selected
        images = r.turns[self.turn].images if r is not None and r.turns else r.images if r is not None else []
        if not images:
            self.notify("No image selected.", severity="warning")
            return
        path = str(self.image_path(images[0]).resolve())
        self.app.copy_to_clipboard(path)
        self.notify(f"Copied {path}")
