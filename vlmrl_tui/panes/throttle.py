"""Redraw at most once per interval, and only what is on screen: the panes' throttle."""

from __future__ import annotations

from typing import Callable

from textual.widget import Widget


class Throttle:
    """Calls ``flush`` at most once per ``interval_s`` after :meth:`mark`, on a timer of
    ``widget``. ``flush`` is the pane's own: it checks :attr:`dirty` (and whether it is on
    screen, else it redraws on show) and clears it with :meth:`take`."""

    def __init__(self, widget: Widget, interval_s: float, flush: Callable[[], None]) -> None:
        self.widget = widget
        self.interval_s = interval_s
        self.flush = flush
        self.dirty = False  # something changed that is not drawn yet
        self._pending = False  # a timer is set

    def mark(self) -> None:
        """Something changed: draw it within ``interval_s``."""
        self.dirty = True
        if not self._pending and self.widget.is_mounted:
            self._pending = True
            self.widget.set_timer(self.interval_s, self._fire)

    def take(self, force: bool = False) -> bool:
        """Whether to draw now (dirty, or ``force``, and the widget on screen or ``force``);
        if so, it is no longer dirty."""
        if not (self.dirty or force) or not (force or self.widget.is_on_screen):
            return False
        self.dirty = False
        return True

    def _fire(self) -> None:
        self._pending = False
        self.flush()
