"""A small braille line chart: a title, y labels, x labels, several series.

Each terminal cell holds 2x4 braille dots, so a 40x10 cell plot draws 80x40 points.
Consecutive points are joined (Bresenham in dot space); a sparse series (``marks``) also
gets a 3x3 dot mark at each point, so that a single point is visible. Drawing is pure Python over the
points on screen and costs well under a millisecond for a typical pane, which is why the
metrics pane uses it instead of a general plotting library (a Plotext redraw plus its ANSI
parsing cost ~25 ms a plot here, every time a step arrived).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

# Bit of each dot in a braille cell, by (column, row).
_DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
ROLES = ("band", "extra", "main", "eval")  # drawing order: later roles win a shared cell's colour


@dataclass(frozen=True)
class Series:
    """Points of one line; ``role`` picks its colour (band lines are dimmed) and its drawing
    order; ``color`` (a Rich colour, e.g. one per run in a comparison) overrides the role's
    colour; ``marks``: each point is also drawn as a small square (for series with few points)."""

    xs: Sequence[float]
    ys: Sequence[float]
    role: str = "main"
    label: str | None = None
    marks: bool = False
    color: str | None = None

    @property
    def style_key(self) -> str:
        """The key of this series' style in a chart's styles (its role, or its own colour)."""
        return f"color:{self.color}" if self.color else self.role


LABEL_WIDTH = 7  # the most characters of a y label (:func:`compact`)


def compact(v: float) -> str:
    """A y label: a number in at most :data:`LABEL_WIDTH` characters, sign included
    (``-0.00123`` is ``-0.0012``, ``-1.23e-05`` is ``-1.2e-5``, ``123456789`` is ``1.2e8``)."""
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if 1e-3 <= a < 1e5:
        text = f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3g}"
        return text if len(text) <= LABEL_WIDTH else f"{v:.2g}"  # only -0.00xyz needs the cut
    for digits in (1, 0):  # exponent without "+" and leading zeros: 1.2e8, -1.2e-5, -1e-300
        mantissa, exp = f"{v:.{digits}e}".split("e")
        text = f"{mantissa}e{int(exp)}"
        if len(text) <= LABEL_WIDTH:
            return text
    return text


def y_range(series: Sequence[Series]) -> tuple[float, float] | None:
    ys = [y for s in series for y in s.ys if math.isfinite(y)]
    if not ys:
        return None
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi


class ChartRender:
    """The chart as Rich segments for a given size (what :class:`LineChart` renders)."""

    def __init__(self, title: Text, series: Sequence[Series], width: int, height: int,
                 styles: dict[str, Style], title_base: Style | None = None,
                 x_label: Callable[[float], str] | None = None) -> None:
        self.title = title
        self.x_label = x_label  # x value -> label (e.g. a duration); None: the number
        self.title_base = title_base  # applied under the title's own styles
        self.series = series
        self.width = max(1, width)
        self.height = max(1, height)
        self.styles = dict(styles)  # per-series colours are added

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines(console):
            yield from line
            yield Segment.line()

    def lines(self, console: Console) -> list[list[Segment]]:
        w, h = self.width, self.height
        axis = self.styles["axis"]
        title = self.title.copy()
        title.truncate(w)
        pad = (w - title.cell_len) // 2
        title_segments = list(title.render(console))
        if self.title_base is not None:
            title_segments = list(Segment.apply_style(title_segments, self.title_base))
        out: list[list[Segment]] = [
            [Segment(" " * pad, axis), *title_segments, Segment(" " * (w - pad - title.cell_len), axis)]
        ]
        rows = h - 2
        yr = y_range(self.series)
        xs_all = [x for s in self.series for x in s.xs]
        if rows < 1 or yr is None or not xs_all:
            empty = "waiting for data" if rows >= 1 else ""
            for r in range(max(0, h - 1)):
                text = empty.center(w)[:w] if r == rows // 2 else " " * w
                out.append([Segment(text, axis)])
            return out[:h]
        lo, hi = yr
        labels = {0: compact(hi), rows - 1: compact(lo)}
        if rows >= 5:
            labels[(rows - 1) // 2] = compact((lo + hi) / 2)
        lw = max(len(s) for s in labels.values())
        pw = max(1, w - lw - 1)  # plot width in cells
        x0, x1 = min(xs_all), max(xs_all)
        xspan = (x1 - x0) or 1.0
        dots_w, dots_h = pw * 2, rows * 4
        bits = [[0] * pw for _ in range(rows)]
        owner = [[""] * pw for _ in range(rows)]

        wmax, hmax, yspan = dots_w - 1, dots_h - 1, hi - lo

        def to_dot(x: float, y: float) -> tuple[int, int]:
            dx = round((x - x0) / xspan * wmax)
            dy = round((hi - y) / yspan * hmax)
            return (0 if dx < 0 else wmax if dx > wmax else dx), (0 if dy < 0 else hmax if dy > hmax else dy)

        def light(dots: Iterable[tuple[int, int]], role: str) -> None:
            # inlined (no call per dot): a comparison redraws 6 plots x 3 runs at once
            for px, py in dots:
                cx, cy = px >> 1, py >> 2
                bits[cy][cx] |= _DOT[px & 1][py & 3]
                owner[cy][cx] = role

        for s in self.series:
            if s.color and s.style_key not in self.styles:
                self.styles[s.style_key] = axis + Style(color=s.color)
        for role in ROLES:
            for s in self.series:
                if s.role != role:
                    continue
                key = s.style_key
                light(_path(_per_column(s.xs, s.ys, to_dot)), key)
                if s.marks:
                    for x, y in zip(s.xs, s.ys):
                        if math.isfinite(x) and math.isfinite(y):
                            mx, my = to_dot(x, y)
                            light(((px, py) for px in range(max(0, mx - 1), min(dots_w, mx + 2))
                                   for py in range(max(0, my - 1), min(dots_h, my + 2))), key)
        for r in range(rows):
            label = labels.get(r, "")
            line = [Segment(label.rjust(lw), axis), Segment("┤" if label else "│", axis)]
            run_role, run_chars = "", []
            for c in range(pw):
                role = owner[r][c] if bits[r][c] else ""
                ch = chr(0x2800 + bits[r][c]) if bits[r][c] else " "
                if role != run_role and run_chars:
                    line.append(Segment("".join(run_chars), self.styles.get(run_role, axis)))
                    run_chars = []
                run_role = role
                run_chars.append(ch)
            if run_chars:
                line.append(Segment("".join(run_chars), self.styles.get(run_role, axis)))
            out.append(line)
        fmt = self.x_label
        first, last = (f"{x0:g}", f"{x1:g}") if fmt is None else (fmt(x0), fmt(x1))
        mid = f"{(x0 + x1) / 2:.0f}" if fmt is None else fmt((x0 + x1) / 2)
        mid = mid if pw >= len(first) + len(last) + len(mid) + 4 else ""
        xl = [" "] * pw
        for pos, text in ((0, first), (max(0, pw - len(last)), last), ((pw - len(mid)) // 2, mid)):
            for i, ch in enumerate(text):
                if 0 <= pos + i < pw:
                    xl[pos + i] = ch
        out.append([Segment(" " * lw + "└", axis), Segment("".join(xl), axis)])
        return out[:h]


def _per_column(xs: Sequence[float], ys: Sequence[float],
                to_dot: Callable[[float, float], tuple[int, int]]) -> list[tuple[int, int] | None]:
    """The series in dot space with at most four points per dot column (first, lowest,
    highest, last, in order; ``None`` marks a gap). Joining them lights the same dots as
    joining every point, at a cost bound by the plot's width, not the series' length."""
    out: list[tuple[int, int] | None] = []
    col: list[tuple[int, int]] = []
    isfinite = math.isfinite
    for x, y in zip(xs, ys):
        if not (isfinite(x) and isfinite(y)):
            out.extend(_extremes(col))
            col = []
            out.append(None)
            continue
        d = to_dot(x, y)
        if col and col[-1][0] != d[0]:
            out.extend(_extremes(col))
            col = []
        col.append(d)
    out.extend(_extremes(col))
    return out


def _extremes(col: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A dot column's first, lowest, highest and last points, in order."""
    if len(col) <= 4:
        return col
    keep = {0, len(col) - 1, min(range(len(col)), key=lambda i: col[i][1]),
            max(range(len(col)), key=lambda i: col[i][1])}
    return [col[i] for i in sorted(keep)]


def _path(points: Sequence[tuple[int, int] | None]) -> list[tuple[int, int]]:
    """The dots of the polyline through ``points`` (``None`` breaks it)."""
    out: list[tuple[int, int]] = []
    prev: tuple[int, int] | None = None
    for cur in points:
        if cur is None:
            prev = None
            continue
        if prev is None:
            out.append(cur)
        elif abs(cur[0] - prev[0]) <= 1 and abs(cur[1] - prev[1]) <= 1:
            out.append(cur)  # neighbours (most joins of a downsampled series): nothing between
        else:
            out.extend(_segment(prev, cur))
        prev = cur
    return out


def _segment(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]]:
    """Dots from a to b (Bresenham)."""
    (x0, y0), (x1, y1) = a, b
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    out = []
    while True:
        out.append((x0, y0))
        if x0 == x1 and y0 == y1:
            return out
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


class LineChart(Widget):
    """A widget showing :class:`Series` as a braille line chart; redrawn only on change."""

    DEFAULT_CSS = """
    LineChart {
        height: 1fr; width: 1fr; min-height: 5;
        .chart--main { color: $text-primary; }
        .chart--extra { color: $text-warning; }
        .chart--eval { color: $text-success; }
        .chart--band { color: $text-muted; }
        .chart--axis { color: $text-muted; }
        .chart--title { color: $text; text-style: bold; }
    }
    """
    COMPONENT_CLASSES = {"chart--main", "chart--extra", "chart--eval", "chart--band", "chart--axis", "chart--title"}

    def __init__(self, title: str = "", *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.series: list[Series] = []
        self.x_label: Callable[[float], str] | None = None  # see ChartRender; set before set_series
        self._parts: dict[str, Style] | None = None  # component styles, until the theme or CSS changes
        self._strips: list[Strip] | None = None  # the drawn chart, until series, size or style change
        self._strips_size: tuple[int, int] = (0, 0)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._parts = None  # theme or CSS changed
        self._strips = None

    def set_series(self, series: list[Series]) -> None:
        self.series = series
        self._strips = None
        self.refresh()

    def chart(self, width: int, height: int) -> ChartRender:
        """The chart at ``width`` x ``height`` cells."""
        # The widget's own style (background, inherited too) is folded into every part's
        # style, so drawn lines need no per-segment style pass afterwards.
        parts = self._parts
        if parts is None:
            names = (*ROLES, "axis", "title")
            parts = self._parts = {name: self.get_component_rich_style(f"chart--{name}") for name in names}
        base = self.rich_style
        styles = {name: base + style for name, style in parts.items()}
        title = Text(self.title, style=parts["title"])
        labels = [s for s in self.series if s.label]
        for s in labels:
            title.append("  ● ", style=Style(color=s.color) if s.color else parts[s.role])
            title.append(s.label or "", style=parts["axis"])
        return ChartRender(title, self.series, width, height, styles, title_base=base, x_label=self.x_label)

    def render_line(self, y: int) -> Strip:
        # Line API: the chart is drawn into strips once per change and each line is then
        # handed out as is (a Rich renderable went through a console render every refresh).
        width, height = self.content_size
        if self._strips is None or self._strips_size != (width, height):
            lines = self.chart(width, height).lines(self.app.console) if width > 0 and height > 0 else []
            strips = []
            for line in lines:
                strip = Strip(line)
                strips.append(strip if strip.cell_length == width else strip.adjust_cell_length(width))
            self._strips = strips
            self._strips_size = (width, height)
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(width, self.rich_style)
