"""GPUs pane: utilisation, memory, temperature and power per GPU, and our children's share.

Data comes from :mod:`vlmrl_tui.gpu` (guarded NVML, immutable snapshots with N/A
fields), sampled on its daemon thread; the callback works out which GPU memory belongs
to the server's and the trainer's process trees and posts one message. Without NVML
(no driver, no GPU) the pane says so in one line and everything else keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from vlmrl_tui.gpu import NA, GpuSampler, GpuSystemSnapshot, Nvml


@dataclass(frozen=True)
class GpuReport:
    """A snapshot plus the GPU memory of each of our processes, per GPU index."""

    snapshot: GpuSystemSnapshot
    ours: Mapping[int, Mapping[str, float]] = field(default_factory=dict)  # gpu -> proc -> bytes


def _tree(pid: int) -> set[int]:
    try:
        import psutil

        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except Exception:
        return {pid}


def build_report(snapshot: GpuSystemSnapshot, pids: Mapping[str, int]) -> GpuReport:
    """Attribute each GPU's per-process memory to our named processes (with descendants)."""
    if not snapshot.gpus or not pids:
        return GpuReport(snapshot)
    trees = {name: _tree(pid) for name, pid in pids.items()}
    ours: dict[int, dict[str, float]] = {}
    for gpu in snapshot.gpus:
        per: dict[str, float] = {}
        for name, tree in trees.items():
            used = [p.used_memory for p in gpu.processes if p.pid in tree]
            if used:
                per[name] = sum(0 if u is NA else u for u in used)
        if per:
            ours[gpu.index] = per
    return GpuReport(snapshot, ours)


def _gib(v: Any) -> str:
    if v is NA or v is None or (isinstance(v, float) and math.isnan(v)):
        return "N/A"
    return f"{v / 2**30:.1f}"


def _num(v: Any, fmt: str, unit: str = "") -> str:
    if v is NA or v is None or (isinstance(v, float) and math.isnan(v)):
        return "N/A"
    return format(v, fmt) + unit


def _bar(pct: Any, width: int = 5) -> Text:
    if pct is NA or pct is None or (isinstance(pct, float) and math.isnan(pct)):
        return Text("N/A", style="dim")
    filled = max(0, min(width, round(pct / 100 * width)))
    style = "green" if pct < 50 else "yellow" if pct < 85 else "red"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim") + Text(f"{pct:4.0f}%")


def short_name(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100 80GB``."""
    words = name.replace("NVIDIA ", "").replace("GeForce ", "").split()
    return " ".join(words[:2]) if words else "?"


def render_report(report: GpuReport | None) -> Table | Text:
    """The pane's content: one row per GPU, or one plain sentence when there are none."""
    if report is None:
        return Text("sampling GPUs…", style="dim")
    snap = report.snapshot
    if snap.error is not None:
        return Text.assemble(
            ("No GPU stats: ", "bold"), snap.error, ".\n",
            ("Training on CPU works; this pane fills in on a machine with an NVIDIA driver.", "dim"),
        )
    if not snap.gpus:
        return Text("NVML works but reports no GPU.", style="bold")
    table = Table(box=None, padding=(0, 1, 0, 0), header_style="bold", pad_edge=False)
    table.add_column("gpu", no_wrap=True, overflow="ellipsis", max_width=12)
    table.add_column("util", no_wrap=True)
    table.add_column("mem GiB", no_wrap=True)
    table.add_column("°C", justify="right", no_wrap=True)
    table.add_column("W", justify="right", no_wrap=True)
    table.add_column("ours GiB", no_wrap=True)
    for g in snap.gpus:
        mem = f"{_gib(g.memory_used)}/{_gib(g.memory_total)}"
        power = _num(g.power_w, ".0f")
        if g.power_limit_w is not NA:
            power += "/" + _num(g.power_limit_w, ".0f")
        ours = report.ours.get(g.index, {})
        ours_text = " ".join(f"{name[0]}:{_gib(b)}" for name, b in sorted(ours.items())) or "—"
        table.add_row(
            f"{g.index} {short_name(g.name)}", _bar(g.utilization), mem,
            _num(g.temperature, ".0f"), power, ours_text,
        )
    return table


class GpusPane(Static):
    """Shows the latest :class:`GpuReport`."""

    DEFAULT_CSS = "GpusPane { height: auto; padding: 0 1; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(render_report(None), id=id)
        self.report: GpuReport | None = None

    def show(self, report: GpuReport) -> None:
        old = self.report
        self.report = report
        # The pane's height follows the GPU count: lay out again only when that changes.
        same_shape = old is not None and len(old.snapshot.gpus) == len(report.snapshot.gpus) \
            and (old.snapshot.error is None) == (report.snapshot.error is None)
        self.update(render_report(report), layout=not same_shape)


def start_sampler(
    post: Callable[[GpuReport], None],
    pids: Callable[[], Mapping[str, int]],
    nvml: Nvml | None = None,
    interval_s: float = 2.0,
) -> GpuSampler:
    """Start sampling on the sampler's daemon thread; ``post`` gets each report (thread-safe)."""

    def on_snapshot(snapshot: GpuSystemSnapshot) -> None:
        post(build_report(snapshot, pids()))

    return GpuSampler(interval_s=interval_s, nvml=nvml, on_snapshot=on_snapshot).start()
