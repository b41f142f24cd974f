"""Messages that carry data from worker threads to the panes (and between panes).

Workers never touch widgets: they build one of these and ``post_message`` it (which is
thread-safe); the handlers run on the UI thread.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message

from vlmrl_tui.watch import ProcSample, RunUpdate


class RunUpdated(Message):
    """One batch of what is new in the run directory (logs, metrics, rollouts, run.json)."""

    def __init__(self, update: RunUpdate) -> None:
        super().__init__()
        self.update = update


class ProcStatsUpdated(Message):
    """CPU%, RSS and health latency for each process, sampled by the stats worker."""

    def __init__(self, samples: dict[str, ProcSample]) -> None:
        super().__init__()
        self.samples = samples


class GpuUpdated(Message):
    """A new snapshot from the GPU sampler (or the reason there is none)."""

    def __init__(self, snapshot: Any) -> None:
        super().__init__()
        self.snapshot = snapshot


class CommandDone(Message):
    """The supervisor answered (or failed to answer) a control command."""

    def __init__(self, cmd: str, proc: str | None, reply: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.cmd = cmd
        self.proc = proc
        self.reply = reply
        self.error = error


class ProcessSelected(Message):
    """The user moved the Processes pane's cursor to another process."""

    def __init__(self, proc: str) -> None:
        super().__init__()
        self.proc = proc
