"""A call on a daemon thread, as a future."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable


def in_thread(fn: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any) -> cf.Future[Any]:
    """Run ``fn(*args, **kwargs)`` on a daemon thread and return its future.

    Daemon, not an executor's worker: a call stuck on a dead peer (a collective, an HTTP
    request in flight) must never block the interpreter's exit.
    """
    fut: cf.Future[Any] = cf.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            fut.set_exception(e)

    threading.Thread(target=run, name=name or getattr(fn, "__name__", "task"), daemon=True).start()
    return fut
