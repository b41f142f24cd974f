"""What the run comparison reads and shows: the compared runs and their reader, config
differences, per-run colours, the series as plotted and a cache of them.

No Textual here (:mod:`vlmrl_tui.panes.compare` draws); the tests call these directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

from backend.records import EvalRecord, MetricRecord, RunInfo
from backend.rundir import RunDirectory
from vlmrl_tui.panes.chartview import ChartOptions, view
from vlmrl_tui.panes.metricstore import MAX_POINTS, EvalStore, MetricsStore, downsample
from vlmrl_tui.watch import RunFeed

# One colour per run: the Okabe-Ito palette (told apart with the common colour-vision
# deficiencies, readable on dark and light themes), its black swapped for grey. A ninth run
# reuses the first colour.
PALETTE: tuple[str, ...] = (
    "#56B4E9",  # sky blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#F0E442",  # yellow
    "#0072B2",  # blue
    "#999999",  # grey
)

# Resolved-config keys that differ between any two runs and say nothing about the experiment
# (ports picked free at launch, where and under which name the run was written): left out of
# the differences. The names are backend.config's.
RUN_IDENTITY_KEYS: frozenset[str] = frozenset({
    "inference.port", "trainer.args.sync_port", "trainer.args.run_name", "trainer.args.output_dir",
})
MISSING = "—"  # a key one run's config does not have


def color_of(index: int) -> str:
    """The colour of the run at ``index`` in the comparison."""
    return PALETTE[index % len(PALETTE)]


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"args": {"seed": 1}}}`` -> ``{"trainer.args.seed": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_diff(configs: Sequence[Mapping[str, Any] | None],
                ignore: frozenset[str] = RUN_IDENTITY_KEYS) -> dict[str, list[Any]]:
    """Dotted keys whose values differ between the runs' configs, with each run's value
    (:data:`MISSING` where that config lacks the key, None for a run without a config).

    Runs without a config (None) take no part in the comparison: nothing is known to differ
    about them. Keys come in the order of the first config that has them.
    """
    flat = [flatten_config(c) if c is not None else None for c in configs]
    known = [f for f in flat if f is not None]
    keys: dict[str, None] = {}
    for f in known:
        keys.update(dict.fromkeys(f))
    out: dict[str, list[Any]] = {}
    for key in keys:
        if key in ignore:
            continue
        values = [f.get(key, MISSING) for f in known]
        if any(v != values[0] or type(v) is not type(values[0]) for v in values[1:]):
            out[key] = [f.get(key, MISSING) if f is not None else None for f in flat]
    return out


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key as its shortest suffix that no other of ``keys`` ends with
    (``trainer.args.learning_rate`` -> ``learning_rate``)."""
    out: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != key and (o == label or o.endswith("." + label)) for o in keys):
                break
        out[key] = label
    return out


def format_config_value(v: Any) -> str:
    """A config value as the legend shows it (``3e-04`` -> ``0.0003``, strings unquoted)."""
    if v is None:
        return "?"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_config_value(x) for x in v) + "]"
    return str(v)


@dataclass(frozen=True)
class ConfigRead:
    """A run's ``config.toml``: its values, or why there are none (``note``)."""

    values: dict[str, Any] | None
    note: str | None = None


def read_config(run_dir: Path) -> ConfigRead:
    """``run_dir/config.toml`` read; a missing or unreadable file gives a note, never an error."""
    from backend.config import read_toml  # pydantic: only when a comparison is opened
    from backend.errors import ConfigError

    path = RunDirectory(run_dir).config
    if not path.exists():
        return ConfigRead(None, "no config.toml")
    try:
        return ConfigRead(read_toml(path))
    except ConfigError as e:
        return ConfigRead(None, f"config.toml unreadable ({e.message})")


def run_dir_note(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a run directory (None when it looks like one)."""
    rd = RunDirectory(run_dir)
    if not rd.path.is_dir():
        return "no such directory"
    if not any(p.exists() for p in (rd.run_json, rd.metrics, rd.config, rd.logs_dir)):
        return "not a run directory (no run.json, metrics.jsonl, config.toml or logs/)"
    return None


def last_of(ys: Sequence[float]) -> float | None:
    """The newest value of a series (None for no points)."""
    return ys[-1] if ys else None


class IdentityCache:
    """Results kept until their source is another object or their parameters change.

    The source is compared with ``is`` and kept alive by the cache (so its id cannot be
    reused); parameters with ``==`` (a store's version, the chart options). A run that got no
    new step costs no work at a redraw.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[object, Hashable, Any]] = {}

    def get(self, key: Hashable, source: object, params: Hashable, compute: Callable[[], Any]) -> Any:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is source and entry[1] == params:
            return entry[2]
        value = compute()
        self._entries[key] = (source, params, value)
        return value

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class CompareRun:
    """One run of the comparison and everything read of it so far."""

    path: Path
    name: str
    color: str
    store: MetricsStore
    evals: EvalStore
    info: RunInfo | None = None
    info_error: str | None = None
    config: ConfigRead | None = None  # None until read
    note: str | None = None  # why the directory does not look like a run


@dataclass
class RunDelta:
    """What is new in one run of the comparison (``index`` into :attr:`ComparePane.runs`)."""

    index: int
    metrics: list[MetricRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    info: RunInfo | None = None
    info_error: str | None = None
    config: ConfigRead | None = None  # only when config.toml changed (or at the first poll)
    note: str | None = None
    note_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.metrics or self.evals or self.info is not None or self.info_error
                    or self.config is not None or self.note_changed)


class RunsReader:
    """(worker thread) Incremental reader of the compared runs: metrics, evals and run.json of
    every run but the primary (the app's feed reads those), config.toml of all of them."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._feeds = {i: RunFeed(p) for i, p in enumerate(self.paths) if i > 0}
        self._config_stamps: dict[int, tuple[int, int] | None] = {}
        self._notes: dict[int, str | None] = {}

    @staticmethod
    def _config_stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = RunDirectory(path).config.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def poll(self) -> list[RunDelta]:
        out = []
        for i, path in enumerate(self.paths):
            delta = RunDelta(i)
            stamp = self._config_stamp(path)
            if i not in self._config_stamps or stamp != self._config_stamps[i]:
                self._config_stamps[i] = stamp
                delta.config = read_config(path)
            feed = self._feeds.get(i)
            if feed is not None:
                note = run_dir_note(path)
                if i not in self._notes or note != self._notes[i]:
                    self._notes[i] = delta.note = note
                    delta.note_changed = True
                delta.info, delta.info_error = feed.run_info()
                delta.metrics = feed.new_metrics()
                delta.evals = feed.new_evals()
            if delta:
                out.append(delta)
        return out


def points_for(width: int) -> int:
    """Points per series for a chart ``width`` cells wide: one per braille dot column (two a
    cell). Bucket means at that density draw a continuous line, and the chart joins ~100
    points per run instead of thousands: a redraw of 3 runs x 6 plots stays in budget, where
    each run's noise envelope (what the single-run plots keep) would hide the others anyway."""
    return max(32, 2 * width) if width > 0 else MAX_POINTS


def plotted(run: CompareRun, key: str, opts: ChartOptions, last_x: float | None,
            n: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """A run's series as drawn: ``opts`` applied (zoom to ``last_x``, smoothing, time since the
    run's first step), at most ``n`` points."""
    times = run.store.times() if opts.x_axis == "time" else None
    return downsample(*view(*run.store.series(key), opts, times, last_x=last_x), n)


def plotted_evals(run: CompareRun, opts: ChartOptions, last_x: float | None,
                  n: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """A run's evaluations as drawn, on the same time axis as its metrics."""
    times = t0 = None
    on_time_axis = opts.x_axis == "time"
    if on_time_axis:
        times, t0 = run.evals.times(), min(run.store.times().values(), default=None)
    return downsample(*view(*run.evals.series(), opts, times, t0, last_x=last_x), n)
