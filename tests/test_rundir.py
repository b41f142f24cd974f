"""Run-directory reader/writer: whole lines, partial-line tolerance, atomic JSON."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from backend.rundir import (
    FileTail,
    JsonlTail,
    JsonlWriter,
    RunDirectory,
    failure_lines,
    last_lines,
    read_json,
    read_jsonl,
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


def test_a_writer_that_cuts_a_killed_writers_partial_line_duplicates_nothing_for_a_tailer(tmp_path: Path) -> None:
    """A writer killed mid-line leaves a fragment; the next JsonlWriter cuts it off before it
    appends. A tailer that already read the whole lines before it gets each record once."""
    p = tmp_path / "m.jsonl"
    tail = JsonlTail(p)
    with JsonlWriter(p) as w:
        w.write({"step": 1})
        w.write({"step": 2})
    with open(p, "a") as f:
        f.write('{"step": 3, "rew')  # killed here
    assert [r["step"] for r in tail.read()] == [1, 2]
    with JsonlWriter(p) as w:  # the resumed run
        assert p.read_text().endswith('{"step": 2}\n')
        w.write({"step": 3})
    assert [r["step"] for r in tail.read()] == [3]
    assert [r["step"] for r in read_jsonl(p)] == [1, 2, 3]


def test_a_line_cut_off_by_a_full_disk_is_taken_back(tmp_path: Path) -> None:
    """A write the disk cannot hold leaves no fragment behind: the next line starts clean."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        p = mnt / "m.jsonl"
        with JsonlWriter(p) as w:
            w.write({"step": 1})
            with pytest.raises(OSError) as err:
                for i in range(10_000):
                    w.write({"step": 2 + i, "pad": "x" * 3000})
            assert err.value.errno == errno.ENOSPC
            text = p.read_text()
            assert text.endswith("\n")
            kept = [r["step"] for r in read_jsonl(p)]
            assert kept == list(range(1, len(kept) + 1)) and len(kept) > 2
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
