"""``vlmrl eval``: held-out scores through the serving path, eval.json, models side by side."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import tomli_w

from backend.config import load_config
from backend.errors import ConfigError
from backend.evaluate import EvalResult, eval_items
from environments import make_env
from tests.serverproc import ServerProc, serving
from tests.tinytrainer import tiny_cfg, tiny_trainer
from vlmrl_tui.evaluation import Split, eval_command, format_table, label_of, parse_split


def test_split_arguments() -> None:
    assert parse_split(None, None, 32) == Split(0, 32)
    assert parse_split(None, 5, 32) == Split(0, 5)
    assert parse_split("3-7", None, 32) == Split(3, 5) and Split(3, 5).label == "3-7"
    assert parse_split("4", None, 32) == Split(4, 1)
    for bad, key in (("7-3", "--seeds: the range '7-3' is empty"), ("a-b", "--seeds: expected A-B"),):
        with pytest.raises(ConfigError, match=key):
            parse_split(bad, None, 32)
    with pytest.raises(ConfigError, match="--seeds or --episodes, not both"):
        parse_split("1-2", 3, 32)
    with pytest.raises(ConfigError, match="--episodes: must be at least 1"):
        parse_split(None, 0, 32)


def test_labels_and_the_side_by_side_table(tmp_path: Path) -> None:
    ckpt = tmp_path / "runs" / "colors-tiny" / "checkpoints" / "400"
    assert label_of("base") == "base" and label_of(str(ckpt)) == "colors-tiny-400"
    table = format_table([
        {"name": "base", "mean": 0.2, "std": 0.4, "n": 8, "parts": {"correct": 0.2}, "seconds": 1.0},
        {"name": "ckpt", "mean": 1.0, "std": 0.0, "n": 8, "parts": {"correct": 1.0}, "achievements": {"eat": 0.5},
         "turns_mean": 3.0, "seconds": 2.0},
    ]).splitlines()
    assert table[0].split() == ["base", "ckpt"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", ln.strip()) for ln in table[1:])}
    assert rows["mean reward"] == ["0.200", "1.000"] and rows["part correct"] == ["0.200", "1.000"]
    assert rows["achievement eat"] == ["-", "0.50"] and rows["turns (mean)"] == ["-", "3.0"]


def _config(tmp_path: Path, model: Path, env: dict, **targs: object) -> Path:
    data = {
        "model": str(model), "env": env,
        "inference": {"engine": "hf", "gpus": 0, "host": "127.0.0.1", "port": 8000,
                      "args": {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 4}, "dtype": "float32"}},
        "trainer": {"args": {"output_dir": str(tmp_path / "runs"), "run_name": "ev", "max_tokens": 4,
                             "torch_threads": 1, **targs}},
    }
    path = tmp_path / "cfg.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_vlmrl_eval_serves_base_and_a_checkpoint_in_turn_and_writes_eval_json(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    tr = tiny_trainer(tiny_model_dir, tiny_cfg(max_steps=2, save_every=0), run_dir=tmp_path / "train")
    tr.train()
    ckpt = tmp_path / "train" / "checkpoints" / "2"
    assert (ckpt / "config.json").is_file()
    cfg_path = _config(tmp_path, tiny_model_dir, {"id": "colors", "args": {"num_colors": 5, "image_size": 64}})
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    proc = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "eval", str(cfg_path), "--checkpoint", "base",
                           "--checkpoint", str(ckpt), "--episodes", "6"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, "eval left processes behind"
    doc = json.loads((tmp_path / "runs" / "ev" / "eval.json").read_text())
    assert doc["env"] == "colors" and doc["split"] == "0-5" and doc["greedy"] is True
    base, trained = (EvalResult.from_json(m) for m in doc["models"])
    assert base.name == "base" and trained.name == str(ckpt)
    ids = [e.id for e in eval_items(make_env("colors", {"num_colors": 5, "image_size": 64}), 6)]
    for r in (base, trained):
        assert r.n == 6 and list(r.per_seed) == ids and 0.0 <= r.mean <= 1.0
        assert set(r.parts) == {"correct", "is_color"} and r.turns_mean is None and r.achievements == {}
        assert r.mean == pytest.approx(sum(r.per_seed.values()) / 6)
    # each model had its own server, started and stopped by the supervisor, with its logs kept
    for label in ("base", "train-2"):
        home = tmp_path / "runs" / "ev" / "eval" / label
        info = json.loads((home / "run.json").read_text())
        assert info["status"] == "completed", info
        assert "mean reward" in (home / "logs" / "eval.log").read_text()
    table = out[out.index("mean reward") - 200:]
    assert "base" in table and str(ckpt) in table and "part correct" in table
    assert f"wrote {tmp_path / 'runs' / 'ev' / 'eval.json'}" in out


@pytest.fixture(scope="module")
def crafter_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    pytest.importorskip("crafter")
    with serving(tmp_path_factory.mktemp("eval-server"), None, max_model_len=4096,
                 limit_mm_per_prompt={"image": 4}) as proc:
        yield proc


def test_eval_of_a_running_server_scores_crafter_episodes_by_seed(crafter_server: ServerProc, tiny_model_dir: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    env_args = {"episode_length": 3, "size": 64}
    cfg = load_config(_config(tmp_path, tiny_model_dir, {"id": "crafter", "args": env_args}))
    out = tmp_path / "scores.json"
    assert eval_command(cfg, None, server=crafter_server.url, seeds="1-2", output=out) == 0
    doc = json.loads(out.read_text())
    (res,) = (EvalResult.from_json(m) for m in doc["models"])
    seeds = eval_items(make_env("crafter", env_args), 2, start=1)
    assert res.name == crafter_server.url and res.n == 2 and doc["split"] == "1-2"
    assert list(res.per_seed) == [f"crafter-{s}" for s in seeds]
    assert res.turns_mean == 3.0 and len(res.achievements) == 22
    assert all(0.0 <= v <= 1.0 for v in res.achievements.values())
    assert set(res.parts) >= {"achievements", "format"}
    printed = capsys.readouterr().out
    assert "achievement collect_wood" in printed and "turns (mean)" in printed
    with pytest.raises(ConfigError, match="--checkpoint: with --server"):
        eval_command(cfg, None, server=crafter_server.url, checkpoints=["base"])


def test_a_missing_checkpoint_is_refused_before_anything_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg_path = _config(tmp_path, tiny_model_dir, {"id": "colors"})
    proc = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "eval", str(cfg_path), "--checkpoint",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "--checkpoint" in proc.stderr and "no such directory" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "ev" / "eval").exists()
