"""The run plan is pure: argv, environment, GPU split and shell conflicts, without processes."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from pathlib import Path
from typing import Any

import pytest

from backend import contract
from backend.records import RunInfo
from backend.config import load_config, validate_config
from backend.errors import ConfigError
from vlmrl_tui.plan import (
    MASKED,
    build_plan,
    format_plan,
    merge_no_proxy,
    run_dir_problem,
    split_gpus,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "secret-token-123"


def _cfg(tmp_path: Path, **tables: Any):
    data: dict[str, Any] = {"model": "some/model", "env": {"id": "colors"},
                            "trainer": {"args": {"output_dir": str(tmp_path / "runs"), "run_name": "r"}}}
    for k, v in tables.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            merged = dict(data[k])
            for kk, vv in v.items():
                if isinstance(vv, dict) and isinstance(merged.get(kk), dict):
                    merged[kk] = {**merged[kk], **vv}
                else:
                    merged[kk] = vv
            data[k] = merged
        else:
            data[k] = v
    return validate_config(data)


def _plan(tmp_path: Path, env: dict[str, str] | None = None, **tables: Any):
    return build_plan(_cfg(tmp_path, **tables), None, base_env=env or {"PATH": "/usr/bin"},
                      token=TOKEN, sync_port=29555, cwd=tmp_path)


def test_hf_plan_runs_vlmrl_serve_and_train_on_the_resolved_config(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    server, trainer = plan.process("server"), plan.process("trainer")
    resolved = tmp_path / "runs" / "r" / "config.toml"
    assert plan.config_file == resolved
    assert server.argv == (sys.executable, "-m", "vlmrl_tui.cli", "serve", str(resolved))
    assert trainer.argv == (sys.executable, "-m", "vlmrl_tui.cli", "train", str(resolved))
    assert trainer.restart_argv == trainer.argv + ("--resume",)
    assert trainer.depends_on == "server" and server.depends_on is None
    assert server.health_url == "http://127.0.0.1:8000" + contract.ROUTE_HEALTH
    assert server.models_url == "http://127.0.0.1:8000" + contract.ROUTE_MODELS
    assert server.log_path == tmp_path / "runs" / "r" / "logs" / "server.log"
    assert trainer.log_path.name == "trainer.log"
    assert server.cwd == trainer.cwd == tmp_path
    assert (server.restart, server.max_restarts) == ("on-failure", 2)
    assert trainer.restart == "never"
    assert plan.prepare is None  # a hub id needs no build step
    # the picked sync port lands in the resolved config too
    assert "sync_port = 29555" in plan.config_toml


def test_resume_passes_resume_to_the_trainer(tmp_path: Path) -> None:
    plan = build_plan(_cfg(tmp_path), None, resume=True, base_env={}, token=TOKEN, sync_port=1234, cwd=tmp_path)
    assert plan.process("trainer").argv[-1] == "--resume"


def test_builtin_model_gets_a_prepare_step_before_the_children(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "colors-tiny.toml", [f"trainer.args.output_dir='{tmp_path}'"])
    plan = build_plan(cfg, None, base_env={}, token=TOKEN, sync_port=1234, cwd=tmp_path)
    assert [p.name for p in plan.processes] == ["prepare", "server", "trainer"]
    prep = plan.prepare
    assert prep is not None and prep.one_shot and prep.argv[-1] == "builtin:tiny-qwen3-vl"
    assert [p.name for p in plan.services] == ["server", "trainer"]


def test_both_children_get_one_environment(tmp_path: Path) -> None:
    plan = _plan(tmp_path, env={"PATH": "/bin", "HOME": "/root"}, nccl={"P2P_DISABLE": 1, "NCCL_DEBUG": "WARN"})
    s, t = dict(plan.process("server").env), dict(plan.process("trainer").env)
    s.pop("CUDA_VISIBLE_DEVICES"), t.pop("CUDA_VISIBLE_DEVICES")
    assert s == t
    assert s["NCCL_P2P_DISABLE"] == "1" and s["NCCL_DEBUG"] == "WARN"
    # the weight-sync port travels one way: in the resolved config both children read
    assert tomllib.loads(plan.config_toml)["trainer"]["args"]["sync_port"] == 29555
    assert not {"MASTER_ADDR", "MASTER_PORT", "VLMRL_SYNC_PORT", "VLMRL_CONFIG"} & set(s)
    assert s["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert s[contract.ENV_RUN_TOKEN] == TOKEN
    assert s[contract.ENV_SERVER_URL] == "http://127.0.0.1:8000"
    assert s[contract.ENV_RUN_DIR] == str(tmp_path / "runs" / "r")
    assert s["PYTHONUNBUFFERED"] == "1"
    assert s["PATH"] == "/bin" and s["HOME"] == "/root"  # the shell is kept underneath
    assert "127.0.0.1" in s["no_proxy"].split(",") and "localhost" in s["NO_PROXY"].split(",")


def test_a_fresh_token_per_plan(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    a = build_plan(cfg, None, base_env={}, sync_port=1, cwd=tmp_path).shared_env[contract.ENV_RUN_TOKEN]
    b = build_plan(cfg, None, base_env={}, sync_port=1, cwd=tmp_path).shared_env[contract.ENV_RUN_TOKEN]
    assert a != b and len(a) >= 24


def test_sync_port_from_config_or_a_free_one(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, trainer={"args": {"sync_port": 31000}})
    assert build_plan(cfg, None, base_env={}, cwd=tmp_path).sync_port == 31000
    picked = build_plan(_cfg(tmp_path), None, base_env={}, cwd=tmp_path).sync_port
    assert 1024 < picked < 65536


def test_no_proxy_keeps_the_shell_list_and_adds_loopback(tmp_path: Path) -> None:
    assert merge_no_proxy("corp.example,localhost", ["127.0.0.1", "localhost"]) == "corp.example,localhost,127.0.0.1"
    plan = _plan(tmp_path, env={"https_proxy": "http://proxy:3128", "NO_PROXY": "corp.example"})
    items = plan.shared_env["no_proxy"].split(",")
    assert items[0] == "corp.example" and {"127.0.0.1", "localhost", "::1"} <= set(items)


def test_gpus_are_split_so_server_and_trainer_never_share(tmp_path: Path) -> None:
    plan = _plan(tmp_path, inference={"gpus": 2}, trainer={"gpus": 1})
    assert plan.process("server").env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert plan.process("trainer").env["CUDA_VISIBLE_DEVICES"] == "2"


def test_gpu_split_respects_the_shells_visible_devices(tmp_path: Path) -> None:
    plan = _plan(tmp_path, env={"CUDA_VISIBLE_DEVICES": "4,5,6"}, inference={"gpus": 1}, trainer={"gpus": 2})
    assert plan.process("server").env["CUDA_VISIBLE_DEVICES"] == "4"
    assert plan.process("trainer").env["CUDA_VISIBLE_DEVICES"] == "5,6"
    assert not [n for n in plan.notes if n.name == "CUDA_VISIBLE_DEVICES"]  # a pool, not a conflict


def test_too_few_visible_gpus_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='3' in your shell makes 1 visible"):
        _plan(tmp_path, env={"CUDA_VISIBLE_DEVICES": "3"}, inference={"gpus": 1}, trainer={"gpus": 1})


def test_visible_devices_end_where_cuda_stops_reading_them(tmp_path: Path) -> None:
    # CUDA ignores everything from the first invalid entry on: -1 hides every GPU, so a GPU
    # trainer would otherwise start and silently fall back to the CPU.
    with pytest.raises(ConfigError, match=r"trainer 1, but CUDA_VISIBLE_DEVICES='-1' in your shell makes 0 visible"):
        _plan(tmp_path, env={"CUDA_VISIBLE_DEVICES": "-1"}, trainer={"gpus": 1})
    plan = _plan(tmp_path, env={"CUDA_VISIBLE_DEVICES": "2,GPU-abc,x,3"}, inference={"gpus": 1}, trainer={"gpus": 1})
    assert (plan.process("server").gpus, plan.process("trainer").gpus) == (("2",), ("GPU-abc",))


def test_share_gpus_only_when_the_config_says_so(tmp_path: Path) -> None:
    plan = _plan(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, run={"share_gpus": True})
    assert plan.process("server").env["CUDA_VISIBLE_DEVICES"] == "0"
    assert plan.process("trainer").env["CUDA_VISIBLE_DEVICES"] == "0"
    assert split_gpus(1, 1, None, share=False) == (["0"], ["1"])


def test_a_shared_gpu_lets_nccl_put_both_ranks_on_it(tmp_path: Path) -> None:
    shared = _plan(tmp_path, env={"NCCL_MULTI_RANK_GPU_ENABLE": "0"}, inference={"gpus": 1}, trainer={"gpus": 1},
                   run={"share_gpus": True})
    for proc in ("server", "trainer"):  # both sides of the weight-sync communicator
        assert shared.process(proc).env["NCCL_MULTI_RANK_GPU_ENABLE"] == "1"
    assert "contradicts the config" in {n.name: n for n in shared.notes}["NCCL_MULTI_RANK_GPU_ENABLE"].message
    apart = _plan(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1})
    assert "NCCL_MULTI_RANK_GPU_ENABLE" not in apart.shared_env
    own = _plan(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, run={"share_gpus": True},
                nccl={"MULTI_RANK_GPU_ENABLE": 0})
    assert own.process("trainer").env["NCCL_MULTI_RANK_GPU_ENABLE"] == "0"  # the config's word (the doctor fails it)


def test_cpu_processes_see_no_gpu(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    assert plan.process("server").env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.process("trainer").env["CUDA_VISIBLE_DEVICES"] == ""


def test_cuda_trainer_without_gpus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.gpus"):
        _plan(tmp_path, trainer={"args": {"device": "cuda"}})


def test_shell_variables_that_contradict_the_config_are_reported(tmp_path: Path) -> None:
    env = {"NCCL_P2P_DISABLE": "0", "NCCL_DEBUG": "INFO", "NCCL_P2P_DISABEL": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    plan = _plan(tmp_path, env=env, nccl={"P2P_DISABLE": 1})
    notes = {n.name: n for n in plan.notes}
    assert notes["NCCL_P2P_DISABLE"].shell_value == "0" and notes["NCCL_P2P_DISABLE"].plan_value == "1"
    assert "contradicts the config" in notes["NCCL_P2P_DISABLE"].message
    assert notes["NCCL_DEBUG"].plan_value is None and "comes from your shell" in notes["NCCL_DEBUG"].message
    assert "not a variable NCCL knows" in notes["NCCL_P2P_DISABEL"].message
    assert "CUDA_DEVICE_ORDER" in notes
    # the config wins, in both children
    for proc in ("server", "trainer"):
        assert plan.process(proc).env["NCCL_P2P_DISABLE"] == "1"
        assert plan.process(proc).env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_vllm_engine_uses_the_vllm_ext_command_builder(tmp_path: Path) -> None:
    from backend.vllm_ext.command import vllm_server_argv

    tables: dict[str, Any] = {"model": "builtin:tiny-qwen3-vl", "inference": {"engine": "vllm", "port": 8123}}
    plan = _plan(tmp_path, **tables)
    argv = plan.process("server").argv
    assert argv == tuple(vllm_server_argv(_cfg(tmp_path, **tables)))
    assert argv[1:3] == ("-m", "vllm.entrypoints.openai.api_server") and argv[argv.index("--port") + 1] == "8123"
    assert plan.process("trainer").env["VLLM_SERVER_DEV_MODE"] == "1"  # one environment for both


def test_format_plan_shows_commands_and_environment_but_masks_the_token(tmp_path: Path) -> None:
    plan = _plan(tmp_path, env={"NCCL_P2P_DISABLE": "0"}, nccl={"P2P_DISABLE": 1})
    text = format_plan(plan)
    assert TOKEN not in text and MASKED in text
    assert "vlmrl_tui.cli serve" in text and "vlmrl_tui.cli train" in text
    assert "NCCL_P2P_DISABLE=1" in text and "weight-sync port 29555" in text
    assert "contradicts the config" in text
    assert "SIGKILL after 10 s" in text
    assert TOKEN in format_plan(plan, show_secrets=True)


def test_run_dir_problem_refuses_a_trained_run_without_resume(tmp_path: Path) -> None:
    rd = tmp_path / "runs" / "r"
    assert run_dir_problem(rd, resume=False) is None
    (rd / "logs").mkdir(parents=True)
    assert run_dir_problem(rd, resume=False) is None  # never trained: reused
    (rd / "metrics.jsonl").write_text('{"step": 1}\n')
    assert "--resume" in (run_dir_problem(rd, resume=False) or "")
    assert run_dir_problem(rd, resume=True) is None


def test_run_dir_problem_refuses_a_live_supervisor(tmp_path: Path) -> None:
    import json
    import subprocess

    rd = tmp_path / "runs" / "r"
    rd.mkdir(parents=True)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (rd / "run.json").write_text(json.dumps(RunInfo(name="r", status="running", supervisor_pid=p.pid).to_json()))
        assert "running supervisor" in (run_dir_problem(rd, resume=True) or "")
    finally:
        p.kill()
        p.wait()
    assert run_dir_problem(rd, resume=True) is None
