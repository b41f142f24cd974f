"""The rollouts pane's data: the store of rollouts by step, and the triage over it.

Triage answers "which rollouts are worth a look": a filter (:func:`parse_filter`, grammar
in :data:`FILTER_HELP`) by reward range, reward part and text; groups whose rollouts all
got the same reward (:func:`group_variance`: their advantages are 0, no learning signal);
and the spread of completion lengths (:func:`length_histogram`, drawn by :func:`spark`).
Everything here is pure (no widgets, no app), so the whole-run scan can run in a worker thread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from backend.records import DropRecord, RolloutRecord, rollout_position

FILTER_HELP = (
    "Terms, all must hold: 0.5..1  <0.2  >=1  =0 (reward) · format=0  accuracy>0.5  correct=0..0.5 (a reward "
    "part; adv, len: advantage, completion characters) · /regex/ · any other word or \"quoted phrase\": text in "
    "the prompt or completion (case-insensitive unless it has a capital) · !term: not. Enter applies, Esc clears."
)
SPARK = "▁▂▃▄▅▆▇█"
EQUAL_REWARD = 1e-9  # rewards this close count as equal (they are sums of floats)
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE_RE = re.compile(rf"^(?P<lo>{_NUM})?\.\.(?P<hi>{_NUM})?$")
_CMP_RE = re.compile(r"^(?P<key>[A-Za-z_][\w./-]*)?(?P<op><=|>=|==|!=|<|>|=)(?P<val>.+)$")
_TOKEN_RE = re.compile(r"""(!?)(?:"([^"]*)"|'([^']*)'|(/(?:[^/\\]|\\.)+/)(?=\s|$)|(\S+))""")

Test = Callable[[RolloutRecord], bool]


class FilterError(ValueError):
    """A filter the grammar cannot read; the message names the term."""


# ---- the store ---------------------------------------------------------------------------
def parse_records(raws: Iterable[dict[str, Any]]) -> list[RolloutRecord]:
    """The rollouts among raw ``rollouts.jsonl`` objects (drops and unreadable lines left out)."""
    out = []
    for raw in raws:
        try:
            out.append(RolloutRecord.from_json(raw))
        except ValueError:
            continue
    return out


class RolloutStore:
    """Rollouts grouped by step (the newest ``max_steps`` steps are kept).

    Records stay as the feed parsed them until a step is shown: a live run brings hundreds
    a second and most are never looked at. A record for a (step, index) already held
    replaces it: a resumed trainer rewrites rollouts.jsonl, and the feed reads it again.
    Each step has a version, bumped when it changes, so a parse made elsewhere (the
    whole-run scan's thread) is kept only if the step did not change meanwhile.
    """

    def __init__(self, max_steps: int = 1000) -> None:
        self.max_steps = max_steps
        self._raw: dict[int, dict[int, dict[str, Any]]] = {}  # step -> index -> record
        self._parsed: dict[int, list[RolloutRecord]] = {}  # steps converted since they last changed
        self._variance: dict[int, tuple[frozenset[int], int]] = {}
        self._version: dict[int, int] = {}
        self._steps: list[int] | None = None

    def add(self, records: Iterable[dict[str, Any]]) -> set[int]:
        """Add raw records; return the steps that changed."""
        changed: set[int] = set()
        for rec in records:
            pos = rollout_position(rec)
            if pos is None:
                continue
            step, index = pos
            by_index = self._raw.get(step)
            if by_index is None:
                by_index = self._raw[step] = {}
                self._steps = None
            by_index[index] = rec
            changed.add(step)
        for step in changed:
            self._forget(step)
            self._version[step] = self._version.get(step, 0) + 1
        if len(self._raw) > self.max_steps:
            for step in self.steps[: len(self._raw) - self.max_steps]:
                del self._raw[step]
                self._forget(step)
                self._version.pop(step, None)
            self._steps = None
        return changed

    def _forget(self, step: int) -> None:
        self._parsed.pop(step, None)
        self._variance.pop(step, None)

    @property
    def steps(self) -> list[int]:
        if self._steps is None:
            self._steps = sorted(self._raw)
        return self._steps

    def __contains__(self, step: int) -> bool:
        return step in self._raw

    def records(self, step: int) -> list[RolloutRecord]:
        """The rollouts of ``step`` in index order (records that cannot be read are left out)."""
        parsed = self._parsed.get(step)
        if parsed is None:
            raw = self._raw.get(step, {})
            parsed = self._parsed[step] = parse_records(raw[i] for i in sorted(raw))
        return parsed

    def variance(self, step: int) -> tuple[frozenset[int], int]:
        """:func:`group_variance` of ``step`` (kept until the step changes)."""
        v = self._variance.get(step)
        if v is None:
            v = self._variance[step] = group_variance(self.records(step))
        return v

    def drops(self, step: int) -> list[DropRecord]:
        """The examples left out of ``step``, in index order."""
        raw = self._raw.get(step, {})
        return [d for i in sorted(raw) if (d := DropRecord.from_json(raw[i])) is not None]

    def rows(self, step: int, sort: str) -> list[RolloutRecord]:
        return sort_rows(self.records(step), sort)

    def snapshot(self) -> list[tuple[int, int, list[dict[str, Any]] | list[RolloutRecord]]]:
        """(step, version, records) of every step, for a scan in another thread: the parsed
        records where the step has them, else its raw objects in index order (which the
        scan parses; :meth:`install` keeps that parse)."""
        out: list[tuple[int, int, list[Any]]] = []
        for step in self.steps:
            parsed = self._parsed.get(step)
            raw = self._raw[step]
            out.append((step, self._version[step], parsed if parsed is not None else [raw[i] for i in sorted(raw)]))
        return out

    def install(self, step: int, version: int, records: list[RolloutRecord]) -> None:
        """Keep ``records`` parsed elsewhere as ``step``'s, if the step is still at ``version``."""
        if self._version.get(step) == version and step not in self._parsed:
            self._parsed[step] = records


def sort_rows(records: Iterable[RolloutRecord], sort: str) -> list[RolloutRecord]:
    """``records`` in ``sort`` order: ``index`` (as given), ``best`` or ``worst`` reward first."""
    rows = list(records)
    if sort == "best":
        rows.sort(key=lambda r: (-r.reward, -(r.advantage or 0.0), r.step, r.index))
    elif sort == "worst":
        rows.sort(key=lambda r: (r.reward, r.advantage or 0.0, r.step, r.index))
    return rows


# ---- groups and lengths ------------------------------------------------------------------
def group_variance(records: Iterable[RolloutRecord]) -> tuple[frozenset[int], int]:
    """(the groups whose rollouts all got the same reward, how many groups there are).

    A group of one rollout counts as zero-variance too: its advantage is 0 as well.
    """
    spans: dict[int, tuple[float, float]] = {}
    for r in records:
        lo, hi = spans.get(r.group, (r.reward, r.reward))
        spans[r.group] = (min(lo, r.reward), max(hi, r.reward))
    return frozenset(g for g, (lo, hi) in spans.items() if hi - lo <= EQUAL_REWARD), len(spans)


def completion_chars(r: RolloutRecord) -> int:
    """Characters the model wrote: the completion, or an episode's replies together."""
    return sum(len(t.completion) for t in r.turns) if r.turns else len(r.completion)


def completion_lengths(records: Sequence[RolloutRecord]) -> tuple[list[int], str]:
    """The completion length of each record and its unit: ``tok`` when every record counts
    its tokens (an episode's turns do), else ``ch`` (characters)."""
    if records and all(r.turns for r in records):
        return [sum(t.completion_tokens for t in r.turns) for r in records], "tok"
    return [completion_chars(r) for r in records], "ch"


def length_histogram(lengths: Sequence[int], bins: int = 12) -> tuple[int, int, list[int]]:
    """(shortest, longest, counts): ``lengths`` counted in at most ``bins`` bins of equal
    width from the shortest to the longest (one bin per value when they span fewer)."""
    if not lengths:
        return 0, 0, []
    lo, hi = min(lengths), max(lengths)
    n = max(1, min(bins, hi - lo + 1))
    counts = [0] * n
    for x in lengths:
        counts[min(n - 1, (x - lo) * n // (hi - lo + 1))] += 1
    return lo, hi, counts


def spark(counts: Sequence[int]) -> str:
    """One block character per count, as tall as the count is against the largest; 0 is a space."""
    top = max(counts, default=0)
    return "".join(" " if c <= 0 else SPARK[max(0, math.ceil(c / top * len(SPARK)) - 1)] for c in counts)


def histogram_text(records: Sequence[RolloutRecord], bins: int = 12) -> str:
    """``len ch 3▕▁▃█ ▂▏41``: the completion lengths of ``records`` at a glance."""
    lengths, unit = completion_lengths(records)
    if not lengths:
        return ""
    lo, hi, counts = length_histogram(lengths, bins)
    return f"len {unit} {lo}▕{spark(counts)}▏{hi}"


# ---- the filter --------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutFilter:
    """A parsed filter: ``text`` as typed, and one test per term (all must hold)."""

    text: str
    tests: tuple[Test, ...]

    def __call__(self, r: RolloutRecord) -> bool:
        return all(t(r) for t in self.tests)

    def __bool__(self) -> bool:
        return bool(self.tests)


def _number(s: str, term: str) -> float:
    if not re.fullmatch(_NUM, s):
        raise FilterError(f"{term!r}: {s!r} is not a number")
    return float(s)


def _value_test(op: str, val: str, term: str) -> Callable[[float], bool]:
    """A test of one number: ``op`` and ``val`` from ``<=0.5``, ``=0..1``, ``!=1``."""
    m = _RANGE_RE.match(val)
    if m and op in ("=", "==", "!="):
        lo = float(m["lo"]) if m["lo"] else -math.inf
        hi = float(m["hi"]) if m["hi"] else math.inf
        if op == "!=":
            return lambda x: not lo <= x <= hi
        return lambda x: lo <= x <= hi
    v = _number(val, term)
    return {
        "<": lambda x: x < v, "<=": lambda x: x <= v, ">": lambda x: x > v, ">=": lambda x: x >= v,
        "=": lambda x: abs(x - v) <= EQUAL_REWARD, "==": lambda x: abs(x - v) <= EQUAL_REWARD,
        "!=": lambda x: abs(x - v) > EQUAL_REWARD,
    }[op]


def _getter(key: str) -> Callable[[RolloutRecord], float | None]:
    if key == "reward":
        return lambda r: r.reward
    if key in ("adv", "advantage"):
        return lambda r: r.advantage
    if key == "len":
        return lambda r: float(completion_chars(r))
    return lambda r: r.reward_parts.get(key)


def _texts(r: RolloutRecord) -> list[str]:
    return [r.prompt, r.completion, *(t.completion for t in r.turns)]


def _text_test(pattern: re.Pattern[str]) -> Test:
    return lambda r: any(pattern.search(s) for s in _texts(r))


def _term_test(term: str, quoted: bool) -> Test:
    """The test of one term (see :data:`FILTER_HELP`)."""
    if quoted:
        return _text_test(re.compile(re.escape(term), 0 if any(c.isupper() for c in term) else re.IGNORECASE))
    if len(term) > 2 and term.startswith("/") and term.endswith("/"):
        try:
            return _text_test(re.compile(term[1:-1]))
        except re.error as e:
            raise FilterError(f"{term!r}: {e}") from None
    m = _RANGE_RE.match(term)
    if m and (m["lo"] or m["hi"]):
        value = _value_test("=", term, term)
        return lambda r: value(r.reward)
    m = _CMP_RE.match(term)
    if m:
        value = _value_test(m["op"], m["val"], term)
        get = _getter(m["key"] or "reward")

        def test(r: RolloutRecord) -> bool:
            x = get(r)
            return x is not None and value(x)  # a record without that part does not match

        return test
    return _term_test(term, quoted=True)


def parse_filter(text: str) -> RolloutFilter:
    """The filter ``text`` asks for (:data:`FILTER_HELP`); :class:`FilterError` if a term is wrong."""
    tests: list[Test] = []
    pos = 0
    for m in _TOKEN_RE.finditer(text):
        if text[pos:m.start()].strip():
            raise FilterError(f"cannot read {text[pos:m.start()].strip()!r}")
        pos = m.end()
        quoted = m[2] if m[2] is not None else m[3]
        term = quoted if quoted is not None else m[4] or m[5]
        if not term:
            continue
        if term.count('"') % 2 or term.count("'") == 1 and term.startswith("'"):
            raise FilterError(f"{term!r}: unbalanced quote")
        test = _term_test(term, quoted is not None)
        tests.append((lambda r, t=test: not t(r)) if m[1] else test)
    if text[pos:].strip():
        raise FilterError(f"cannot read {text[pos:].strip()!r}")
    return RolloutFilter(text.strip(), tuple(tests))


NO_FILTER = RolloutFilter("", ())


# ---- scanning ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StepScan:
    """One step under a filter: its rollouts, those that match, its group variance."""

    records: list[RolloutRecord]
    hits: list[RolloutRecord]
    zero: frozenset[int]
    groups: int


def scan_step(records: list[RolloutRecord], flt: RolloutFilter) -> StepScan:
    return StepScan(records, [r for r in records if flt(r)] if flt else records, *group_variance(records))


Scanned = dict[int, tuple[int, list[RolloutRecord], StepScan]]  # step -> (version, rollouts, scan)


def scan_snapshot(snapshot: list[tuple[int, int, list[Any]]], flt: RolloutFilter,
                  cancelled: Callable[[], bool]) -> Scanned | None:
    """A :meth:`RolloutStore.snapshot` scanned under ``flt`` (raw steps parsed); None if
    ``cancelled()`` turned true on the way."""
    out: Scanned = {}
    for step, version, items in snapshot:
        if cancelled():
            return None
        records = items if not items or isinstance(items[0], RolloutRecord) else parse_records(items)
        out[step] = (version, records, scan_step(records, flt))
    return out


class RunScan:
    """The whole run under a filter: scanned once in a thread, then kept up to date step by
    step (a live run changes its latest step; rescanning that step alone is cheap)."""

    def __init__(self) -> None:
        self.scans: dict[int, StepScan] | None = None  # None: the scan is in flight
        self.ticket = 0  # which scan is wanted: an older one that lands is dropped
        self.changed: set[int] = set()  # steps changed since the scan's snapshot

    def start(self) -> int:
        self.ticket += 1
        self.scans = None
        self.changed.clear()
        return self.ticket

    def landed(self, ticket: int, steps: Scanned, store: RolloutStore) -> bool:
        """Take a scan's result (its parses kept by ``store``); False if it is not the one wanted."""
        if ticket != self.ticket:
            return False
        for step, (version, records, _) in steps.items():
            store.install(step, version, records)
        self.scans = {step: scan for step, (_, _, scan) in steps.items()}
        return True

    def update(self, store: RolloutStore, flt: RolloutFilter) -> list[RolloutRecord]:
        """Rescan the changed steps, drop the steps the store let go; every hit in step order."""
        scans = self.scans
        if scans is None:
            return []
        for step in self.changed:
            if step in store:
                scans[step] = scan_step(store.records(step), flt)
        self.changed.clear()
        for step in [s for s in scans if s not in store]:
            del scans[step]
        return [r for step in sorted(scans) for r in scans[step].hits]

    def zero_of(self, step: int) -> frozenset[int]:
        scan = (self.scans or {}).get(step)
        return scan.zero if scan is not None else frozenset()

    def totals(self) -> tuple[list[RolloutRecord], int, int]:
        """(every rollout, zero-variance groups, groups) over the run."""
        scans = (self.scans or {}).values()
        return [r for s in scans for r in s.records], sum(len(s.zero) for s in scans), sum(s.groups for s in scans)


def triage_text(records: Sequence[RolloutRecord], hits: Sequence[RolloutRecord], listed: int, filtered: bool,
                zero: int, groups: int, width: int) -> str:
    """The line(s) above the table: how many rollouts match (and are listed), how many
    groups had equal rewards, the completion lengths of the matches; wrapped at ``width``."""
    count = f"{len(hits)} of {len(records)} rollouts match" if filtered else f"{len(records)} rollouts"
    if len(hits) > listed:
        count += f" (first {listed} listed)"
    zero_text = f"zero-variance groups (=) {zero}/{groups} ({zero / groups:.0%})" if groups else ""
    lines: list[str] = []
    for part in filter(None, (count, zero_text, histogram_text(hits))):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return "\n".join(lines)
