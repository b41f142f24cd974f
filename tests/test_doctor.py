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
from vlmrl_tui.doctor import (  # noqa: E402
    FAIL,
    OK,
    SKIP,
    WARN,
    CheckResult,
    check_model,
    doctor_main,
    format_check,
    run_checks,
)
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
    results = run_checks(_cfg(tmp_path, trainer={"gpus": 1}), fast_only=True, env={"CUDA_VISIBLE_DEVICES": "0"})
    (gpus,) = _by_name(results, "gpus")
    assert gpus.status == FAIL and gpus.fix
    # which process asks for how many, what was found (NVML, then torch in a real subprocess), and the shell's value
    assert gpus.message.startswith("the trainer (trainer.gpus = 1) asks for GPUs, but there is no usable CUDA device")
    assert "no NVIDIA driver" in gpus.message and "torch sees 0 CUDA devices" in gpus.message
    assert "CUDA_VISIBLE_DEVICES='0'" in gpus.message


def test_vlmrl_run_refuses_a_gpu_config_without_cuda(tmp_path: Path) -> None:
    r = _cli("run", str(_config(tmp_path, extra="device = \"cuda\"\n[trainer]\ngpus = 1")))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "the trainer (trainer.gpus = 1) asks for GPUs, but there is no usable CUDA device" in r.stderr
    assert "refusing to start" in r.stderr and not (tmp_path / "runs" / "c" / "logs").exists()


def test_without_nvml_the_device_count_comes_from_torch(tmp_path: Path) -> None:
    from vlmrl_tui.doctor_gpu import check_gpus
    from vlmrl_tui.gpu import take_snapshot

    no_nvml = take_snapshot(Nvml(loader=lambda: make_fake_nvml(no_library=True)))
    cfg = _cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1})
    # A container without the utility capability: NVML fails, CUDA (torch) sees the GPUs.
    asked: list[str | None] = []

    def torch_sees_two(env: Any) -> int:
        asked.append(env.get("CUDA_VISIBLE_DEVICES"))
        return 2

    gpus, count = check_gpus(cfg, {"CUDA_VISIBLE_DEVICES": "0,1"}, no_nvml, True, count_devices=torch_sees_two)
    assert gpus.status == WARN and "torch sees 2 CUDA device(s)" in gpus.message and "utility" in (gpus.fix or "")
    assert count.status == OK and "= 2; 2 visible" in count.message and asked == ["0,1"]
    # the real subprocess on this CPU machine: torch sees no device, so the run is refused
    (real,) = check_gpus(cfg, {}, no_nvml, True)
    assert real.status == FAIL and "torch sees 0 CUDA devices" in real.message


def test_fast_checks_count_devices_without_importing_torch(tmp_path: Path) -> None:
    config = str(_config(tmp_path, extra="[trainer]\ngpus = 1"))
    code = ("import sys; from backend.config import load_config; from vlmrl_tui.doctor import run_checks; "
            f"r = run_checks(load_config({config!r}), fast_only=True); "
            "print([c.message for c in r if c.name == 'gpus'][0]); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    message, imported = r.stdout.strip().splitlines()[-2:]
    assert "torch sees 0 CUDA devices" in message and imported == "False"


def _torch_install(root: Path, cuda: str | None) -> list[str]:
    """A torch distribution on disk (metadata and version.py) that says which CUDA it was built for."""
    info = root / "torch-2.14.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.14.1\n")
    (root / "torch").mkdir()
    (root / "torch" / "version.py").write_text(f"from typing import Optional\ncuda: Optional[str] = {cuda!r}\n")
    return [str(root)]


def test_driver_older_than_torchs_cuda_build(tmp_path: Path) -> None:
    from vlmrl_tui.doctor_gpu import check_cuda_build, torch_cuda_build
    from vlmrl_tui.gpu import take_snapshot

    def snapshot(cuda: int) -> Any:
        mod = make_fake_nvml(gpus=1)
        mod.nvmlSystemGetCudaDriverVersion_v2 = lambda: cuda  # type: ignore[attr-defined]
        return take_snapshot(Nvml(loader=lambda: mod))

    cfg = _cfg(tmp_path, trainer={"gpus": 1})
    build = torch_cuda_build()  # this python's torch, read from disk
    assert build is not None and build.startswith("13.")  # the pinned torch==2.14.1+cu130
    (old,) = check_cuda_build(cfg, snapshot(12040))
    assert old.status == FAIL and f"driver supports CUDA 12.4, torch is built for CUDA {build}" in old.message
    assert "upgrade the NVIDIA driver" in (old.fix or "") and "whl/cu124" in (old.fix or "")
    assert check_cuda_build(cfg, snapshot(13020))[0].status == OK
    (minor,) = check_cuda_build(cfg, snapshot(13000), _torch_install(tmp_path / "a", "13.1"))
    assert minor.status == WARN and "minor-version compatibility" in minor.message
    (cpu,) = check_cuda_build(cfg, snapshot(13000), _torch_install(tmp_path / "b", None))
    assert cpu.status == FAIL and "CPU build" in cpu.message and "the trainer (trainer.gpus = 1)" in cpu.message
    assert check_cuda_build(_cfg(tmp_path), snapshot(13000), _torch_install(tmp_path / "c", None)) == []


def _old_nccl(root: Path) -> dict[str, str]:
    """An environment whose python finds NCCL 2.21.5 first (its wheel's metadata on PYTHONPATH)."""
    info = root / "nvidia_nccl_cu13-2.21.5.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-nccl-cu13\nVersion: 2.21.5\n")
    return {"PYTHONPATH": str(root)}


def test_shared_gpu_is_checked_against_what_nccl_allows(tmp_path: Path) -> None:
    from vlmrl_tui.doctor_gpu import nccl_version

    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=1))
    shared = {"inference": {"gpus": 1}, "trainer": {"gpus": 1}, "run": {"share_gpus": True}}
    real = nccl_version(sys.executable, {})
    assert real is not None and real >= (2, 30)  # torch==2.14.1 ships NCCL 2.30
    (ok,) = _by_name(run_checks(_cfg(tmp_path, **shared), fast_only=True, env={}, nvml=nvml), "nccl sharing")
    assert ok.status == OK and f"NCCL trainer {'.'.join(map(str, real))}" in ok.message
    assert "NCCL_MULTI_RANK_GPU_ENABLE=1" in ok.message
    (off,) = _by_name(run_checks(_cfg(tmp_path, **shared, nccl={"MULTI_RANK_GPU_ENABLE": 0}), fast_only=True,
                                 env={}, nvml=nvml), "nccl sharing")
    assert off.status == FAIL and "Duplicate GPU detected" in off.message and "MULTI_RANK_GPU_ENABLE = 0" in off.message
    (old,) = _by_name(run_checks(_cfg(tmp_path, **shared), fast_only=True, env=_old_nccl(tmp_path), nvml=nvml),
                      "nccl sharing")
    assert old.status == FAIL and "NCCL is 2.21.5" in old.message and "run.share_gpus = false" in (old.fix or "")


def test_gpu_count_suggests_share_gpus_only_where_nccl_allows_it(tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=1))
    two = {"inference": {"gpus": 1}, "trainer": {"gpus": 1}}

    def fix(env: dict[str, str], **tables: Any) -> str:
        (count,) = _by_name(run_checks(_cfg(tmp_path, **two, **tables), fast_only=True, env=env, nvml=nvml),
                            "gpu count")
        assert count.status == FAIL
        return count.fix or ""

    assert "or set run.share_gpus = true" in fix({})
    refused = fix(_old_nccl(tmp_path))
    assert "run.share_gpus = true would not work: the trainer's NCCL is 2.21.5" in refused
    assert "would not work: [nccl] sets MULTI_RANK_GPU_ENABLE = 0" in fix({}, nccl={"MULTI_RANK_GPU_ENABLE": 0})


def _mig_nvml() -> Nvml:
    """One GPU split into two MIG slices, as NVML describes them."""
    mod = make_fake_nvml(gpus=1)
    slices = {"MIG-aaaa": {"index": 0, "mig": 1}, "MIG-bbbb": {"index": 0, "mig": 2}}
    mod.nvmlDeviceGetHandleByUUID = slices.__getitem__  # type: ignore[attr-defined]
    mod.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda h: {"index": h["index"]}  # type: ignore[attr-defined]
    mod.nvmlDeviceGetIndex = lambda h: h["index"]  # type: ignore[attr-defined]
    return Nvml(loader=lambda: mod)


def test_mig_slices_of_one_gpu_are_a_shared_gpu_for_nccl(tmp_path: Path) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "MIG-aaaa,MIG-bbbb"}
    cfg = _cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1})
    results = run_checks(cfg, fast_only=True, env=env, nvml=_mig_nvml())
    (mig,) = _by_name(results, "nccl sharing")
    assert mig.status == FAIL and "MIG slices of GPU 0" in mig.message and "Duplicate GPU" in mig.message
    assert "add MULTI_RANK_GPU_ENABLE = 1 to [nccl]" in (mig.fix or "")
    assert _by_name(results, "nccl p2p")[0].status == OK  # MIG slices have no P2P to check
    assert _by_name(results, "gpu count")[0].status == OK  # two slices are two CUDA devices
    fixed = run_checks(_cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, nccl={"MULTI_RANK_GPU_ENABLE": 1}),
                       fast_only=True, env=env, nvml=_mig_nvml())
    assert _by_name(fixed, "nccl sharing")[0].status == OK


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


def test_p2p_is_checked_between_every_pair_of_gpus_the_run_uses(tmp_path: Path) -> None:
    mod = make_fake_nvml(gpus=3)
    mod.nvmlDeviceGetP2PStatus = lambda a, b, i: 5 if {a["index"], b["index"]} == {1, 2} else 0  # type: ignore
    cfg = _cfg(tmp_path, inference={"gpus": 2}, trainer={"gpus": 1}, nccl={})
    (p2p,) = _by_name(run_checks(cfg, fast_only=True, env={}, nvml=Nvml(loader=lambda: mod)), "nccl p2p")
    assert p2p.status == WARN and "no P2P between GPU 1<->2" in p2p.message and "0<->1" not in p2p.message


def test_p2p_disable_where_p2p_works_is_a_warning(tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=2, p2p=True))
    cfg = _cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, nccl={"P2P_DISABLE": 1})
    (p2p,) = _by_name(run_checks(cfg, fast_only=True, env={}, nvml=nvml), "nccl p2p")
    assert p2p.status == WARN and "host shared memory" in p2p.message and "remove P2P_DISABLE" in (p2p.fix or "")
    clean = _cfg(tmp_path, inference={"gpus": 1}, trainer={"gpus": 1}, nccl={})
    (ok,) = _by_name(run_checks(clean, fast_only=True, env={}, nvml=nvml), "nccl p2p")
    assert ok.status == OK and ok.message == "GPU 0<->1 support P2P"


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


# ----- the trainer's memory estimate against the GPUs (full doctor) -----


def _memory(cfg: Any, nvml: Nvml, tmp_path: Path, env: dict[str, str] | None = None) -> list[CheckResult]:
    from vlmrl_tui.doctor_gpu import check_memory
    from vlmrl_tui.gpu import take_snapshot
    from vlmrl_tui.plan import build_plan

    plan = build_plan(cfg, None, base_env=env or {}, sync_port=1, token="t", cwd=tmp_path)
    return check_memory(cfg, plan, take_snapshot(nvml), nvml)


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Qwen3-VL-8B directory: its real config.json, no weights (the doctor reads only the config)."""
    from backend.memory import qwen3_vl_8b_config

    path = tmp_path_factory.mktemp("qwen3-vl-8b")
    qwen3_vl_8b_config().save_pretrained(path)
    return path


def _recipe(model: Path, tmp_path: Path, *overrides: str) -> Any:
    from backend.config import load_config

    return load_config(ROOT / "configs" / "qwen3-vl-8b-colors.toml",
                       [f"model='{model}'", f"trainer.args.output_dir='{tmp_path}'", *overrides])


def test_memory_of_the_8b_recipe_fits_an_80gb_card(model_8b: Path, tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=2))
    (mem,) = _memory(_recipe(model_8b, tmp_path), nvml, tmp_path)
    assert mem.status == OK, mem.message
    assert mem.message.startswith("GPU 1 (80.0 GiB): ~75.") and "stochastic-rounding" in mem.message
    assert "weights 16.3, grads 16.3, AdamW state 32.7" in mem.message  # the breakdown, in GiB


def test_memory_that_does_not_fit_fails_with_what_would_fit(model_8b: Path, tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=2))
    (master,) = _memory(_recipe(model_8b, tmp_path, 'trainer.args.low_precision_update="fp32-master"'), nvml, tmp_path)
    assert master.status == FAIL and "does not fit" in master.message and "fp32 master weights 32.7" in master.message
    assert 'low_precision_update = "stochastic-rounding" with dtype = "bfloat16" (~75 GiB)' in (master.fix or "")
    assert "coming: LoRA, and trainer.gpus > 1 with FSDP" in (master.fix or "")
    (long,) = _memory(_recipe(model_8b, tmp_path, "inference.args.max_model_len=8192"), nvml, tmp_path)
    assert long.status == FAIL and "4 x 8192 tokens" in long.message
    assert "trainer.args.micro_batch_size = 1 (~75 GiB)" in (long.fix or "")
    assert "inference.args.max_model_len = 2048 (~75 GiB)" in (long.fix or "")
    assert "micro_batch_size = 2" not in (long.fix or "")  # only the largest that fits is named
    (plain,) = _memory(_recipe(model_8b, tmp_path, "trainer.args.gradient_checkpointing=false"), nvml, tmp_path)
    assert plain.status == FAIL and "gradient_checkpointing = true (~75 GiB)" in (plain.fix or "")


def test_memory_on_a_gpu_shared_with_vllm_counts_the_servers_share(model_8b: Path, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    nvml = Nvml(loader=lambda: make_fake_nvml(gpus=1))
    (big,) = _memory(_recipe(model_8b, tmp_path, "run.share_gpus=true"), nvml, tmp_path)
    assert big.status == FAIL and "64.0 GiB of it the server's" in big.message  # gpu_memory_utilization 0.8
    assert (big.fix or "").startswith("run.share_gpus = false: the trainer needs ~75 GiB and the server ~16 GiB")
    tiny = _cfg(tmp_path, model=str(tiny_model_dir), inference={"engine": "vllm", "gpus": 1,
                                                                 "args": {"gpu_memory_utilization": 0.99}},
                trainer={"gpus": 1}, run={"share_gpus": True})
    (small,) = _memory(tiny, nvml, tmp_path)
    assert small.status == FAIL and "79.2 GiB of it the server's" in small.message
    assert (small.fix or "").startswith("inference.args.gpu_memory_utilization = 0.9")
    fixed = float((small.fix or "").split(" = ")[1].split()[0])
    (ok,) = _memory(_cfg(tmp_path, model=str(tiny_model_dir), inference={
        "engine": "vllm", "gpus": 1, "args": {"gpu_memory_utilization": fixed}}, trainer={"gpus": 1},
        run={"share_gpus": True}), nvml, tmp_path)
    assert ok.status == OK, ok.message  # the suggested share is enough


def test_memory_without_a_gpu_still_prints_the_estimate(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, trainer={"gpus": 1})
    (mem,) = _memory(cfg, Nvml(), tmp_path)  # the real NVML: no driver on this machine
    assert mem.status == SKIP and "GiB peak (float32" in mem.message and "no NVIDIA driver" in mem.message
    (cpu,) = _memory(_cfg(tmp_path), Nvml(), tmp_path)
    assert cpu.status == SKIP and cpu.message.startswith("trainer on CPU (trainer.gpus = 0)")
    (gone,) = _memory(_cfg(tmp_path, model="nobody/not-a-model-xyz", trainer={"gpus": 1}), Nvml(), tmp_path)
    assert gone.status == SKIP and "not in the Hugging Face cache" in gone.message


def test_the_environment_check_builds_multi_turn_environments_too(tmp_path: Path) -> None:
    from vlmrl_tui.doctor import check_env_id

    assert check_env_id(_cfg(tmp_path, env={"id": "crafter", "args": {"episode_length": 3}}), fast=False).status == OK
    bad = check_env_id(_cfg(tmp_path, env={"id": "crafter", "args": {"size": "big"}}), fast=False)
    assert bad.status == FAIL and "crafter" in bad.message
    assert check_env_id(_cfg(tmp_path), fast=False).status == OK


def test_an_environment_module_passes_the_environment_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A [env] id naming an installed module with load_environment (the verifiers convention) is not
    'unknown': the fast preflight finds the module, the full doctor builds it."""
    from vlmrl_tui.doctor import check_env_id

    pkg = tmp_path / "pkgs" / "my_vlm_env"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from environments.colors import make_colors\n\n\n"
                                     "def load_environment(**kw):\n    return make_colors(**kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    cfg = _cfg(tmp_path, env={"id": "my-vlm-env"})
    assert check_env_id(cfg, fast=True).status == OK
    assert check_env_id(cfg, fast=False).status == OK
    bad = check_env_id(_cfg(tmp_path, env={"id": "no-such-env"}), fast=True)
    assert bad.status == FAIL and "no module 'no_such_env'" in bad.message


def test_trackers_check_names_a_tracker_that_is_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmrl_tui.doctor import check_trackers

    assert check_trackers(_cfg(tmp_path)).status == OK
    both = _cfg(tmp_path, trainer={"args": {"output_dir": str(tmp_path), "report_to": ["tensorboard", "wandb"]}})
    assert check_trackers(both).status == OK  # both in the dev extras
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    r = check_trackers(both)
    assert r.status == WARN and "wandb" in r.message and "tensorboard" not in r.message
    assert r.fix == "pip install -e '.[wandb]'"
    assert [c.name for c in run_checks(both, fast_only=True) if c.name == "trackers"] == ["trackers"]
