"""One process's log on screen: ANSI colours kept, follow mode, search, error jump.

The toolong approach: a :class:`LogView` keeps the raw lines in a bounded list (the
scrollback cap; the full log stays on disk) and turns only the lines on screen into
styled strips (``Text.from_ansi``), cached by absolute line number. Ingesting a batch
is a list extend plus one refresh, so the pane keeps up with any realistic log rate.
"""

from __future__ import annotations

import re

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from vlmrl_tui.watch import DEFAULT_SCROLLBACK, strip_ansi
from vlmrl_tui.panes.table import set_virtual_size_quietly, update_scrollbars

# A line that starts a Python traceback, or reports an error.
TRACEBACK_RE = re.compile(r"Traceback \(most recent call last\)")
ERROR_RE = re.compile(
    r"Traceback \(most recent call last\)|\b(?:ERROR|CRITICAL|FATAL)\b|^\s*\w*(?:Error|Exception)\b[:(]"
    r"|\bexited with code [1-9]|\bkilled\b|Killed",
)
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1a\x1c-\x1f\x7f]")


def smart_case(query: str) -> bool:
    """Case-sensitive only if the query has an upper-case letter (like vim's smartcase)."""
    return any(c.isupper() for c in query)


class LogView(ScrollView, can_focus=True, inherit_bindings=False):
    """A bounded, colour-preserving view of one process's log."""

    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False, id="logs.up"),
        Binding("down", "cursor(1)", "Down", show=False, id="logs.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="logs.pageup"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="logs.pagedown"),
        Binding("left", "scroll_left", "Left", show=False, id="logs.left"),
        Binding("right", "scroll_right", "Right", show=False, id="logs.right"),
        Binding("home", "top", "Top", show=False, id="logs.top"),
        Binding("end", "follow", "Follow", show=False, id="logs.end"),
        Binding("f", "toggle_follow", "Follow", id="logs.follow"),
        Binding("slash", "search", "Search", key_display="/", id="logs.search"),
        Binding("n", "next_match", "Next", id="logs.next"),
        Binding("N", "previous_match", "Prev", key_display="N", id="logs.previous"),
        Binding("e", "last_error", "Last error", id="logs.error"),
        Binding("y", "copy_line", "Copy line", id="logs.copy"),
        Binding("escape", "clear", "Clear", show=False, id="logs.clear"),
    ]

    DEFAULT_CSS = """
    LogView {
        background: $surface;
        color: $text;
        overflow-x: auto;
        overflow-y: hidden;  /* while following: see watch_follow */
        scrollbar-gutter: stable;
        .logview--cursor { background: $accent 35%; }
        .logview--match { background: $warning 70%; color: $background; text-style: bold; }
    }
    """
    COMPONENT_CLASSES = {"logview--cursor", "logview--match"}

    follow: reactive[bool] = reactive(True, repaint=False)
    """Stay at the newest line as lines arrive."""

    class StateChanged(Message):
        """Follow flag, pending count, cursor or search state changed (for the status line)."""

        def __init__(self, view: "LogView") -> None:
            super().__init__()
            self.view = view

    class SearchRequested(Message):
        """The user pressed / in this view."""

        def __init__(self, view: "LogView") -> None:
            super().__init__()
            self.view = view

    def __init__(self, proc: str, max_lines: int = DEFAULT_SCROLLBACK, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.proc = proc
        self.max_lines = max(1, max_lines)
        self._lines: list[str] = []
        self._first = 0  # absolute number of self._lines[0]
        self._total = 0  # lines ever received, including those dropped or skipped
        self._width = 0
        self._strips: LRUCache[tuple[int, str, bool], Strip] = LRUCache(2048)
        self._cropped: LRUCache[tuple[int, str, bool, int, int], Strip] = LRUCache(512)
        self.cursor: int | None = None  # absolute number of the selected line
        self.pending = 0  # lines received while not following
        self.query_text = ""
        self.match_count: int | None = None
        self._frame_style: Style | None = None
        self._frame_width = 0
        self._shift = 0  # lines dropped from the top while not following, not yet applied

    # ---- data -------------------------------------------------------------------------
    @property
    def line_count(self) -> int:
        """Lines held in memory (at most ``max_lines``)."""
        return len(self._lines)

    @property
    def total_lines(self) -> int:
        """Lines received since the view started, including dropped ones."""
        return self._total

    @property
    def first_line(self) -> int:
        """Absolute number of the oldest line still held."""
        return self._first

    def line(self, absolute: int) -> str | None:
        """The raw line with this absolute number, if still held."""
        idx = absolute - self._first
        return self._lines[idx] if 0 <= idx < len(self._lines) else None

    def plain_line(self, absolute: int) -> str | None:
        """The text of a line without escape codes."""
        raw = self.line(absolute)
        return None if raw is None else strip_ansi(raw)

    def lines_held(self) -> list[str]:
        """A copy of the raw lines held (oldest first)."""
        return list(self._lines)

    def write_lines(self, lines: list[str], skipped: int = 0) -> None:
        """Append a batch of raw lines (``skipped`` older ones were never sent).

        A list extend and at most one refresh, whatever the batch size; a view in a hidden
        tab only stores the lines and catches up when it is shown.
        """
        if not lines and not skipped:
            return
        old_first = self._first
        self._lines.extend(lines)
        self._total += skipped + len(lines)
        excess = len(self._lines) - self.max_lines
        if excess > 0:
            del self._lines[:excess]
        self._first = self._total - len(self._lines)
        if lines:
            self._width = max(self._width, max(map(len, lines)))
        if not self.follow:
            self.pending += skipped + len(lines)
            self._shift += self._first - old_first
        on_screen = self.is_mounted and self.is_on_screen
        self._set_virtual_size(Size(self._width, len(self._lines)), on_screen)
        if on_screen:
            self._catch_up()
        if not self.follow:
            self.post_message(self.StateChanged(self))

    def _catch_up(self) -> None:
        """Bring the view up to date with the lines held (on screen only)."""
        if self.follow:
            self._scroll_to_end()
        elif self._shift:
            # Lines left the top: keep the same lines on screen while they exist.
            self.scroll_to(y=max(0, self.scroll_y - self._shift), animate=False, immediate=True)
            if self.cursor is not None and self.cursor < self._first:
                self.cursor = self._first
        self._shift = 0
        self.refresh()

    def on_show(self) -> None:
        update_scrollbars(self, self.virtual_size)
        self._catch_up()

    def _set_virtual_size(self, size: Size, on_screen: bool = True) -> None:
        """Set the scrollable size without laying out the screen (on every batch, even in
        a hidden tab, a layout would re-arrange the whole screen)."""
        set_virtual_size_quietly(self, size, on_screen)

    def clear(self) -> None:
        """Forget every line held (the file on disk is untouched)."""
        self._lines.clear()
        self._first = self._total
        self._strips.clear()
        self._cropped.clear()
        self.cursor = None
        self._set_virtual_size(Size(self._width, 0), self.is_mounted and self.is_on_screen)
        self.refresh()

    # ---- rendering --------------------------------------------------------------------
    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()
        self._cropped.clear()

    def render_lines(self, crop: Region) -> list[Strip]:
        # rich_style walks the ancestors for their backgrounds: once per frame, not per row.
        self._frame_style = self.rich_style
        self._frame_width = self.scrollable_content_region.width
        try:
            return super().render_lines(crop)
        finally:
            self._frame_style = None

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        base = self._frame_style
        if base is None:  # called outside render_lines (tests, tools)
            base = self.rich_style
            width = self.scrollable_content_region.width
        else:
            width = self._frame_width
        idx = scroll_y + y
        if idx >= len(self._lines) or idx < 0:
            return Strip.blank(width, base)
        absolute = self._first + idx
        key = (absolute, self.query_text, absolute == self.cursor)
        view_key = (*key, scroll_x, width)
        cropped = self._cropped.get(view_key)
        if cropped is None:
            strip = self._strips.get(key)
            if strip is None:
                strip = self._render_strip(self._lines[idx], key[1], key[2], base)
                self._strips[key] = strip
            # The same Strip object frame after frame lets Textual reuse its own caches.
            cropped = self._cropped[view_key] = strip.crop_extend(scroll_x, scroll_x + width, base)
        return cropped

    def _render_strip(self, raw: str, query: str, is_cursor: bool, base: Style) -> Strip:
        if "\t" in raw:
            raw = raw.expandtabs()
        if _CONTROL_RE.search(raw):
            raw = _CONTROL_RE.sub("", raw)
        text = Text.from_ansi(raw, no_wrap=True, end="")
        if is_cursor:
            base = base + Style(bgcolor=self.get_component_rich_style("logview--cursor").bgcolor)
        if query:
            text.highlight_words(
                [query], self.get_component_rich_style("logview--match"), case_sensitive=smart_case(query)
            )
        # Text.render leaves span-less text unstyled: put the widget's style under every segment.
        segments = Segment.apply_style(text.render(self.app.console), style=base)
        return Strip(list(segments), text.cell_len)

    # ---- scrolling / cursor -----------------------------------------------------------
    @property
    def _view_height(self) -> int:
        return max(1, self.scrollable_content_region.height)

    def _scroll_to_end(self) -> None:
        self.scroll_to(y=self.max_scroll_y, animate=False, immediate=True)

    def on_mount(self) -> None:
        if self.follow:
            self.call_after_refresh(self._scroll_to_end)

    def on_resize(self) -> None:
        if self.follow:
            self._scroll_to_end()

    @property
    def allow_vertical_scroll(self) -> bool:
        """The wheel scrolls even while the scrollbar is hidden (following)."""
        return self.is_scrollable and self.virtual_size.height > self.scrollable_content_region.height

    def watch_follow(self, follow: bool) -> None:
        # The scrollbar shows only while paused: following, its thumb would move (and be
        # repainted) with every batch for no information.
        self.styles.overflow_y = "hidden" if follow else "auto"
        if follow:
            self.pending = 0
            self._shift = 0
            self.cursor = None
            self._scroll_to_end()
            self.refresh()
        if self.is_mounted:
            self.post_message(self.StateChanged(self))

    def _show_line(self, absolute: int, center: bool = False) -> None:
        """Scroll so that the line is on screen."""
        idx = absolute - self._first
        height = self._view_height
        top = round(self.scroll_y)
        if center:
            target = max(0, idx - height // 2)
        elif idx < top:
            target = idx
        elif idx >= top + height:
            target = idx - height + 1
        else:
            return
        self.scroll_to(y=target, animate=False, immediate=True)

    def move_cursor(self, absolute: int, center: bool = False) -> None:
        """Select a line (stops following) and bring it on screen."""
        if not self._lines:
            return
        absolute = min(max(absolute, self._first), self._first + len(self._lines) - 1)
        self.follow = False
        self.cursor = absolute
        self._show_line(absolute, center=center)
        self.refresh()
        self.post_message(self.StateChanged(self))

    def _cursor_or_bottom(self) -> int:
        if self.cursor is not None:
            return self.cursor
        bottom = min(len(self._lines) - 1, round(self.scroll_y) + self._view_height - 1)
        return self._first + max(0, bottom)

    def action_cursor(self, delta: int) -> None:
        if self.cursor is None:
            self.move_cursor(self._cursor_or_bottom())
        else:
            self.move_cursor(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self._cursor_or_bottom() + direction * self._view_height)

    def action_top(self) -> None:
        self.move_cursor(self._first)

    def action_follow(self) -> None:
        self.follow = True

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        self.follow = False

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        if not self.follow and self.scroll_y >= self.max_scroll_y and self.cursor is None:
            self.follow = True

    def on_click(self, event: events.Click) -> None:
        idx = round(self.scroll_y) + event.y
        if 0 <= idx < len(self._lines):
            self.move_cursor(self._first + idx)

    def action_clear(self) -> None:
        if self.query_text:
            self.set_query("")
        elif self.cursor is not None:
            self.cursor = None
            self.refresh()
            self.post_message(self.StateChanged(self))

    # ---- search -----------------------------------------------------------------------
    def _matcher(self, query: str):
        if smart_case(query):
            return lambda line: query in strip_ansi(line)
        low = query.lower()
        return lambda line: low in strip_ansi(line).lower()

    def set_query(self, query: str) -> None:
        """Highlight ``query`` and count its matches among the lines held."""
        self.query_text = query
        if query:
            match = self._matcher(query)
            self.match_count = sum(1 for ln in self._lines if match(ln))
        else:
            self.match_count = None
        self.refresh()
        self.post_message(self.StateChanged(self))

    def find(self, direction: int, start: int | None = None) -> int | None:
        """Absolute number of the next (1) or previous (-1) matching line after ``start``, wrapping.

        ``start`` defaults to the cursor, or to just past the newest line.
        """
        if not self.query_text or not self._lines:
            return None
        match = self._matcher(self.query_text)
        n = len(self._lines)
        if start is None:
            start = self.cursor if self.cursor is not None else self._first + n
        idx = min(max(start - self._first, -1), n)
        if direction > 0:
            order = [*range(idx + 1, n), *range(0, min(idx + 1, n))]
        else:
            order = [*range(min(idx - 1, n - 1), -1, -1), *range(n - 1, max(idx - 1, -1), -1)]
        for i in order:
            if match(self._lines[i]):
                return self._first + i
        return None

    def match_index(self, absolute: int) -> int:
        """1-based rank of a matching line among all matches held."""
        match = self._matcher(self.query_text)
        return sum(1 for ln in self._lines[: absolute - self._first + 1] if match(ln))

    def search(self, query: str) -> int | None:
        """Set the query and go to the match nearest the cursor (or the newest one)."""
        self.set_query(query)
        if self.cursor is None:
            hit = self.find(-1, self._first + len(self._lines))
        else:
            hit = self.find(1, self.cursor - 1)
        if hit is not None:
            self.move_cursor(hit, center=True)
        return hit

    def action_search(self) -> None:
        self.post_message(self.SearchRequested(self))

    def action_next_match(self) -> None:
        hit = self.find(1)
        if hit is None:
            self.app.bell()
        else:
            self.move_cursor(hit, center=True)

    def action_previous_match(self) -> None:
        hit = self.find(-1)
        if hit is None:
            self.app.bell()
        else:
            self.move_cursor(hit, center=True)

    # ---- errors, copy -----------------------------------------------------------------
    def last_error(self) -> int | None:
        """Absolute number of the start of the last traceback or error line held."""
        for i in range(len(self._lines) - 1, -1, -1):
            plain = strip_ansi(self._lines[i])
            if not ERROR_RE.search(plain):
                continue
            if TRACEBACK_RE.search(plain):
                return self._first + i
            # An exception line closing a traceback: go to the traceback's first line.
            j = i - 1
            while j >= 0 and i - j < 1000:
                prev = strip_ansi(self._lines[j])
                if TRACEBACK_RE.search(prev):
                    return self._first + j
                if prev and not prev[:1].isspace() and not prev.startswith(("During handling", "The above")):
                    break
                j -= 1
            return self._first + i
        return None

    def action_last_error(self) -> None:
        hit = self.last_error()
        if hit is None:
            self.notify(f"No error or traceback in the last {len(self._lines):,} lines of {self.proc}.")
        else:
            self.move_cursor(hit, center=True)

    def action_copy_line(self) -> None:
        if self.cursor is None:
            self.notify("Select a line first (↑/↓ or click).", severity="warning")
            return
        text = self.plain_line(self.cursor) or ""
        self.app.copy_to_clipboard(text)
        self.notify(f"Copied line {self.cursor + 1:,} of {self.proc}.")
