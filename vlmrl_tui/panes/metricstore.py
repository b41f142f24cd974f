"""The run's metric and eval records as the views hold them, and how their numbers read.

:class:`MetricsStore` keeps ``metrics.jsonl`` records by step and answers per-key series,
the latest record, seconds per step and the 10-step reward (mean and best so far). A live
run appends steps in order, so all of that is kept up to date incrementally: an update costs
the new records, not the run's length (a 10k-step run must not make every step O(n)). A
resumed run that logs steps again is the rare case that rebuilds.

No Textual here; the metrics pane, the run summary and tests share one store.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Mapping

from backend import records as r
from backend.records import EvalRecord, MetricRecord

# Series longer than this are bucketed (bucket means) before plotting; a plot asks for less
# when it is narrower (MetricPlot.max_points: 2 points per dot column). Drawing costs per
# point and a live run redraws every 2 s, so a 10k-step run must not mean 10k points.
MAX_POINTS = 600
REWARD_WINDOW = 10  # steps in the summary's mean reward (and in each window of its best)


def format_value(v: float | None) -> str:
    """A metric value in at most ~8 characters."""
    if v is None:
        return "—"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def format_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s`` or ``12s``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def downsample(xs: list[float], ys: list[float], n: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most ``n`` points: the first and the last as they are (the axis spans the data),
    means of equal buckets between them."""
    if len(xs) <= n:
        return xs, ys
    end = len(xs) - 1
    size = math.ceil((end - 1) / max(1, n - 2))
    ox, oy = [xs[0]], [ys[0]]
    for i in range(1, end, size):
        bx, by = xs[i : min(i + size, end)], ys[i : min(i + size, end)]
        ox.append(sum(bx) / len(bx))
        oy.append(sum(by) / len(by))
    ox.append(xs[-1])
    oy.append(ys[-1])
    return ox, oy


class RewardWindow:
    """Mean reward of the last ``size`` steps, and the best such mean so far.

    Windows are taken over steps that have a reward, in step order. Until ``size`` steps
    exist the best is the current (partial) mean; after that only full windows count, so one
    lucky first step does not stay "best" for the rest of the run.
    """

    def __init__(self, size: int = REWARD_WINDOW) -> None:
        self.size = size
        self._last: deque[float] = deque(maxlen=size)
        self._best_full: float | None = None

    def push(self, reward: float) -> None:
        self._last.append(reward)
        if len(self._last) == self.size:
            m = self.mean
            assert m is not None
            self._best_full = m if self._best_full is None else max(self._best_full, m)

    @property
    def mean(self) -> float | None:
        # summed afresh over at most `size` values: no drift from a running sum
        return sum(self._last) / len(self._last) if self._last else None

    @property
    def best(self) -> float | None:
        return self._best_full if self._best_full is not None else self.mean


class MetricsStore:
    """Metric records by step (a resumed run that logs a step again replaces it)."""

    def __init__(self) -> None:
        self.records: dict[int, MetricRecord] = {}
        self.version = 0  # bumped by every add that took a record (views compare it)
        self._steps: list[int] = []  # sorted
        self._series: dict[str, tuple[list[float], list[float]]] = {}  # by key, grown as steps arrive
        self._times: dict[float, float] | None = None
        self.reward = RewardWindow()

    def add(self, records: Iterable[MetricRecord | Mapping[str, Any]]) -> int:
        """Take records; returns how many were metric records."""
        new: list[MetricRecord] = []
        in_order = True
        for item in records:
            rec = MetricRecord.from_json(item)
            if rec is None:
                continue
            last = new[-1].step if new else (self._steps[-1] if self._steps else None)
            in_order = in_order and (last is None or rec.step > last)
            self.records[rec.step] = rec
            new.append(rec)
        if not new:
            return 0
        self.version += 1
        if in_order:  # a live run: extend what is known, in place (a copy would cost the run's length)
            self._steps.extend(rec.step for rec in new)
            for key, (xs, ys) in self._series.items():
                nx, ny = self._points(new, key)
                xs.extend(nx)
                ys.extend(ny)
            if self._times is not None:
                self._times.update(zip(*self._points(new, r.TIME)))
            for rec in new:
                self._push_reward(rec)
        else:  # steps logged again (a resume) or out of order: rebuild once
            self._steps = sorted(self.records)
            self._series.clear()
            self._times = None
            self.reward = RewardWindow()
            for step in self._steps:
                self._push_reward(self.records[step])
        return len(new)

    def _push_reward(self, rec: MetricRecord) -> None:
        v = rec.finite(r.REWARD_MEAN)
        if v is not None:
            self.reward.push(v)

    @staticmethod
    def _points(recs: Iterable[MetricRecord], key: str) -> tuple[list[float], list[float]]:
        xs: list[float] = []
        ys: list[float] = []
        for rec in recs:
            v = rec.finite(key)
            if v is not None:
                xs.append(float(rec.step))
                ys.append(v)
        return xs, ys

    @property
    def steps(self) -> list[int]:
        """The steps held, in order (a shared list that grows as steps arrive: do not modify)."""
        return self._steps

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) where ``key`` has a finite value (shared lists that grow as steps
        arrive: do not modify; copy what must stay as it is)."""
        cached = self._series.get(key)
        if cached is None:
            cached = self._series[key] = self._points((self.records[s] for s in self._steps), key)
        return cached

    def times(self) -> dict[float, float]:
        """Step -> Unix time the step ended (:data:`~backend.records.TIME`), for a time axis."""
        if self._times is None:
            self._times = dict(zip(*self.series(r.TIME)))  # then kept up to date by add
        return self._times

    def latest(self) -> MetricRecord | None:
        return self.records[self._steps[-1]] if self._steps else None

    def step_seconds(self, window: int = 20) -> float | None:
        """Recent seconds per step (from ``step_s``, else from ``time`` stamps)."""
        steps = self._steps[-window:]
        vals = [v for s in steps if (v := self.records[s].finite(r.STEP_S)) is not None]
        if vals:
            return sum(vals) / len(vals)
        times = [(s, t) for s in steps if (t := self.records[s].finite(r.TIME)) is not None]
        if len(times) >= 2 and times[-1][0] > times[0][0]:
            return (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])
        return None

    def eta_seconds(self, max_steps: int | None) -> float | None:
        """Seconds to ``max_steps`` at the recent pace (None while unknown)."""
        latest, per = self.latest(), self.step_seconds()
        if latest is None or not max_steps or per is None:
            return None
        return max(0, max_steps - latest.step) * per


class EvalStore:
    """Eval records by step (a resumed run that evaluates a step again replaces it)."""

    def __init__(self) -> None:
        self.records: dict[int, EvalRecord] = {}
        self._series: tuple[list[float], list[float]] | None = None

    def __bool__(self) -> bool:
        return bool(self.records)

    def add(self, records: Iterable[EvalRecord | Mapping[str, Any]]) -> int:
        n = 0
        for item in records:
            rec = item if isinstance(item, EvalRecord) else EvalRecord.from_json(item)
            if rec is None:
                continue
            self.records[rec.step] = rec
            n += 1
        if n:
            self._series = None
        return n

    def series(self) -> tuple[list[float], list[float]]:
        """(steps, mean rewards) of the finite evaluations (shared lists: do not modify)."""
        if self._series is None:
            pairs = [(float(s), self.records[s].accuracy) for s in sorted(self.records)]
            pairs = [(x, y) for x, y in pairs if math.isfinite(y)]
            self._series = ([x for x, _ in pairs], [y for _, y in pairs])
        return self._series

    def times(self) -> dict[float, float]:
        """Step -> Unix time of each evaluation (for a time axis; a record without one has 0)."""
        return {float(s): e.time for s, e in self.records.items() if math.isfinite(e.time) and e.time > 0}

    def latest(self) -> EvalRecord | None:
        return self.records[max(self.records)] if self.records else None
