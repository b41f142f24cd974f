"""Logging of vlmrl's own processes (server, trainer): one format, set up once."""

from __future__ import annotations

import logging
from typing import TextIO


def setup_logging(stream: TextIO, timestamps: bool) -> None:
    """Send the ``vlmrl`` loggers to ``stream`` at INFO, unless a handler is already there.

    ``timestamps`` adds the wall-clock time (``%H:%M:%S``) to each line.
    """
    root = logging.getLogger("vlmrl")
    if root.handlers:
        return
    h = logging.StreamHandler(stream)
    if timestamps:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.INFO)
    root.propagate = False
