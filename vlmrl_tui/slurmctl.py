"""SLURM's commands, asked from Python (whether a job runs, where a node is), and the job script.

The low-level half of ``vlmrl run --slurm`` (vlmrl_tui/slurm.py), importing nothing of the
launcher, so the process-tree helpers can ask whether a run's job still runs.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from backend.config import SlurmConfig, VlmrlConfig
from backend.errors import VlmrlError
from backend.records import RUN_FAILED, RUN_STOPPED
from backend.rundir import RunDirectory


# a job in one of these states has not ended
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"})
# SLURM ended the run: it failed, and --resume continues it
FAILED_STATES = ("NODE_FAIL", "TIMEOUT", "BOOT_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE")


class SlurmError(VlmrlError):
    """SLURM is missing, refused the job, or the job's nodes cannot host the run."""


def _run(argv: Sequence[str], what: str, timeout: float = 30.0) -> str:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} not found: SLURM's commands must be on PATH to {what}")
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer in {timeout:.0f} s ({what})") from None
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed ({what}): {(out.stderr or out.stdout).strip()[-500:]}")
    return out.stdout


def job_running(job_id: str) -> bool:
    """Whether job ``job_id`` is still pending or running (False when squeue no longer lists it)."""
    try:
        out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], "ask whether the job runs", timeout=15)
    except SlurmError:
        return False
    return out.strip() in ACTIVE_STATES


def job_end(job_id: str) -> str | None:
    """How job ``job_id`` ended, as SLURM says (``NODE_FAIL (reason NodeDown, nodes n3)``,
    ``CANCELLED``...); None when SLURM no longer knows the job or it did not end."""
    try:
        out = _run(["scontrol", "show", "job", str(job_id), "-o"], "ask how the job ended", timeout=15)
    except SlurmError:
        return None
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    state = fields.get("JobState", "")
    if not state or state in ACTIVE_STATES:
        return None
    extra = [f"reason {fields['Reason']}"] if fields.get("Reason", "None") != "None" else []
    if state == "NODE_FAIL" and fields.get("NodeList"):
        extra.append(f"job nodes {fields['NodeList']}")
    return state + (f" ({'; '.join(extra)})" if extra else "")


def run_status_after(end: str) -> str | None:
    """The run status a job end (:func:`job_end`) gives a run that SLURM ended: failed for a
    lost node, the time limit, a preemption...; stopped for a cancel. None when the job ended
    because the run did (COMPLETED, FAILED): the run's own account stands."""
    if end.startswith(FAILED_STATES):
        return RUN_FAILED
    if end.startswith("CANCELLED"):
        return RUN_STOPPED
    return None


def node_addr(node: str) -> str:
    """The address other nodes reach ``node`` by (its NodeAddr; its name where it has none)."""
    out = _run(["scontrol", "show", "node", node, "-o"], f"find the address of node {node}")
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or node
    return node


def render_sbatch(cfg: VlmrlConfig, inside: Sequence[str], run_dir: Path, cwd: Path) -> str:
    """The job script: ``#SBATCH`` lines from ``[slurm]``, its setup lines, then ``inside``."""
    sl = cfg.slurm or SlurmConfig()
    lines = ["#!/bin/bash", f"#SBATCH --job-name=vlmrl-{cfg.run_name}",
             f"#SBATCH --nodes={sl.inference_nodes + sl.trainer_nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --time={sl.time}", f"#SBATCH --output={RunDirectory(run_dir).slurm_output()}",
             f"#SBATCH --chdir={cwd}",
             # a requeued job would start the run over; a lost node ends it, and --resume continues
             "#SBATCH --no-requeue"]
    if sl.partition:
        lines.append(f"#SBATCH --partition={sl.partition}")
    if sl.account:
        lines.append(f"#SBATCH --account={sl.account}")
    if sl.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={sl.gpus_per_node}")
    if sl.cpus_per_node:
        lines.append(f"#SBATCH --cpus-per-task={sl.cpus_per_node}")
    lines += [f"#SBATCH {opt}" for opt in sl.sbatch]
    lines += ["", "# written by vlmrl run --slurm: the same supervisor, its processes placed on the nodes by srun",
              "set -euo pipefail", *sl.setup, "exec " + shlex.join(inside), ""]
    return "\n".join(lines)


def inside_argv(config_path: Path, overrides: Sequence[str], resume: bool) -> list[str]:
    """What the job runs on its first node: this ``vlmrl run`` again, placed by SLURM."""
    argv = [sys.executable, "-m", "vlmrl_tui.cli", "run", str(config_path.resolve()), *overrides, "--slurm-job"]
    return argv + (["--resume"] if resume else [])


__all__ = ["ACTIVE_STATES", "FAILED_STATES", "SlurmError", "inside_argv", "job_end", "job_running", "node_addr",
           "render_sbatch", "run_status_after"]
