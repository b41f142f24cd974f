"""How a metric series is shown: smoothing, x axis (step or wall time) and zoom.

Pure functions over (xs, ys) lists, shared by the metrics pane and the run comparison; no
Textual here. :func:`view` applies the options in a fixed order: zoom (last N steps), then
smoothing (so the zoomed window's first point is not dragged by points outside it), then
the x mapping to wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

# EMA weight of the previous smoothed value. TensorBoard's slider defaults to 0.6 and is
# commonly set to 0.9-0.99 for RL rewards; at 0.9 a step's value counts with weight ~0.1 and
# the line follows a trend over ~10 steps, which matches the summary's 10-step reward and
# hides the per-step noise of a small batch without lagging far behind a real change.
SMOOTH_WEIGHT = 0.9
ZOOM_STEPS: tuple[int | None, ...] = (None, 1000, 200, 50, 20)  # what the zoom key cycles through (None: all)


@dataclass(frozen=True)
class ChartOptions:
    """What the user asked to see: EMA smoothing, x by step or wall time, the last N steps."""

    smooth: bool = False
    x_axis: Literal["step", "time"] = "step"
    last_n: int | None = None

    @property
    def by_time(self) -> bool:
        """Whether x is wall time (seconds since the run's first step) rather than the step."""
        return self.x_axis == "time"

    def describe(self) -> str:
        """The options that differ from the default, e.g. ``EMA · by time · last 200`` ('' if none)."""
        parts = []
        if self.smooth:
            parts.append("EMA")
        if self.by_time:
            parts.append("by time")
        if self.last_n is not None:
            parts.append(f"last {self.last_n}")
        return " · ".join(parts)


def ema(ys: Sequence[float], weight: float = SMOOTH_WEIGHT) -> list[float]:
    """Exponential moving average, debiased as TensorBoard does: dividing by ``1 - weight**n``
    keeps the first points at the data's level instead of dragging them towards 0.
    Non-finite values are passed through and do not enter the average."""
    # A comparison smooths 3 runs x 6 series of thousands of steps in one redraw, so the
    # loop is kept lean: weight**n as a running product, and no division once it is gone.
    out: list[float] = []
    append = out.append
    isfinite = math.isfinite
    keep = 1 - weight
    last = 0.0
    left = 1.0  # weight**n: the share of the zero start still in `last`
    values = iter(ys)
    for y in values:
        if not isfinite(y):
            append(y)
            continue
        last = last * weight + keep * y
        left *= weight
        append(last / (1 - left) if left < 1 else y)
        if 1 - left == 1.0:
            break
    for y in values:  # debiasing divides by 1.0 from here on
        if isfinite(y):
            last = last * weight + keep * y
            append(last)
        else:
            append(y)
    return out


def zoom(xs: Sequence[float], ys: Sequence[float], last_n: int | None,
         last_x: float | None = None) -> tuple[list[float], list[float]]:
    """The points with ``x > last_x - last_n`` (all of them when ``last_n`` is None);
    ``last_x`` defaults to the series' own last x (give the run's last step to cut a sparse
    series, e.g. evaluations, at the same place as the metrics)."""
    if last_n is None or not xs:
        return list(xs), list(ys)
    cut = (max(xs) if last_x is None else last_x) - last_n
    keep = [(x, y) for x, y in zip(xs, ys) if x > cut]
    return [x for x, _ in keep], [y for _, y in keep]


def view(xs: Sequence[float], ys: Sequence[float], opts: ChartOptions,
         times: Mapping[float, float] | None = None, t0: float | None = None,
         *, last_x: float | None = None) -> tuple[list[float], list[float]]:
    """(xs, ys) as ``opts`` shows them: last ``last_n`` steps (before ``last_x``, see
    :func:`zoom`), EMA when ``smooth``, and with ``x_axis == "time"`` x as seconds since ``t0``
    (default: the first time in ``times``) from ``times`` (step -> Unix time); points whose
    step has no time are dropped."""
    vx, vy = zoom(xs, ys, opts.last_n, last_x)
    if opts.smooth:
        vy = ema(vy)
    if opts.by_time:
        times = times or {}
        if t0 is None:
            t0 = min(times.values(), default=0.0)
        pairs = [(times[x] - t0, y) for x, y in zip(vx, vy) if x in times]
        vx, vy = [x for x, _ in pairs], [y for _, y in pairs]
    return vx, vy


def next_zoom(current: int | None, span: float | None = None) -> int | None:
    """The zoom after ``current`` in :data:`ZOOM_STEPS`, back to all steps after the last.
    With ``span`` (the steps the run covers so far), zooms that would cut nothing are skipped."""
    i = ZOOM_STEPS.index(current) if current in ZOOM_STEPS else 0
    for k in range(1, len(ZOOM_STEPS) + 1):
        n = ZOOM_STEPS[(i + k) % len(ZOOM_STEPS)]
        if n is None or span is None or n < span:
            return n
    return None


def short_duration(seconds: float) -> str:
    """An x label on the time axis: ``0s``, ``45s``, ``5m``, ``5m 30s``, ``1h 02m``."""
    s = max(0, int(round(seconds))) if math.isfinite(seconds) else 0
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, rest = divmod(s, 60)
        return f"{m}m" if rest == 0 else f"{m}m {rest:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
