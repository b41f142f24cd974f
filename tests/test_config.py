"""Config loading: good configs resolve, broken ones fail with one line naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import (
    apply_overrides,
    config_to_toml,
    load_config,
    read_toml,
    validate_config,
)
from backend.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = 'model = "builtin:tiny-qwen3-vl"\n[env]\nid = "colors"\n'


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["colors-tiny.toml", "qwen3-vl-8b-colors.toml", "colors-tiny-gpu.toml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.env.id == "colors"
    # the CPU job shows the [nccl] table; the GPU recipe leaves P2P on (the doctor says when it is missing)
    assert cfg.nccl_env() == ({"NCCL_P2P_DISABLE": "1"} if name == "colors-tiny.toml" else {})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_names_its_own_run(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.run_name == path.stem  # runs/<config name>: one config, one run directory


def test_seed_config_keys_are_accepted_and_legacy_keys_mapped(tmp_path: Path) -> None:
    # The vf-rl quickstart's [trainer.args] table, verbatim.
    text = BASE + """
[inference]
gpus = 1
[inference.args]
enforce_eager = true
max_model_len = 8192
limit_mm_per_prompt = {"image" = 4}
[trainer]
gpus = 1
[trainer.args]
run_name = "my-vlm-training"
output_dir = "./outputs"
learning_rate = 1e-5
max_steps = 100
batch_size = 512
micro_batch_size = 4
rollouts_per_step = 16
mask_ratio_low = 0.1
mask_ratio_high = 10.0
temperature = 1.0
vllm_server_host = "0.0.0.0"
vllm_server_port = 8123
max_concurrent = 128
sync_to_vllm_every = 1
log_every_steps = 10
"""
    cfg = load_config(_write(tmp_path, text))
    assert cfg.inference.port == 8123
    assert cfg.inference.host == "127.0.0.1"  # admin routes stay on loopback
    assert cfg.trainer.args.prompts_per_step == 32
    assert cfg.run_dir() == Path("./outputs/my-vlm-training")


def test_run_name_defaults_to_config_file_stem(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE, "my-run.toml"))
    assert cfg.run_name == "my-run"


BROKEN = [
    ('model = "x"\n[env\nid = "colors"\n', None, "TOML syntax error"),
    (BASE + "[trainer.args]\nlearning_rat = 1e-4\n", "trainer.args.learning_rat", "did you mean 'learning_rate'"),
    (BASE + "[trainer.args]\nmax_steps = \"many\"\n", "trainer.args.max_steps", "valid integer"),
    ('[env]\nid = "colors"\n', "model", "required key is missing"),
    (BASE + "[nccl]\nP2P_DISABLED = 1\n", "nccl.P2P_DISABLED", "did you mean 'P2P_DISABLE'"),
    (BASE + "[nccl]\nP2P_DISABLE = [1, 2]\n", "nccl.P2P_DISABLE", ""),
    (BASE + "[trainer.args]\nlearning_rate = -0.1\n", "trainer.args.learning_rate", "greater than 0"),
    (BASE + "[trainer.args]\nbatch_size = 4\nmicro_batch_size = 8\n", "trainer.args.micro_batch_size", "<= batch_size"),
    (BASE + "[inference]\nport = 70000\n", "inference.port", "less than or equal to 65535"),
    (BASE + "[inference]\nengine = \"tgi\"\n", "inference.engine", "'hf' or 'vllm'"),
    (BASE + "[inference.args]\nmax_modl_len = 5\n", "inference.args.max_modl_len", "did you mean 'max_model_len'"),
    (BASE + "[trainer.args]\nbatch_size = 10\nrollouts_per_step = 4\nmicro_batch_size = 2\n", "trainer.args.batch_size", "multiple"),
    (BASE + "colour = 1\n", "env.colour", "unknown key"),
]


@pytest.mark.parametrize("text,key,fragment", BROKEN)
def test_broken_config_reports_file_and_key(tmp_path: Path, text: str, key: str | None, fragment: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    err = ei.value
    assert err.path == str(path)
    assert err.key == key
    assert fragment in err.message
    assert "\n" not in str(err)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        read_toml(tmp_path / "nope.toml")


def test_overrides_parse_toml_values() -> None:
    data = apply_overrides({"model": "m", "env": {"id": "colors"}},
                           ["trainer.args.max_steps=5", "trainer.args.run_name=abc", "inference.args.enforce_eager=true"])
    cfg = validate_config(data)
    assert cfg.trainer.args.max_steps == 5
    assert cfg.trainer.args.run_name == "abc"
    assert cfg.inference.args.enforce_eager is True


def test_bad_override_is_reported() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["trainer.args.max_steps"])


def test_show_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "colors-tiny.toml")
    again = load_config(_write(tmp_path, config_to_toml(cfg)))
    assert again == cfg


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_config_check_ok_and_broken(tmp_path: Path) -> None:
    ok = _cli("config", "check", "configs/colors-tiny.toml")
    assert ok.returncode == 0, ok.stderr
    assert "configs/colors-tiny.toml: ok" in ok.stdout
    bad = _write(tmp_path, BASE + "[trainer.args]\nlearning_rat = 1\n")
    res = _cli("config", "check", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert f"{bad}: trainer.args.learning_rat: unknown key" in lines[0]


def test_cli_config_check_refuses_what_the_config_names_but_cannot_be_found(tmp_path: Path) -> None:
    """An unknown environment or a model path that does not exist: refused by config check too
    (not only by vlmrl run's preflight), one line naming the file and the key, exit 2."""
    cases = {"env.id=colorz": ("env.id", "unknown environment 'colorz'", "did you mean 'colors'?"),
             f"model={tmp_path / 'nope'}": ("model", f"{tmp_path / 'nope'}: no such directory", "")}
    for override, (key, what, hint) in cases.items():
        res = _cli("config", "check", "configs/colors-tiny.toml", override)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: configs/colors-tiny.toml: {key}: {what}"), lines
        assert hint in lines[0] and "Traceback" not in res.stderr and res.stdout == ""
    ok = _cli("config", "check", "configs/colors-tiny.toml")
    assert "the machine's checks: vlmrl doctor configs/colors-tiny.toml" in ok.stdout


def test_cli_config_show_fills_defaults() -> None:
    res = _cli("config", "show", "configs/colors-tiny.toml")
    assert res.returncode == 0, res.stderr
    assert "mask_ratio_high = 10.0" in res.stdout
    assert "[run]" in res.stdout and "stop_grace_s" in res.stdout


def test_vlmrl_run_refuses_the_broken_corpus_like_config_check_and_starts_nothing(tmp_path: Path) -> None:
    """`vlmrl run` on every broken config of the corpus (and on a missing file): the same one
    line `FILE: table.key: message` as `vlmrl config check`, exit 2, no run directory."""
    runs = tmp_path / "runs"
    cases = [(_write(tmp_path, text, f"c{i}.toml"), key) for i, (text, key, _) in enumerate(BROKEN)]
    cases.append((tmp_path / "missing.toml", None))
    for path, key in cases:
        check = _cli("config", "check", str(path))
        run = _cli("run", str(path), "--output-dir", str(runs))
        assert run.returncode == check.returncode == 2, (path.read_text() if path.exists() else path, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert lines == check.stderr.strip().splitlines() and len(lines) == 1, (lines, check.stderr)
        assert lines[0].startswith(f"error: {path}: " + (f"{key}: " if key else ""))
        assert "Traceback" not in run.stderr and run.stdout == ""
    assert not runs.exists()
