"""``vlmrl doctor``: one verdict per check, a fix for each problem, non-zero on a failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from fake_nvml import make_fake_nvml  # noqa: E402

from backend.config import validate_config  # noqa: E402
from vlmrl_tui.doctor import FAIL, OK, WARN, CheckResult, check_model, doctor_main, format_check, run_checks  # noqa: E402
from vlmrl_tui.gpu import Nvml  # noqa: E402
from backend.net import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def _config(tmp_path: Path, extra: str = "", port: int | None = None) -> Path:
    port = port or free_port()
    p = tmp_path / "c.toml"
    p.write_text(f"""model = "builtin:tiny-qwen3-vl"
[env]
id = "colors"
[inference]
port = {port}
[trainer.args]
output_dir = "{tmp_path / 'runs'}"
max_steps = 3
{extra}
""")
    return p


def _cfg(tmp_path: Path, **tables: Any):
    data: dict[str, Any] = {"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"},
                            "inference": {"port": free_port()},
                            "trainer": {"args": {"output_dir": str(tmp_path / "runs")}}}
    for k, v in tables.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return validate_config(data)


def _by_name(results: list[CheckResult], name: str) -> list[CheckResult]:
    return [r for r in results if r.name == name]


@pytest.fixture
def listener() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A real process listening on a free port (so psutil can name it)."""
    port = free_port()
    code = ("import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"up"
    yield port, p
    p.kill()
    p.wait()


def test_doctor_names_a_taken_port_and_exits_nonzero(tmp_path: Path, listener: tuple[int, Any]) -> None:
    port, proc = listener
    r = _cli("doctor", str(_config(tmp_path, port=port)))
    assert r.returncode == 1, r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("fail") and "server port" in ln)
    assert f"port {port} on 127.0.0.1 is in use by python" in line and f"pid {proc.pid}" in line
    assert f"kill {proc.pid}" in r.stdout and "inference.port=<free port>" in r.stdout


def test_run_refuses_to_start_when_a_preflight_check_fails(tmp_path: Path, listener: tuple[int, Any]) -> None:
    port, _ = listener
    r = _cli("run", str(_config(tmp_path, port=port)))
    assert r.returncode == 2
    assert f"port {port}" in r.stderr and "refusing to start" in r.stderr
    assert not (tmp_path / "runs" / "c" / "logs").exists()  # nothing was started


def test_doctor_on_this_cpu_machine_reports_no_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor_main(None) == 0
    out = capsys.readouterr().out
    gpus = next(ln for ln in out.splitlines() if "gpus" in ln)
    assert gpus.startswith("ok") and "no GPU" in gpus
    assert not [ln for ln in out.splitlines() if ln.startswith("fail")]


def test_doctor_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor_main(_cfg(tmp_path), as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True
    names = {c["name"] for c in data["checks"]}
    assert {"python", "torch", "transformers", "gpus", "server port", "nccl shell", "proxy", "/dev/shm", "disk",
            "model", "gpu overlap"} <= names
    assert all(set(c) == {"name", "status", "message", "fix"} for c in data["checks"])


def test_config_that_needs_gpus_fails_on_a_cpu_machine(tmp_path: Path) -> None:
    results = run_checks(_cfg(tmp_path, inference={"gpus": 1}), fast_only=True, env={})
    (gpus,) = _by_name(results, "gpus")
    assert gpus.status == FAIL and "needs 1" in gpus.message and gpus.fix


def test_nccl_typo_in_the_shell_gets_a_did_you_mean(tmp_path: Path) -> None:
    results = run_checks(_cfg(tmp_path), fast_only=True, env={"NCCL_P2P_DISABEL": "1"})
    (typo,) = [r for r in _by_name(results, "nccl shell") if "NCCL_P2P_DISABEL" in r.message]
    assert typo.status == WARN and "did you mean NCCL_P2P_DISABLE?" in typo.message


def test_shell_nccl_variable_that_contradicts_the_config_is_reported(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, nccl={"P2P_DISABLE": 1})
    results = run_checks(cfg, fast_only=True, env={"NCCL_P2P_DISABLE": "0"})
    (bad,) = [r for r in _by_name(results, "nccl shell") if r.status == WARN]
    assert "NCCL_P2P_DISABLE=0 in your shell contradicts the config" in bad.message and "unset" in (bad.fix or "")
    agree = run_checks(cfg, fast_only=True, env={"NCCL_P2P_DISABLE": "1"})
    assert [r.status for r in _by_name(agree, "nccl shell")] == [OK]


def test_proxy_without_loopback_in_no_proxy_warns(tmp_path: Path) -> None:
    (r,) = _by_name(run_checks(None, fast_only=True, env={"https_proxy": "http://proxy:3128"}), "proxy")
    assert r.status == WARN and "no_proxy" in (r.fix or "")
    (r,) = _by_name(run_checks(None, fast_only=True, env={"https_proxy": "http://p:1", "no_proxy": "localhost,127.0.0.1"}),
                    "proxy")
    assert r.status == OK


def test_gpu_checks_with_two_gpus_and_no_p2p(tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=2, p2p=False))
    cfg = _cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, nccl={})
    results = run_checks(cfg, fast_only=True, env={}, nvml=nvml)
    assert _by_name(results, "gpus")[0].status == OK and "2 x NVIDIA H100" in _by_name(results, "gpus")[0].message
    assert _by_name(results, "gpu count")[0].status == OK
    (p2p,) = _by_name(results, "nccl p2p")
    assert p2p.status == WARN and "P2P_DISABLE = 1" in (p2p.fix or "")
    (overlap,) = _by_name(results, "gpu overlap")
    assert overlap.status == OK and "server GPUs [0], trainer GPUs [1]" in overlap.message
    # with P2P_DISABLE set the same machine is fine
    fixed = run_checks(_cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, nccl={"P2P_DISABLE": 1}),
                       fast_only=True, env={}, nvml=nvml)
    assert _by_name(fixed, "nccl p2p")[0].status == OK


def test_too_many_gpus_requested_fails(tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=2))
    results = run_checks(_cfg(tmp_path, inference={"gpus": 2}, trainer={"gpus": 1}), fast_only=True, env={},
                         nvml=nvml)
    (count,) = _by_name(results, "gpu count")
    assert count.status == FAIL and "= 3, but 2 visible" in count.message


def test_shared_gpus_are_a_warning(tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=1))
    cfg = _cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, run={"share_gpus": True})
    (overlap,) = _by_name(run_checks(cfg, fast_only=True, env={}, nvml=nvml), "gpu overlap")
    assert overlap.status == WARN and "GPU 0 shared" in overlap.message


def test_vllm_engine_that_cannot_import_vllm_fails(tmp_path: Path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    cfg = _cfg(tmp_path, inference={"engine": "vllm", "python": str(missing)})
    (v,) = _by_name(run_checks(cfg, fast_only=True, env={}), "vllm")
    assert v.status == FAIL and "does not exist" in v.message and "install-vllm-cpu.sh" in (v.fix or "")
    assert str(missing) in v.message
    assert format_check(v).startswith("fail  vllm") and str(missing) in format_check(v).splitlines()[0]



def test_full_vllm_check_warns_on_a_build_that_does_not_match_inference_gpus(tmp_path: Path) -> None:
    from vlmrl_tui.doctor import check_vllm

    py = sys.executable
    base = {"importable": True, "version": "0.99.0", "distributions": ["vllm"], "torch_version": "2.14.1",
            "platform": "cpu", "flags": {}, "missing_flags": [], "weight_transfer_backends": ["gloo"],
            "vlmrl_engine": True}
    cpu_on_gpu = check_vllm(_cfg(tmp_path, inference={"engine": "vllm", "python": py, "gpus": 1}), False,
                            probe=lambda _py, _flags: {**base, "torch_cuda": None})
    assert cpu_on_gpu[0].status == WARN and "CPU build" in cpu_on_gpu[0].message
    assert "inference.gpus = 1" in cpu_on_gpu[0].message
    cuda_on_cpu = check_vllm(_cfg(tmp_path, inference={"engine": "vllm", "python": py}), False,
                             probe=lambda _py, _flags: {**base, "torch_cuda": "12.8", "vlmrl_engine": False,
                                                        "vlmrl_engine_error": "ImportError: boom"})
    by = {r.name: r for r in cuda_on_cpu}
    assert by["vllm"].status == WARN and "CUDA 12.8 build" in by["vllm"].message and "install-vllm-cpu" in (
        by["vllm"].fix or "")
    assert by["vllm flags"].status == OK
    assert by["vllm engine"].status == FAIL and "ImportError: boom" in by["vllm engine"].message

VLLM_VENV_PY = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm_venv = pytest.mark.skipif(
    not VLLM_VENV_PY.is_file(),
    reason=f"{VLLM_VENV_PY} is missing: run scripts/install-vllm-cpu.sh to test doctor against a real vllm-cpu")


def _vllm_config(tmp_path: Path, args: str = "") -> Path:
    """A vllm-engine config; ``args`` are extra ``[inference.args]`` lines."""
    p = tmp_path / "vllm.toml"
    p.write_text(f"""model = "builtin:tiny-qwen3-vl"
[env]
id = "colors"
[inference]
engine = "vllm"
port = {free_port()}
[inference.args]
max_model_len = 1024
{args}
[trainer.args]
output_dir = "{tmp_path / 'runs'}"
max_steps = 3
""")
    return p


@needs_vllm_venv
def test_fast_vllm_check_reads_the_version_without_importing_vllm(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, inference={"engine": "vllm", "python": str(VLLM_VENV_PY)})
    (v,) = _by_name(run_checks(cfg, fast_only=True, env={}), "vllm")
    assert v.status == OK and v.message.startswith("vllm") and str(VLLM_VENV_PY) in v.message


@pytest.mark.slow
@pytest.mark.timeout(400)
@needs_vllm_venv
def test_full_doctor_reports_the_vllm_version_and_cpu_build(tmp_path: Path) -> None:
    r = _cli("doctor", str(_vllm_config(tmp_path, "")))
    lines = r.stdout.splitlines()

    def line(name: str) -> str:
        (found,) = [ln for ln in lines if ln[6:19].strip() == name]  # "ok    vllm flags    ..."
        return found

    vllm = line("vllm")
    version = subprocess.run([str(VLLM_VENV_PY), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    assert vllm.startswith("ok") and f"vllm-cpu {version} imports; CPU build" in vllm and "platform cpu" in vllm, r.stdout
    flags = line("vllm flags")
    assert flags.startswith("ok") and f"exist in vLLM {version}" in flags, r.stdout
    engine = line("vllm engine")
    assert engine.startswith("ok") and "vlmrl_nccl" in engine, r.stdout
    assert r.returncode == 0, r.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
@needs_vllm_venv
def test_full_doctor_fails_on_an_inference_arg_vllm_does_not_know(tmp_path: Path) -> None:
    from backend.config import load_config

    cfg = load_config(_vllm_config(tmp_path, "definitely_not_a_flag = 1"))
    results = run_checks(cfg, env={})
    (flags,) = _by_name(results, "vllm flags")
    assert flags.status == FAIL
    assert "--definitely-not-a-flag (inference.args.definitely_not_a_flag)" in flags.message
    assert "remove definitely_not_a_flag from [inference.args]" in (flags.fix or "")
    assert "--max-model-len" not in flags.message  # only the unknown one is named
    assert _by_name(results, "vllm")[0].status == OK


def test_model_checks(tmp_path: Path) -> None:
    assert check_model(_cfg(tmp_path, model="builtin:tiny-qwen9"), {}).status == FAIL
    empty = tmp_path / "model"
    empty.mkdir()
    bad = check_model(_cfg(tmp_path, model=str(empty)), {})
    assert bad.status == FAIL and "config.json" in bad.message
    (empty / "config.json").write_text("{}")
    assert check_model(_cfg(tmp_path, model=str(empty)), {}).status == OK
    offline = check_model(_cfg(tmp_path, model="nobody/not-a-model-xyz"), {"HF_HUB_OFFLINE": "1"})
    assert offline.status == FAIL and "HF_HUB_OFFLINE" in offline.message


def test_format_check_puts_the_fix_under_the_problem() -> None:
    text = format_check(CheckResult("server port", FAIL, "port 8000 is in use", "kill 12"))
    assert text.splitlines()[0].startswith("fail  server port") and "fix: kill 12" in text.splitlines()[1]
    assert "fix" not in format_check(CheckResult("python", OK, "3.11", "never shown"))


def test_fast_checks_import_no_torch(tmp_path: Path) -> None:
    code = ("import sys; from backend.config import load_config; from vlmrl_tui.doctor import run_checks; "
            f"run_checks(load_config({str(_config(tmp_path))!r}), fast_only=True); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_port_check_sees_a_port_taken_in_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        results = run_checks(_cfg(tmp_path, inference={"port": port}), fast_only=True, env={})
        (r,) = _by_name(results, "server port")
        assert r.status == FAIL and f"port {port}" in r.message and f"pid {os.getpid()}" in r.message


def test_nccl_typo_in_the_config_gets_a_did_you_mean(tmp_path: Path) -> None:
    r = _cli("doctor", str(_config(tmp_path, extra="[nccl]\nP2P_DISABEL = 1")))
    assert r.returncode == 2
    assert "nccl.P2P_DISABEL: unknown NCCL variable; did you mean 'P2P_DISABLE'?" in r.stderr
