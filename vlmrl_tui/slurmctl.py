"""SLURM's commands, asked from Python: whether a job runs, where a node is.

The low-level half of ``vlmrl run --slurm`` (vlmrl_tui/slurm.py), importing nothing of the
launcher, so the process-tree helpers can ask whether a run's job still runs.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Sequence

from backend.errors import VlmrlError


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
    return out.strip() in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED")


def node_addr(node: str) -> str:
    """The address other nodes reach ``node`` by (its NodeAddr; its name where it has none)."""
    out = _run(["scontrol", "show", "node", node, "-o"], f"find the address of node {node}")
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or node
    return node


__all__ = ["SlurmError", "job_running", "node_addr"]
