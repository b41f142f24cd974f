"""Rollouts pane: the images the model saw, beside prompt, completion, reward and advantage.

Images are drawn with half blocks (``▀``, foreground = upper pixel, background = lower
pixel) as a Rich renderable: every true-colour terminal shows them, Rich downgrades
colours for the others, and SVG snapshots capture them, unlike sixel/kitty protocols.
"""

from __future__ import annotations

import math
import re
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

from backend.records import RolloutRecord, rollout_position
from vlmrl_tui.watch import display_path
from vlmrl_tui.panes.table import RowTable

SORT_MODES = ("index", "best", "worst")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")


class Prerendered:
    """A renderable with its lines already rendered at ``width``: replayed as they are at
    that width (no second render), rendered afresh at any other."""

    def __init__(self, renderable: Any, lines: list[list[Segment]], width: int) -> None:
        self.renderable = renderable
        self.lines = lines
        self.width = width

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.renderable)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width != self.width:
            yield self.renderable
            return
        newline = Segment.line()
        for line in self.lines:
            yield from line
            yield newline


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

    def rows(self, step: int, sort: str) -> list[RolloutRecord]:
        rows = list(self.records(step))
        if sort == "best":
            rows.sort(key=lambda r: (-r.reward, -(r.advantage or 0.0), r.index))
        elif sort == "worst":
            rows.sort(key=lambda r: (r.reward, r.advantage or 0.0, r.index))
        return rows


def _signed(v: float | None, fmt: str = "+.3f") -> Text:
    if v is None:
        return Text("n/a", style="dim")
    style = "green" if v > 0 else "red" if v < 0 else "yellow"
    return Text(format(v, fmt), style=style)


class RolloutsPane(Horizontal):
    """Browse rollouts by step and within a step; sort best/worst; see the image."""

    DEFAULT_CSS = """
    RolloutsPane { height: 1fr; }
    RolloutsPane > #rollout-list { width: 2fr; min-width: 30; }
    RolloutsPane #rollout-header { height: 1; padding: 0 1; background: $panel; }
    RolloutsPane #rollout-table { height: 1fr; }
    RolloutsPane > #rollout-detail { width: 3fr; padding: 0 1; border-left: vkey $panel; }
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
        self._images: LRUCache[Path, Image.Image | None] = LRUCache(64)
        self._shown_rows: list[RolloutRecord] = []
        self.shown_images: list[HalfBlockImage] = []  # what the detail view draws now
        self._shapes: dict[int, tuple[int, int | None]] = {}  # id(static) -> (width, lines) last shown
        self._header = Static("no rollouts yet", id="rollout-header")
        self.table = RowTable(("#", "grp", "reward", "adv", "completion"), (3, 3, 6, 7, 40), id="rollout-table")
        self._image = Static("", id="rollout-image")
        self._text = Static("Rollouts appear here once the trainer logs its first step.", id="rollout-text")

    def compose(self) -> ComposeResult:
        with Vertical(id="rollout-list"):
            yield self._header
            yield self.table
        with VerticalScroll(id="rollout-detail"):
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
            (str(r.index), (str(r.index), str(r.group), _signed(r.reward, ".2f"), _signed(r.advantage),
                            _CONTROL_RE.sub("�", r.completion.replace("\n", " ⏎ "))))
            for r in rows
        ])
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
        self._header.update(
            f"step {self.step} · {pos}/{len(steps)}{latest} · mean {mean:.2f} · {self.sort}", layout=False
        )

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

    def _select(self, r: RolloutRecord) -> None:
        self.selected = r
        images: list[Any] = []
        for rel in r.images:
            path = self.image_path(rel)
            img = self._load(path)
            if img is None:
                images.append(Text(f"[image missing: {path}]", style="red"))
            else:
                images.append(HalfBlockImage(img, max_width=self.image_height * 2 * img.width // max(1, img.height),
                                             max_height=self.image_height))
        if not r.images:
            images.append(Text("(no image in this rollout)", style="dim"))
        self.shown_images = [x for x in images if isinstance(x, HalfBlockImage)]
        detail = self.detail(r)
        # Each part is rendered once here, at the width it will be shown at, and the Static
        # replays those lines; a layout (it re-arranges the whole screen) is asked for only
        # when a part's height changes (the next rollout usually has the same shape).
        for static, renderable in ((self._image, Group(*images)), (self._text, detail)):
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
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row("rollout", f"step {r.step} · #{r.index} · group {r.group} · {r.example_id}")
        reward = _signed(r.reward, ".3f")
        if r.reward_parts:
            reward.append("  (" + ", ".join(f"{k} {v:.2f}" for k, v in r.reward_parts.items()) + ")", style="dim")
        grid.add_row("reward", reward)
        grid.add_row("advantage", _signed(r.advantage))
        grid.add_row("prompt", Text(r.prompt))
        grid.add_row("completion", Text(r.completion, style="bold"))
        if r.answer is not None:
            grid.add_row("answer", str(r.answer))
        for rel in r.images:
            path = self.image_path(rel).resolve()
            grid.add_row("png", Text(display_path(path), style=Style(link=path.as_uri(), underline=True)))
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

    def action_copy_path(self) -> None:
        if self.selected is None or not self.selected.images:
            self.notify("No image selected.", severity="warning")
            return
        path = str(self.image_path(self.selected.images[0]).resolve())
        self.app.copy_to_clipboard(path)
        self.notify(f"Copied {path}")
