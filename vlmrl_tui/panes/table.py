"""A lean table for rows that change every second: fixed-width columns, a cursor, Line API.

Textual's DataTable renders every cell through the console on each refresh (a full
redraw of a 32-row table cost ~100 ms here); this table renders one strip per visible
row, caches it by the row's content, and repaints only rows that changed. Columns have
fixed widths, so a value that grows never re-lays out the screen.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cell = Union[str, Text]


def update_scrollbars(view: ScrollView, size: Size) -> None:
    """Refresh ``view``'s scrollbars for a virtual size set without a layout.

    Textual has no public call for this: ``ScrollView._scroll_update`` is what a layout
    ends with. Checked with Textual 8.2 (pyproject pins ``textual>=8.2,<9``).
    """
    view._scroll_update(size)


def set_virtual_size_quietly(view: ScrollView, size: Size, on_screen: bool) -> None:
    """Set ``view``'s scrollable size without laying out the screen.

    ``virtual_size`` is a layout reactive: assigning it re-arranges the whole screen. For a
    view whose own size never depends on it, it is set quietly; a view on screen refreshes
    its scrollbars (which ask for a layout themselves if one appears or goes), a hidden one
    does so when it is shown.
    """
    if size == view.virtual_size:
        return
    view.set_reactive(ScrollView.virtual_size, size)
    if on_screen and view.container_size:
        update_scrollbars(view, size)


def _cell_key(cell: Cell) -> Any:
    return (cell.plain, str(cell.style), tuple(cell.spans)) if isinstance(cell, Text) else cell


class RowTable(ScrollView, can_focus=True):
    """A header line and keyed rows of fixed-width cells; the header stays on top."""

    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
    ]
    DEFAULT_CSS = """
    RowTable {
        height: 1fr;
        overflow-x: hidden;
        overflow-y: auto;
        .rowtable--header { text-style: bold; color: $text; background: $panel; }
        .rowtable--cursor { background: $panel-lighten-1; }
        &:focus .rowtable--cursor { background: $accent 40%; }
    }
    """
    COMPONENT_CLASSES = {"rowtable--header", "rowtable--cursor"}

    class Highlighted(Message):
        """The cursor moved to another row."""

        def __init__(self, table: "RowTable", key: str, row: int) -> None:
            super().__init__()
            self.table = table
            self.key = key
            self.row = row

        @property
        def control(self) -> "RowTable":
            return self.table

    def __init__(self, columns: Sequence[str], widths: Sequence[int], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.columns = tuple(columns)
        self.widths = tuple(widths)
        self._keys: list[str] = []
        self._cells: dict[str, list[Cell]] = {}
        self.cursor_row = 0
        self._strips: LRUCache[tuple[Any, ...], Strip] = LRUCache(256)
        self._frame_style: Style | None = None
        self._resize()

    # ---- data -------------------------------------------------------------------------
    @property
    def rows(self) -> list[str]:
        return list(self._keys)

    @property
    def row_count(self) -> int:
        return len(self._keys)

    def get_row_index(self, key: str) -> int:
        return self._keys.index(key)

    def get_cell(self, key: str, column: str) -> Cell:
        return self._cells[key][self.columns.index(column)]

    def add_row(self, *cells: Cell, key: str) -> None:
        if key not in self._cells:
            self._keys.append(key)
        self._cells[key] = list(cells)
        self._resize()
        self.refresh()

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        """Replace every row at once (one resize, one refresh); the cursor keeps its index."""
        self._keys = [key for key, _ in rows]
        self._cells = {key: list(cells) for key, cells in rows}
        self.cursor_row = min(self.cursor_row, max(0, len(self._keys) - 1))
        self._resize()
        self.refresh()

    def update_cell(self, key: str, column: str, value: Cell) -> None:
        self._cells[key][self.columns.index(column)] = value
        self._refresh_row(self._keys.index(key))

    def clear(self) -> None:
        """Remove every row (the cursor goes back to the top)."""
        self._keys.clear()
        self._cells.clear()
        self.cursor_row = 0
        self._resize()
        self.scroll_to(y=0, animate=False, immediate=True)
        self.refresh()

    def _resize(self) -> None:
        size = Size(sum(self.widths) + len(self.widths), len(self._keys) + 1)
        if size == self.virtual_size:
            return
        height = self.styles.height
        if height is None or height.is_auto:
            self.virtual_size = size  # the table's own height follows its rows: lay out
        else:  # a fixed or fractional height does not change with the rows
            set_virtual_size_quietly(self, size, self.is_mounted)

    # ---- cursor -----------------------------------------------------------------------
    def move_cursor(self, row: int) -> None:
        """Put the cursor on ``row`` (clamped), scroll it into view, announce it."""
        if not self._keys:
            return
        row = min(max(row, 0), len(self._keys) - 1)
        old, self.cursor_row = self.cursor_row, row
        visible = max(1, self.scrollable_content_region.height - 1)
        top = round(self.scroll_y)
        if row < top:
            self.scroll_to(y=row, animate=False, immediate=True)
        elif row >= top + visible:
            self.scroll_to(y=row - visible + 1, animate=False, immediate=True)
        self._refresh_row(old)
        self._refresh_row(row)
        self.post_message(self.Highlighted(self, self._keys[row], row))

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + direction * max(1, self.scrollable_content_region.height - 1))

    def on_click(self, event: events.Click) -> None:
        if event.y >= 1:
            self.move_cursor(round(self.scroll_y) + event.y - 1)

    # ---- rendering --------------------------------------------------------------------
    def _refresh_row(self, row: int) -> None:
        y = row - round(self.scroll_y) + 1
        if 1 <= y < self.size.height:
            self.refresh(Region(0, y, self.size.width, 1))

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()  # theme or focus changed the colours

    def _line(self, cells: Sequence[Cell], style: Style, width: int) -> Strip:
        line = Text(no_wrap=True, end="")
        for cell, w in zip(cells, self.widths):
            if isinstance(cell, Text) and cell.spans:  # several styles: let Rich cut it
                text = cell.copy()
                text.truncate(w, overflow="ellipsis", pad=True)
                line.append_text(text)
                line.append(" ")
                continue
            plain = cell.plain if isinstance(cell, Text) else str(cell)
            if cell_len(plain) > w:
                plain = set_cell_size(plain, w - 1) + "…"
            line.append(set_cell_size(plain, w) + " ", cell.style if isinstance(cell, Text) else None)
        base = (self._frame_style or self.rich_style) + style
        segments = Segment.apply_style(line.render(self.app.console), style=base)
        return Strip(list(segments), line.cell_len).crop_extend(0, width, base)

    def render_lines(self, crop: Region) -> list[Strip]:
        # rich_style walks the ancestors for their backgrounds: once per frame, not per row.
        self._frame_style = self.rich_style
        try:
            return super().render_lines(crop)
        finally:
            self._frame_style = None

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:
            cells: Sequence[Cell] = self.columns
            component = "rowtable--header"
        else:
            row = round(self.scroll_y) + y - 1
            if not 0 <= row < len(self._keys):
                return Strip.blank(width, self._frame_style or self.rich_style)
            cells = self._cells[self._keys[row]]
            component = "rowtable--cursor" if row == self.cursor_row else ""
        key = (tuple(_cell_key(c) for c in cells), component, width)
        strip = self._strips.get(key)
        if strip is None:
            style = self.get_component_rich_style(component) if component else Style()
            strip = self._strips[key] = self._line(cells, style, width)
        return strip
