"""Run-directory reader/writer: whole lines, partial-line tolerance, atomic JSON."""

from __future__ import annotations

import json
from pathlib import Path

from backend.rundir import (
    FileTail,
    JsonlTail,
    JsonlWriter,
    RunDirectory,
    failure_lines,
    last_lines,
    read_json,
    write_json_atomic,
)


def test_jsonl_tail_waits_for_the_newline(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    tail = JsonlTail(p)
    assert tail.read() == []  # missing file is fine
    with open(p, "w") as f:
        f.write(json.dumps({"step": 1}) + "\n" + '{"step": 2, "rew')
    assert tail.read() == [{"step": 1}]
    with open(p, "a") as f:
        f.write('ard": 0.5}\n')
    assert tail.read() == [{"step": 2, "reward": 0.5}]
    assert tail.read() == []


def test_malformed_lines_are_counted_not_raised(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\nnot json\n[1,2]\n{"b": 2}\n')
    tail = JsonlTail(p)
    assert tail.read() == [{"a": 1}, {"b": 2}]
    assert tail.bad_lines == 1


def test_file_tail_restarts_when_file_is_replaced(tmp_path: Path) -> None:
    p = tmp_path / "x.log"
    p.write_text("a\nb\nc\n")
    t = FileTail(p)
    assert t.read_lines() == ["a", "b", "c"]
    p.write_text("z\n")
    assert t.read_lines() == ["z"]


def test_writer_flushes_each_line(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    w = JsonlWriter(p)
    w.write({"step": 1, "loss": 0.5})
    # Readable before close: every line is flushed whole.
    assert p.read_text() == '{"step": 1, "loss": 0.5}\n'
    w.close()


def test_atomic_json_and_reader(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path / "run").create()
    write_json_atomic(rd.run_json, {"status": "running"})
    write_json_atomic(rd.run_json, {"status": "done"})
    assert read_json(rd.run_json) == {"status": "done"}
    assert not [p for p in rd.path.iterdir() if p.name.startswith(".run.json")]
    rd.log("server").write_text("one\ntwo\n")
    rd.log("trainer").write_text("three\n")
    assert rd.log_names() == ["server", "trainer"]
    assert FileTail(rd.log("server")).read_lines() == ["one", "two"]
    assert last_lines(rd.log("server"), 1) == ["two"]


def test_latest_checkpoint_needs_complete_marker(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path)
    for step in (5, 10, 15):
        rd.checkpoint(step).mkdir(parents=True)
    (rd.checkpoint(5) / "COMPLETE").touch()
    (rd.checkpoint(10) / "COMPLETE").touch()
    assert rd.latest_checkpoint() == rd.checkpoint(10)


def test_failure_lines_bring_up_the_cause_a_launcher_summary_buries(tmp_path: Path) -> None:
    log = tmp_path / "trainer.log"
    summary = ["Traceback (most recent call last):", '  File "torchrun", line 8, in <module>',
               "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
               "  rank      : 1 (local_rank: 1)", "  exitcode  : -6 (pid: 12801)  (SIGABRT)"]
    noise = [f"step {i}/6 reward=0.2" for i in range(40)]
    log.write_text("\n".join(["step 0", "terminate called after throwing an instance of 'gloo::IoException'",
                               "  what():  [pair.cc:553] Connection closed by peer [127.0.0.1]:4242"]
                              + noise + summary) + "\n")
    lines = failure_lines(log, 5)
    assert lines[:3] == ["terminate called after throwing an instance of 'gloo::IoException'",
                         "  what():  [pair.cc:553] Connection closed by peer [127.0.0.1]:4242", "..."]
    assert lines[3:] == summary
    # a tail that already says why is left alone
    log.write_text("\n".join(["ValueError: earlier, handled"] + noise + ["KeyError: 'model'"]) + "\n")
    assert failure_lines(log, 2) == [noise[-1], "KeyError: 'model'"]
    assert failure_lines(tmp_path / "missing.log", 5) == []
