"""Experiment trackers (``[trainer.args] report_to``): a real tiny run feeds trackio, TensorBoard
and wandb (offline), and each is read back with its own reader against ``metrics.jsonl`` and
``rollouts.jsonl``; a tracker that is missing or fails mid-run is dropped with one warning
while the run completes.

The runs go in a process of their own (``tests/trackrun.py``): trackio reads its store folder
from ``TRACKIO_DIR`` once, at import, and each test has its own.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from backend.config import ConfigError, MultimodalRLConfig, config_to_toml, validate_config
from backend.records import MetricRecord, RolloutRecord
from backend.rundir import RunDirectory, read_jsonl
from backend.trackers import open_trackers

ROOT = Path(__file__).resolve().parents[1]
HAS_WANDB = importlib.util.find_spec("wandb") is not None
STEPS = 4
EVERY = 2  # rollout tables at steps 2 and 4


def _run(tmp_path: Path, model: Path, report_to: list[str], **spec: Any) -> tuple[RunDirectory, str]:
    """A tiny run of STEPS steps reporting to ``report_to``; its run directory and its log."""
    run_dir = tmp_path / "tiny-run"
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), WANDB_MODE="offline",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for var in ("WANDB_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        env.pop(var, None)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written to ~
        env[var] = str(tmp_path / "wandb-home")
    args = {"max_steps": STEPS, "report_to": report_to, "log_rollouts_every": EVERY}
    full = {"model": str(model), "run_dir": str(run_dir), "args": args, **spec}
    out = subprocess.run([sys.executable, "-m", "tests.trackrun", json.dumps(full)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"trackrun: done, {STEPS} steps" in log, log[-4000:]
    return RunDirectory(run_dir), log


def _metrics(rd: RunDirectory, steps: int = STEPS) -> list[MetricRecord]:
    lines = [MetricRecord.from_json(d) for d in read_jsonl(rd.metrics)]
    assert [m.step for m in lines if m is not None] == list(range(1, steps + 1))
    return [m for m in lines if m is not None]


def _expected(m: MetricRecord) -> dict[str, float]:
    """What a tracker must hold for metrics line ``m``: every number but step and time."""
    return {k: float(v) for k, v in m.values.items() if k not in ("step", "time")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _rollouts(rd: RunDirectory, step: int) -> list[RolloutRecord]:
    return [r for d in read_jsonl(rd.rollouts) if d.get("step") == step and "completion" in d
            for r in [RolloutRecord.from_json(d)]]


def _trackio_logs(store: Path, project: str, run: str) -> list[dict[str, Any]]:
    """The run's logs, read by trackio itself from the store at ``store``."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, project, run], env=dict(os.environ, TRACKIO_DIR=str(store)),
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trackers_get_every_metric_and_the_rollout_tables(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("trackio")
    pytest.importorskip("tensorboard")
    report_to = ["trackio", "tensorboard"] + (["wandb"] if HAS_WANDB else [])
    rd, log = _run(tmp_path, tiny_model_dir, report_to)
    assert "warning" not in log.lower(), log
    metrics = _metrics(rd)
    tables = {s: _rollouts(rd, s) for s in range(EVERY, STEPS + 1, EVERY)}
    assert all(len(rows) == 8 for rows in tables.values())

    # TensorBoard, through its own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    from PIL import Image

    acc = EventAccumulator(str(rd.tensorboard_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    names = set().union(*(_expected(m) for m in metrics))
    assert {"reward_mean", "loss", "step_s", "tokens_per_s"} <= names
    assert set(acc.Tags()["scalars"]) == names
    for name in names:
        want = [(m.step, v) for m in metrics if (v := _expected(m).get(name)) is not None]
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in want], name
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-30), name
    for step, rows in tables.items():
        [text] = [e for e in acc.Tensors("rollouts/table") if e.step == step]
        md = tensor_util.make_ndarray(text.tensor_proto).item().decode()
        assert md.splitlines()[0].startswith("| step | group | example_id | prompt | completion | reward |")
        assert "advantage |" in md.splitlines()[0]
        assert len(md.splitlines()) == 2 + len(rows)
        for r in rows:
            assert f"| {r.step} | {r.group} | {r.example_id} |" in md
        # one image per prompt, the PNG the run directory kept for it
        for group in {r.group for r in rows}:
            [img] = [e for e in acc.Images(f"rollouts/image/{group}") if e.step == step]
            first = next(r for r in rows if r.group == group)
            got_px = Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB")
            want_px = Image.open(rd.path / first.images[0]).convert("RGB")
            assert got_px.size == want_px.size and got_px.tobytes() == want_px.tobytes()
    assert sorted(e.step for e in acc.Tensors("rollouts/table")) == sorted(tables)

    # trackio, from its local store
    store = tmp_path / "trackio"
    logs = _trackio_logs(store, "vlmrl", rd.path.name)
    by_step = {m.step: _expected(m) for m in metrics}
    got_metrics = {e["step"]: {k: v for k, v in e.items() if k not in ("step", "timestamp")}
                   for e in logs if "rollouts" not in e}
    assert got_metrics.keys() == by_step.keys()
    for step, want in by_step.items():
        assert got_metrics[step] == pytest.approx(want, rel=1e-12), step
    got_tables = {e["step"]: e["rollouts"] for e in logs if "rollouts" in e}
    assert got_tables.keys() == tables.keys()
    for step, rows in tables.items():
        t = got_tables[step]
        assert t["_type"] == "trackio.table" and len(t["_value"]) == len(rows)
        for cell, r in zip(t["_value"], rows):
            assert (cell["step"], cell["group"], cell["prompt"], cell["completion"]) == (
                step, r.group, r.prompt, r.completion)
            assert (cell["reward"], cell["advantage"]) == pytest.approx((r.reward, r.advantage))
            assert all(cell[f"reward/{p}"] == pytest.approx(v) for p, v in r.reward_parts.items())
            assert (store / "media" / cell["image"]["file_path"]).is_file()

    # wandb offline: its run files in the run directory, the tables with this run's rollouts
    if HAS_WANDB:
        [run] = list(rd.wandb_dir.glob("offline-run-*"))
        data = next(run.glob("run-*.wandb")).read_bytes()
        assert all(name.encode() in data for name in names)
        for step, rows in tables.items():
            [tf] = list((run / "files" / "media" / "table").glob(f"rollouts_{step}_*.table.json"))
            t = json.loads(tf.read_text())
            assert "advantage" in t["columns"] and len(t["data"]) == len(rows)
            col = t["columns"].index("completion")
            assert [row[col] for row in t["data"]] == [r.completion for r in rows]


def test_a_missing_or_failing_tracker_gives_one_warning_and_the_run_completes(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """wandb is not importable; at step 2 the tensorboard folder and the trackio store become
    plain files. Each tracker is dropped with one warning; the run writes everything."""
    pytest.importorskip("trackio")
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "tiny-run"
    rd, log = _run(tmp_path, tiny_model_dir, ["trackio", "wandb", "tensorboard"], block=["wandb"], break_at=2,
                   break_paths=[str(RunDirectory(run_dir).tensorboard_dir), str(tmp_path / "trackio")])
    warnings = [ln for ln in log.splitlines() if "warning" in ln.lower()]
    by_tracker = {name: [ln for ln in warnings if ln.startswith(f"warning: tracker {name} disabled: ")]
                  for name in ("trackio", "wandb", "tensorboard")}
    assert all(len(lines) == 1 for lines in by_tracker.values()), warnings
    assert len(warnings) == 3, "\n".join(warnings)
    assert all(ln.endswith("; the run goes on, its run directory has every metric") for ln in warnings)
    assert "not installed" in by_tracker["wandb"][0] and "pip install 'vlmrl[wandb]'" in by_tracker["wandb"][0]
    # the reason names the error and the path it hit
    assert "Error" in by_tracker["tensorboard"][0] and str(RunDirectory(run_dir).tensorboard_dir) in by_tracker[
        "tensorboard"][0]
    assert "Errno" in by_tracker["trackio"][0] and str(tmp_path / "trackio") in by_tracker["trackio"][0]
    assert "Traceback" not in log
    _metrics(rd)  # every step
    assert sum(1 for d in read_jsonl(rd.rollouts) if "completion" in d) == STEPS * 8
    assert rd.latest_checkpoint() == rd.checkpoint(STEPS)


def test_ctrl_c_still_sends_what_was_queued_and_finishes_the_trackers(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C at step 2's progress line: the trainer's finally sends step 2 and ends the trackers' thread."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from backend.adapters import adapter_for
    from backend.trainer import MultimodalGRPOTrainer
    from environments import make_env
    from tests.tinytrainer import load_tiny, tiny_cfg

    def log(line: str) -> None:
        if line.startswith("step 2/"):
            raise KeyboardInterrupt

    model, processor = load_tiny(tiny_model_dir)
    trainer = MultimodalGRPOTrainer(
        model, processor, adapter_for(model.config, processor=processor, max_length=1024),
        tiny_cfg(max_steps=5, report_to="tensorboard"), env=make_env("colors", {}), run_dir=tmp_path, log=log)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not [t for t in threading.enumerate() if t.name == "trackers"]
    acc = EventAccumulator(str(RunDirectory(tmp_path).tensorboard_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [m.step for m in _metrics(RunDirectory(tmp_path), 2)] == [1, 2]


# --- config ---------------------------------------------------------------------------------


def _args(**kw: Any) -> MultimodalRLConfig:
    data = {"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"}, "trainer": {"args": kw}}
    return validate_config(data, "job.toml").trainer.args


def test_report_to_takes_a_name_or_a_list_and_refuses_unknown_trackers() -> None:
    assert _args().report_to == [] and _args().log_rollouts_every == 10 and _args().tracker_project == "vlmrl"
    assert _args(report_to="wandb").report_to == ["wandb"]
    assert _args(report_to="none").report_to == []
    assert _args(report_to=["tensorboard", "trackio", "tensorboard"]).report_to == ["tensorboard", "trackio"]
    with pytest.raises(ConfigError) as e:
        _args(report_to=["trackio", "wandbb"])
    assert str(e.value) == ("job.toml: trainer.args.report_to: unknown tracker 'wandbb'; did you mean 'wandb'? "
                            "known: trackio, wandb, tensorboard")
    with pytest.raises(ConfigError, match=r"trainer\.args\.log_rollouts_every: .*greater than or equal to 0"):
        _args(log_rollouts_every=-1)
    with pytest.raises(ConfigError, match=r"trainer\.args\.tracker_project: "):
        _args(tracker_project="")
    shown = config_to_toml(validate_config({"model": "m", "env": {"id": "colors"},
                                            "trainer": {"args": {"report_to": "trackio"}}}))
    assert "report_to = [" in shown and '"trackio"' in shown and "log_rollouts_every = 10" in shown


def test_report_to_without_a_run_directory_says_so_and_opens_nothing() -> None:
    lines: list[str] = []
    assert open_trackers(_args(report_to=["tensorboard"]), None, None, 0, lines.append) is None
    assert lines == ["warning: report_to = ['tensorboard'] needs a run directory (run_dir=); no tracker opened"]
    assert open_trackers(_args(), None, None, 0, lines.append) is None and len(lines) == 1


def test_a_resumed_run_hides_the_tensorboard_events_it_logs_again(tmp_path: Path) -> None:
    """A run resumed from the checkpoint of step 2 logs steps 3.. again: TensorBoard shows the new ones."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from backend.trackers import TensorboardTracker

    first = TensorboardTracker(tmp_path, purge_step=1)
    for step in range(1, 5):
        first.metrics(step, {"loss": float(step)})
    first.finish()
    resumed = TensorboardTracker(tmp_path, purge_step=3)
    for step in range(3, 6):
        resumed.metrics(step, {"loss": 10.0 * step})
    resumed.finish()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
