"""The run feed (no Textual): bounded batches of what is new in a run directory."""

from __future__ import annotations

import json
from pathlib import Path

from backend.records import EvalRecord, MetricRecord, RunInfo
from backend.rundir import RunDirectory, write_json_atomic
from backend.records import proc_sort_key
from vlmrl_tui.watch import LogChunk, RunFeed, clean_line, strip_ansi


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def test_poll_returns_only_what_is_new(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path).create()
    feed = RunFeed(tmp_path)
    assert not feed.poll()  # nothing yet, nothing raised
    _append(rd.log("server"), "a\nb\n")
    _append(rd.metrics, json.dumps({"step": 1, "loss": 0.5}) + "\n")
    write_json_atomic(rd.run_json, RunInfo(name="r", status="running").to_json())
    first = feed.poll()
    assert first.new_procs == ["server"]
    assert first.logs == {"server": LogChunk(["a", "b"], 0)}
    assert first.metrics == [MetricRecord.from_json({"step": 1, "loss": 0.5})]
    assert first.info == RunInfo(name="r", status="running")
    second = feed.poll()
    assert not second and second.info is None  # run.json unchanged: not re-sent
    _append(rd.log("server"), "c\npartial")
    assert feed.poll().logs["server"].lines == ["c"]  # the partial line waits for its newline
    _append(rd.log("server"), " line\n")
    assert feed.poll().logs["server"].lines == ["partial line"]


def test_a_burst_larger_than_the_scrollback_is_cut_and_counted(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path).create()
    _append(rd.log("trainer"), "".join(f"line {i}\n" for i in range(25_000)))
    chunk = RunFeed(tmp_path, scrollback=1000).poll().logs["trainer"]
    assert chunk.lines[0] == "line 24000" and chunk.lines[-1] == "line 24999"
    assert len(chunk.lines) == 1000 and chunk.skipped == 24_000 and len(chunk) == 25_000


def test_a_big_existing_log_is_entered_near_its_end(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path).create()
    _append(rd.log("server"), "".join(f"{i:07d}\n" for i in range(100_000)))  # 800 kB
    feed = RunFeed(tmp_path, scrollback=50, attach_tail_bytes=4000)
    chunk = feed.poll().logs["server"]
    assert chunk.lines[-1] == "0099999"
    assert len(chunk.lines) == 50 and all(len(x) == 7 for x in chunk.lines)  # no half line at the start
    assert chunk.skipped < 500  # never read the other 795 kB
    _append(rd.log("server"), "next\n")
    assert feed.poll().logs["server"].lines == ["next"]


def test_carriage_returns_and_huge_lines_are_cleaned(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path).create()
    _append(rd.log("trainer"), "10%\r50%\r100% done\n" + "x" * 10_000 + "\n")
    lines = RunFeed(tmp_path, max_line_chars=100).poll().logs["trainer"].lines
    assert lines[0] == "100% done"
    assert lines[1].startswith("x" * 100) and len(lines[1]) < 110
    assert clean_line("a\rb") == "b"


def test_run_json_is_resent_when_it_changes(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path).create()
    feed = RunFeed(tmp_path)
    write_json_atomic(rd.run_json, RunInfo(name="r", status="starting").to_json())
    assert feed.poll().info == RunInfo(name="r", status="starting")
    write_json_atomic(rd.run_json, RunInfo(name="r", status="running", processes={}).to_json())
    assert feed.poll().info == RunInfo(name="r", status="running", processes={})


def test_helpers() -> None:
    assert strip_ansi("\x1b[32mINFO\x1b[0m ok \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\") == "INFO ok link"
    assert sorted(["zeta", "trainer", "supervisor", "server", "prepare"], key=proc_sort_key) == [
        "prepare", "server", "trainer", "supervisor", "zeta"]


def test_eval_lines_are_tailed_like_metrics(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path).create()
    feed = RunFeed(tmp_path)
    assert feed.poll().evals == []  # no eval.jsonl yet: nothing raised
    first = {"step": 10, "accuracy": 0.5, "n": 32, "time": 1.0}
    second = {"step": 20, "accuracy": 0.8125, "n": 32, "time": 2.0, "std": 0.39, "parts": {"correct": 0.8125}}
    second_line = json.dumps(second) + "\n"
    _append(rd.eval, json.dumps(first) + "\n" + json.dumps({"note": "not an eval line"}) + "\n"
            + second_line[:15])
    update = feed.poll()
    assert update and update.evals == [EvalRecord.from_json(first)]  # the partial line waits
    assert not feed.poll()
    _append(rd.eval, second_line[15:])
    assert feed.poll().evals == [EvalRecord(20, 0.8125, 32, 2.0, 0.39, {"correct": 0.8125})]
    assert feed.new_evals() == []
    # A resume rewrites the file shorter (dropped lines after its step): it is read again.
    rd.eval.write_text(json.dumps(first) + "\n", encoding="utf-8")
    assert feed.poll().evals == [EvalRecord.from_json(first)]
