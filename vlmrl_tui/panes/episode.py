"""The rollouts pane's episode filmstrip, as Rich renderables built from a record.

An episode (a record with ``turns``) is shown as a header (its reward, end and
achievements, and a strip of its turns: number, action, reward) above the selected turn's
frame beside its reply, action and reward parts. Everything here is a pure function of
the record and the turn shown; the pane (rollouts.py) owns the turn keys, loads the
frames and draws the result. The first section is shared with the pane's table and
single-turn view (value formatters, the field grid, image links, the completion cell, the
single-turn detail, and ``Prerendered``, which replays each detail part rendered once): it
lives here because rollouts.py imports this module, not the other way round.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from backend.records import RolloutRecord, TurnRecord
from vlmrl_tui.watch import display_path

_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")
STRIP_MAX_TURNS = 60  # turns the episode strip shows around the selected one
ROW_MAX_TURNS = 40  # actions the table row of an episode lists
_PARSED_STYLES = {"exact": "green", "fuzzy": "yellow", "none": "red"}
_TURN_INFO_SHOWN = ("action", "parsed", "unlocked")  # turn info keys that have their own row


# ---- shared with the table and the single-turn view -------------------------------------
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


def signed_text(v: float | None, fmt: str = "+.3f") -> Text:
    """``v`` green when above 0, red below, yellow at 0; a dim ``n/a`` when unknown."""
    if v is None:
        return Text("n/a", style="dim")
    style = "green" if v > 0 else "red" if v < 0 else "yellow"
    return Text(format(v, fmt), style=style)


def one_line(text: str) -> str:
    """``text`` on one line: newlines shown as ``⏎``, other control characters as ``�``."""
    return _CONTROL_RE.sub("�", text.replace("\n", " ⏎ "))


def reward_text(reward: float, parts: dict[str, float]) -> Text:
    """``+1.000  (achievements 1.00, format 0.00)``."""
    out = signed_text(reward, ".3f")
    if parts:
        out.append("  (" + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + ")", style="dim")
    return out


def field_grid() -> Table:
    """A detail grid: bold field names beside values folded to the width left."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    return grid


def png_link(path: Path) -> Text:
    """An image's (resolved) path, shortened for display, as a link to the file."""
    return Text(display_path(path), style=Style(link=path.as_uri(), underline=True))


def turn_action(t: TurnRecord) -> str:
    """What a turn did, in one word: the environment's parsed ``action`` when its info has
    one, else the first word of the reply (``?`` for an empty reply)."""
    action = t.info.get("action")
    if isinstance(action, str) and action:
        return action
    words = t.completion.split()
    return one_line(words[0][:16]) if words else "?"


def completion_cell(r: RolloutRecord) -> str:
    """The table's completion column: the reply, or an episode's turns and actions."""
    if not r.turns:
        return one_line(r.completion)
    n = len(r.turns)
    actions = " ".join(turn_action(t) for t in r.turns[:ROW_MAX_TURNS])
    return f"{n} turn{'s' if n != 1 else ''}: {actions}" + (" …" if n > ROW_MAX_TURNS else "")


def rollout_detail(r: RolloutRecord, paths: list[Path]) -> Table:
    """Beside a single-turn rollout's image: ids, reward and parts, advantage, prompt,
    completion, answer, its images' (resolved) ``paths``."""
    grid = field_grid()
    grid.add_row("rollout", f"step {r.step} · #{r.index} · group {r.group} · {r.example_id}")
    grid.add_row("reward", reward_text(r.reward, r.reward_parts))
    grid.add_row("advantage", signed_text(r.advantage))
    grid.add_row("prompt", Text(r.prompt))
    grid.add_row("completion", Text(r.completion, style="bold"))
    if r.answer is not None:
        grid.add_row("answer", str(r.answer))
    for path in paths:
        grid.add_row("png", png_link(path))
    return grid


# ---- the episode header -----------------------------------------------------------------
def episode_strip(r: RolloutRecord, turn: int) -> Text:
    """One cell per turn (``3·do+1``), coloured by its reward, the selected turn reversed;
    a long episode shows the ``STRIP_MAX_TURNS`` turns around the selected one."""
    n = len(r.turns)
    start = min(max(0, turn - STRIP_MAX_TURNS // 2), max(0, n - STRIP_MAX_TURNS))
    end = min(n, start + STRIP_MAX_TURNS)
    out = Text(no_wrap=False, overflow="fold")
    if start:
        out.append(f"…{start} ", style="dim")
    for k in range(start, end):
        t = r.turns[k]
        cell = f"{k + 1}·{turn_action(t)}" + (f"{t.reward:+.2f}".rstrip("0").rstrip(".") if t.reward else "")
        style = "green" if t.reward > 0 else "red" if t.reward < 0 else ""
        if k == turn:
            style = f"bold reverse {style}".strip()
        out.append(cell, style=style)
        if k + 1 < end:
            out.append(" ")
    if end < n:
        out.append(f" {n - end}…", style="dim")
    return out


def summary_flags(summary: dict[str, float]) -> tuple[dict[str, list[str]], dict[str, int], dict[str, float]]:
    """An episode summary split for display: ``prefix/name`` keys of 0/1 values grouped by
    prefix (the names at 1.0, and how many names each prefix has), and the other values."""
    on: dict[str, list[str]] = {}
    totals: dict[str, int] = {}
    rest: dict[str, float] = {}
    for key, v in summary.items():
        prefix, sep, name = key.partition("/")
        if sep and v in (0.0, 1.0):
            totals[prefix] = totals.get(prefix, 0) + 1
            names = on.setdefault(prefix, [])
            if v == 1.0:
                names.append(name)
        else:
            rest[key] = v
    return on, totals, rest


def episode_header(r: RolloutRecord, k: int) -> Table:
    """An episode's header: ids, reward and parts, advantage, end, flags from its
    summary (``achievement/<name>`` at 1.0), its other summary values, the turn strip."""
    grid = field_grid()
    grid.add_row("episode", f"step {r.step} · #{r.index} · group {r.group} · {r.example_id}")
    grid.add_row("reward", reward_text(r.reward, r.reward_parts))
    grid.add_row("advantage", signed_text(r.advantage))
    n = len(r.turns)
    grid.add_row("end", Text(f"{r.end_reason or 'n/a'} · {n} turn{'s' if n != 1 else ''}"))
    on, totals, rest = summary_flags(r.summary)
    for prefix, names in on.items():
        line = Text(", ".join(names), style="bold green") if names else Text("none", style="dim")
        line.append(f"  ({len(names)}/{totals[prefix]})", style="dim")
        grid.add_row(prefix, line)
    if rest:
        grid.add_row("summary", Text(" · ".join(f"{key} {v:g}" for key, v in rest.items()), style="dim"))
    grid.add_row("turns", episode_strip(r, k))
    return grid


# ---- the turn view ----------------------------------------------------------------------
def turn_detail(r: RolloutRecord, k: int) -> Table:
    """Beside a turn's frame: turn k/N, the parsed action, reward and parts, what it
    unlocked, the rest of its info, and the reply."""
    t = r.turns[k]
    grid = field_grid()
    turn = Text(f"{k + 1}/{len(r.turns)}", style="bold")
    turn.append("  , . prev/next  < > first/last", style="dim")
    grid.add_row("turn", turn)
    action = t.info.get("action")
    if action is not None:
        line = Text(str(action), style="bold")
        parsed = t.info.get("parsed")
        if parsed is not None:
            line.append(f" ({parsed})", style=_PARSED_STYLES.get(str(parsed), "dim"))
        grid.add_row("action", line)
    grid.add_row("reward", reward_text(t.reward, t.reward_parts))
    unlocked = t.info.get("unlocked")
    if unlocked:
        names = unlocked if isinstance(unlocked, list) else [unlocked]
        grid.add_row("unlocked", Text(", ".join(map(str, names)), style="bold green"))
    rest = {key: v for key, v in t.info.items() if key not in _TURN_INFO_SHOWN}
    if rest:
        grid.add_row("info", Text(" · ".join(f"{key} {v}" for key, v in rest.items())))
    grid.add_row("reply", Text(t.completion, style="bold"))
    return grid


def turn_view(frames: list[Any], r: RolloutRecord, k: int) -> Table:
    """Turn ``k``'s frames (renderables, one per image) beside its ``turn_detail``."""
    view = Table.grid(padding=(0, 2))
    view.add_column(no_wrap=True)
    view.add_column()
    view.add_row(Group(*(frames or [Text("(no frame in this turn)", style="dim")])), turn_detail(r, k))
    return view


def turn_extra(r: RolloutRecord, k: int, paths: list[Path]) -> Table:
    """Below a turn: how the reply ended, its frames' (resolved) ``paths``, the episode's
    first prompt."""
    t = r.turns[k]
    grid = field_grid()
    tokens = f"{t.completion_tokens} tokens" + (f" · prompt {t.prompt_tokens}" if t.prompt_tokens else "")
    grid.add_row("finish", Text(f"{t.finish_reason or 'n/a'} · {tokens}", style="dim"))
    for path in paths:
        grid.add_row("png", png_link(path))
    grid.add_row("prompt", Text(r.prompt, style="dim"))
    return grid
