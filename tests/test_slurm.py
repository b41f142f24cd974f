"""`vlmrl run --slurm` on a real SLURM cluster of three simulated nodes on this host
(scripts/slurm-local.sh: Debian's slurm-wlm + munge; `.ci/run` installs them as root): the
server on one node, the trainer on one node (two ranks) or on two (torchrun's multi-node
rendezvous, one rank each); Ctrl-C, scancel and a lost node end the job on every node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import tomli_w

from backend.config import validate_config
from backend.net import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
NODES = 3


def _config(tmp_path: Path, processes: int = 2, **slurm: object) -> Path:
    data = {
        "model": "builtin:tiny-qwen3-vl", "env": {"id": "colors", "args": {"num_colors": 5, "image_size": 64}},
        "inference": {"engine": "hf", "port": free_port(),
                      "args": {"max_model_len": 1024, "limit_mm_per_prompt": {"image": 1}, "dtype": "float32"}},
        "trainer": {"processes": processes, "args": {
            "run_name": "sl", "output_dir": str(tmp_path / "runs"), "max_steps": 4, "batch_size": 16,
            "micro_batch_size": 16, "rollouts_per_step": 8, "max_tokens": 4, "torch_threads": 1, "save_every": 2}},
        "slurm": {"partition": "debug", "time": "00:20:00", **slurm},
    }
    path = tmp_path / "sl.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path: Path) -> None:
    cfg = _config(tmp_path, account="proj", gpus_per_node=0, sbatch=["--qos=high"],
                  setup=["module load cuda", "source .venv/bin/activate"])
    r = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg), "--slurm", "--dry-run",
                        "trainer.args.max_steps=7"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=debug",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=00:20:00", "#SBATCH --no-requeue",
                 f"#SBATCH --output={tmp_path / 'runs' / 'sl' / 'logs' / 'slurm-%j.out'}",
                 "module load cuda", "source .venv/bin/activate"):
        assert want in lines, want
    assert lines.index("module load cuda") < len(lines) - 1
    assert lines[-1].startswith("exec ") and lines[-1].endswith(f"run {cfg} trainer.args.max_steps=7 --slurm-job")
    assert not (tmp_path / "runs").exists()


def test_slurm_table_is_validated() -> None:
    from backend.errors import ConfigError

    base = {"model": "m", "env": {"id": "colors"}}
    assert validate_config({**base, "slurm": {"trainer_nodes": 2}}).slurm.trainer_nodes == 2  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="slurm.inference_nodes"):
        validate_config({**base, "slurm": {"inference_nodes": 0}})
    with pytest.raises(ConfigError, match="slurm.partiton: unknown key"):
        validate_config({**base, "slurm": {"partiton": "x"}})
    with pytest.raises(ConfigError, match="slurm.sbatch"):
        validate_config({**base, "slurm": {"sbatch": ["qos=high"]}})


def test_a_run_inside_a_job_is_placed_by_srun_on_its_nodes(tmp_path: Path) -> None:
    from vlmrl_tui.plan import Placement, build_plan

    cfg = validate_config(json.loads(json.dumps({
        "model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"},
        "trainer": {"processes": 2, "args": {"output_dir": str(tmp_path)}},
        "slurm": {"inference_nodes": 1, "trainer_nodes": 2, "socket_ifname": "ib0", "rdzv_port": 29555}})))
    plan = build_plan(cfg, None, sync_port=free_port(),
                      placement=Placement("42", ("a1",), ("b1", "b2"), "10.0.0.1", "10.0.0.2"))
    server, trainer = plan.process("server"), plan.process("trainer")
    assert server.argv[:2] == ("srun", "--nodes=1") and "--nodelist=a1" in server.argv
    assert trainer.argv[:2] == ("srun", "--nodes=2") and "--nodelist=b1,b2" in trainer.argv
    assert "--nnodes=2" in trainer.argv and "--nproc-per-node=2" in trainer.argv
    assert "--rdzv-endpoint=10.0.0.2:29555" in trainer.argv
    assert plan.server_url.startswith("http://10.0.0.1:")
    assert "host = \"0.0.0.0\"" in plan.config_toml  # the server listens for the trainer's nodes
    env = trainer.env
    assert env["VLMRL_SYNC_HOST"] == "10.0.0.2" and env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert plan.slurm_job == "42" and plan.nodes == {"server": ("a1",), "trainer": ("b1", "b2")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("SLURM is not installed here (scripts/slurm-local.sh install, as root; .ci/run does it)")
    d = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_LOCAL_CTLD_PORT=str(free_port()), SLURM_LOCAL_NODE_PORT=str(_free_ports(NODES)),
               SLURM_LOCAL_NODES=str(NODES))
    out = subprocess.run(["bash", str(SCRIPT), "start", str(d)], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    conf = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    try:
        yield {**env, "SLURM_CONF": conf}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120, env=env)


def _free_ports(n: int) -> int:
    """The first of ``n`` free ports in a row (the nodes' slurmd ports)."""
    import socket

    for _ in range(50):
        p = free_port()
        try:
            for k in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + k))
            return p
        except OSError:
            continue
    raise RuntimeError(f"no {n} free ports in a row")


def _leftovers(marker: str) -> list[str]:
    """Processes whose command line names ``marker`` (the run's config), zombies aside."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or []):
            out.append(" ".join(p.info["cmdline"]))
    return out


def _queue(env: dict[str, str]) -> str:
    return subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env, timeout=30).stdout.strip()


@pytest.mark.slow
def test_a_run_across_three_nodes_completes_and_run_json_says_where(cluster: dict[str, str], tmp_path: Path,
                                                                    tiny_model_dir: Path) -> None:
    """The server on n1; the trainer on n2 and n3, one rank each (torchrun's c10d rendezvous)."""
    cfg = _config(tmp_path, processes=1, trainer_nodes=2, rdzv_port=free_port())
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg), "--slurm"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=cluster)
    wall = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    rd = tmp_path / "runs" / "sl"
    info = json.loads((rd / "run.json").read_text())
    print(f"\nSLURM run: {wall:.0f} s wall, job {info['slurm_job']}, nodes {info['nodes']}")
    assert info["status"] == "completed" and info["slurm_job"] and info["slurm_job"] in r.stdout
    assert info["nodes"] == {"server": ["n1"], "trainer": ["n2", "n3"]}
    assert "submitted job" in r.stdout and "completed: 4/4 steps" in r.stdout
    assert [json.loads(x)["step"] for x in (rd / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert "2 ranks (FSDP2 over gloo)" in (rd / "logs" / "trainer.log").read_text()
    assert (rd / "slurm.sbatch").is_file() and (rd / "logs" / f"slurm-{info['slurm_job']}.out").is_file()
    assert _queue(cluster) == "" and _leftovers(str(cfg)) == []
    # attach from "the login node" to the finished run
    a = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "attach", str(rd)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT, env=cluster)
    assert a.returncode == 0 and "completed" in a.stdout


@pytest.mark.slow
def test_ctrl_c_on_the_submitting_run_cancels_the_job_on_every_node(cluster: dict[str, str], tmp_path: Path,
                                                                   tiny_model_dir: Path) -> None:
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text().replace("max_steps = 4", "max_steps = 400"))
    rd = tmp_path / "runs" / "sl"
    p = subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg), "--slurm"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=cluster)
    try:
        deadline = time.monotonic() + 300
        while not ((rd / "metrics.jsonl").is_file() and (rd / "metrics.jsonl").read_text().count("\n") >= 2):
            assert p.poll() is None and time.monotonic() < deadline, "no step trained"
            time.sleep(0.5)
        # `vlmrl attach` (from "the login node") follows the live run: a new step line comes
        a = subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", "attach", str(rd)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=cluster)
        seen = []
        try:
            assert a.stdout is not None
            for line in a.stdout:
                seen.append(line)
                if line.startswith("step ") and len([x for x in seen if x.startswith("step ")]) >= 2:
                    break
        finally:
            a.send_signal(signal.SIGINT)  # detach: the run goes on
            a.communicate(timeout=30)
        assert any("attached to sl" in x for x in seen), seen
        assert _leftovers(str(cfg)), "the run's processes should be running"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-4000:]
    assert "cancelling job" in out
    deadline = time.monotonic() + 60
    while (_queue(cluster) or _leftovers(str(cfg))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _queue(cluster) == "" and _leftovers(str(cfg)) == []


def _scontrol(env: dict[str, str], *args: str) -> None:
    r = subprocess.run(["scontrol", *args], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def _all_idle(env: dict[str, str]) -> bool:
    out = subprocess.run(["sinfo", "-h", "-o", "%t %D"], capture_output=True, text=True, env=env, timeout=30).stdout
    return out.strip() == f"idle {NODES}"


def _submit(cfg: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg), "--slurm", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)


def _wait_for(cond: Any, p: subprocess.Popen[str], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if p.poll() is not None or time.monotonic() > deadline:
            out = p.communicate(timeout=30)[0] if p.poll() is not None else "(still running)"
            pytest.fail(f"{what}: {out[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_lost_node_or_scancel_ends_the_run_with_slurms_account_and_resume_continues(
        cluster: dict[str, str], tmp_path: Path, tiny_model_dir: Path) -> None:
    """n3 (a trainer node) goes DOWN mid-run: the job is not requeued, the submitting run exits 1
    and run.json says NODE_FAIL; --resume continues; scancel from elsewhere stops it (run.json
    says so); --resume then completes with every step once."""
    from backend.records import RunInfo

    cfg = _config(tmp_path, processes=1, trainer_nodes=2, rdzv_port=free_port())
    cfg.write_text(cfg.read_text().replace("max_steps = 4", "max_steps = 400"))
    rd = tmp_path / "runs" / "sl"
    p = _submit(cfg, cluster)
    try:
        _wait_for(lambda: (rd / "checkpoints" / "2" / "COMPLETE").is_file(), p, "no checkpoint 2")
        _scontrol(cluster, "update", "NodeName=n3", "State=DOWN", "Reason=vlmrl-test")
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, out[-4000:]
    info = RunInfo.read(rd / "run.json")
    assert info is not None and info.status == "failed" and "NODE_FAIL" in (info.reason or ""), info
    assert f"SLURM job {info.slurm_job} ended NODE_FAIL" in out or "NODE_FAIL" in out.splitlines()[-1], out[-2000:]
    deadline = time.monotonic() + 60
    while (_queue(cluster) or _leftovers(str(cfg))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _queue(cluster) == "" and _leftovers(str(cfg)) == []
    if not _all_idle(cluster):
        _scontrol(cluster, "update", "NodeName=n3", "State=RESUME")
    deadline = time.monotonic() + 60
    while not _all_idle(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)

    # --resume, then scancel from "another terminal"
    steps_before = len((rd / "metrics.jsonl").read_text().splitlines())
    p = _submit(cfg, cluster, "--resume")
    try:
        _wait_for(lambda: "resumed from" in (rd / "logs" / "trainer.log").read_text(errors="replace")
                  if (rd / "logs" / "trainer.log").is_file() else False, p, "no resume")
        job = json.loads((rd / "run.json").read_text())["slurm_job"]
        assert job != info.slurm_job
        subprocess.run(["scancel", job], env=cluster, check=True, timeout=30)
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode in (130, 143), out[-4000:]
    cancelled = RunInfo.read(rd / "run.json")
    assert cancelled is not None and cancelled.status == "stopped" and "CANCELLED" in (cancelled.reason or "")

    from backend.rundir import RunDirectory

    latest = RunDirectory(rd).latest_checkpoint()  # complete ones only: a cancel may cut a save short
    assert latest is not None
    last = int(latest.name)
    cfg.write_text(cfg.read_text().replace("max_steps = 400", f"max_steps = {last + 2}"))
    r = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg), "--slurm", "--resume"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=cluster)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    steps = [json.loads(x)["step"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 3)) and len(steps) >= steps_before - 2
    assert _queue(cluster) == "" and _leftovers(str(cfg)) == []


def test_doctor_cluster_checks_that_need_no_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmrl_tui.checks import FAIL, OK, SKIP, WARN
    from vlmrl_tui.doctor_slurm import check_commands, check_ifname, check_shared_fs, mount_of

    cfg = validate_config({"model": "m", "env": {"id": "colors"}, "trainer": {"args": {"output_dir": str(tmp_path)}},
                           "slurm": {"socket_ifname": "lo"}})
    assert cfg.slurm is not None
    assert check_ifname(cfg.slurm).status == OK
    bad = check_ifname(cfg.slurm.model_copy(update={"socket_ifname": "ib-nope"}))
    assert bad.status == FAIL and "ib-nope is not an interface here" in bad.message and "lo" in bad.message
    assert check_ifname(cfg.slurm.model_copy(update={"socket_ifname": None})).status == SKIP
    mp, fstype = mount_of(tmp_path / "not" / "yet")
    shared = check_shared_fs(cfg)
    assert shared.status == WARN and fstype in shared.message and mp in shared.message
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = check_commands()
    assert missing.status == FAIL and "sbatch" in missing.message


@pytest.mark.slow
def test_doctor_asks_the_cluster_whether_it_takes_the_job(cluster: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.config import load_config
    from vlmrl_tui.checks import FAIL, OK
    from vlmrl_tui.doctor_slurm import check_gpus_per_node, check_test_only

    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    cfg = load_config(_config(tmp_path))
    ok = check_test_only(cfg, None)
    assert ok.status == OK and "n[1-2]" in ok.message and "debug" in ok.message
    bad = check_test_only(load_config(_config(tmp_path, partition="gpu-nope")), None)
    assert bad.status == FAIL and "refused" in bad.message
    too_many = check_test_only(load_config(_config(tmp_path, trainer_nodes=5)), None)
    assert too_many.status == FAIL
    assert cfg.slurm is not None
    gpus = check_gpus_per_node(cfg.slurm.model_copy(update={"gpus_per_node": 1}))
    assert gpus.status == FAIL and "lists no GPUs" in gpus.message
