"""``vlmrl run --slurm``: the same run as a SLURM job, its processes placed on the job's nodes.

On the login node, ``vlmrl run CONFIG --slurm`` renders an sbatch script (``--dry-run``
prints it), writes it into the run directory, submits it with ``sbatch`` and then watches
the run like ``vlmrl attach`` until it ends; Ctrl-C there cancels the job (``scancel``), which
stops every task on every node. Inside the allocation the script runs ``vlmrl run ...
--slurm-job`` on the first node: the same supervisor, whose server and trainer are started
with ``srun`` on their nodes (the server on the first ``inference_nodes``, the trainer on the
next ``trainer_nodes`` with torchrun's c10d rendezvous across them), all with one NCCL
environment. The run directory must be on a filesystem every node sees; ``run.json`` records
the job id and which node runs what, so ``vlmrl attach``/``vlmrl-tui --attach`` work from the
login node (they ask ``squeue`` whether the job still runs). When SLURM ends the job itself (a
lost node, the time limit, ``scancel`` from elsewhere), the submitting ``vlmrl run`` adds SLURM's
account (``scontrol show job``) to ``run.json``; the job is not requeued (it would start the run
over), and ``vlmrl run CONFIG --slurm --resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from backend.config import SlurmConfig, VlmrlConfig
from backend.records import EXIT_FAILED, RUN_FAILED, RunInfo
from backend.rundir import RunDirectory, write_json_atomic
from vlmrl_tui.plan import Placement
from vlmrl_tui.slurmctl import (SlurmError, _run, inside_argv, job_end, job_running, node_addr, render_sbatch,
                               run_status_after)


def placement(cfg: VlmrlConfig, job_id: str, nodelist: str) -> Placement:
    """Where the run's processes go among the job's nodes (``SLURM_JOB_NODELIST``)."""
    sl = cfg.slurm or SlurmConfig()
    nodes = _run(["scontrol", "show", "hostnames", nodelist], "list the job's nodes").split()
    need = sl.inference_nodes + sl.trainer_nodes
    if len(nodes) < need:
        raise SlurmError(f"job {job_id} has {len(nodes)} node(s) ({', '.join(nodes)}) but [slurm] asks for "
                         f"{sl.inference_nodes} inference + {sl.trainer_nodes} trainer nodes")
    server = tuple(nodes[: sl.inference_nodes])
    trainer = tuple(nodes[sl.inference_nodes : need])
    return Placement(job_id, server, trainer, node_addr(server[0]), node_addr(trainer[0]))


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; the job id."""
    out = _run(["sbatch", "--parsable", str(script)], "submit the run")
    job = out.strip().split(";")[0]
    if not job.isdigit():
        raise SlurmError(f"sbatch answered {out.strip()!r}, not a job id")
    return job


def cancel(job_id: str) -> None:
    try:
        _run(["scancel", str(job_id)], "cancel the run's job")
    except SlurmError as e:
        print(f"warning: {e}", file=sys.stderr)


def follow(job_id: str, run_dir: Path, *, poll_s: float = 1.0) -> int:
    """Watch the job's run until it ends (``vlmrl attach``); Ctrl-C or SIGTERM cancels the job.

    Returns the run's exit code, or 1 when the job ended before its run wrote ``run.json``
    (the job's output says why)."""
    from vlmrl_tui.headless import attach_headless

    rd = RunDirectory(run_dir)
    stop: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        stop.append(sig)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        while (rd.run_info() or RunInfo("", "")).slurm_job != job_id:  # not an earlier job's (--resume)
            if not job_running(job_id):
                out = rd.slurm_output(job_id)
                tail = out.read_text(errors="replace")[-3000:] if out.is_file() else "(no job output)"
                print(f"job {job_id} ended before the run started; its output ({out}):\n{tail}", file=sys.stderr)
                return 1
            time.sleep(poll_s)
        code = attach_headless(rd.path, poll_s=poll_s)  # returns 130 on Ctrl-C ("detached")
    except KeyboardInterrupt:
        pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if not stop:
        if code == 0:
            # the run is complete; its job still has its teardown (the batch script's exit,
            # SLURM's epilog): return once nothing of it is left, as a caller would assume
            _wait_gone(job_id, 60)
            return code
        return _account(job_id, rd, code)
    print(f"cancelling job {job_id} (scancel): every task on every node stops", flush=True)
    cancel(job_id)
    _wait_gone(job_id, 120)
    return 130 if stop[0] == signal.SIGINT else 143


def _wait_gone(job_id: str, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until SLURM no longer lists the job."""
    deadline = time.monotonic() + timeout_s
    while job_running(job_id) and time.monotonic() < deadline:
        time.sleep(0.5)


def _account(job_id: str, rd: RunDirectory, code: int) -> int:
    """After a run that did not complete: add SLURM's account of its job to ``run.json``
    (its supervisor saw only a SIGTERM, or nothing), and the exit code that goes with it."""
    _wait_gone(job_id, 60)
    end = job_end(job_id)
    info = rd.run_info()
    if end is None or info is None or f"SLURM job {job_id}" in (info.reason or ""):
        return code
    status = run_status_after(end)
    if status is None:
        return code  # the job ended because the run did: run.json already says why
    failed = status == RUN_FAILED
    why = f"SLURM job {job_id} ended {end}"
    if failed:
        info.lost(f"{info.reason}; {why}" if info.reason else why, time.time())
    else:  # cancelled: the run stopped as it says, and now says by whom
        info.reason = f"{info.reason}; {why}" if info.reason else why
    write_json_atomic(rd.run_json, info.to_json())
    print(f"run: {info.status} - {info.reason}" + ("; --resume continues from the last checkpoint" if failed else ""),
          flush=True)
    return EXIT_FAILED if failed else code


def submit_run(cfg: VlmrlConfig, config_path: Path, overrides: Sequence[str], *, dry_run: bool = False,
               resume: bool = False) -> int:
    """``vlmrl run CONFIG --slurm``: render, (print with ``dry_run``,) submit, follow."""
    from vlmrl_tui.plan import build_plan, run_dir_problem

    plan = build_plan(cfg, config_path, resume=resume)  # every config error before anything is submitted
    script = render_sbatch(cfg, inside_argv(config_path, overrides, resume), plan.run_dir, Path.cwd())
    if dry_run:
        print(script, end="")
        return 0
    problem = run_dir_problem(plan.run_dir, resume)
    if problem:
        raise SlurmError(problem)
    rd = RunDirectory(plan.run_dir)
    rd.logs_dir.mkdir(parents=True, exist_ok=True)
    rd.sbatch.write_text(script)
    job = submit(rd.sbatch)
    print(f"submitted job {job}: {rd.sbatch} (output {rd.slurm_output(job)}); "
          "Ctrl-C cancels it", flush=True)
    return follow(job, plan.run_dir)


def inside_placement(cfg: VlmrlConfig) -> Placement:
    """Inside the job (``--slurm-job``): the placement from SLURM's environment."""
    import os

    job, nodelist = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_JOB_NODELIST")
    if not job or not nodelist:
        raise SlurmError("--slurm-job runs inside a SLURM job (no SLURM_JOB_ID/SLURM_JOB_NODELIST); "
                         "submit the run with vlmrl run CONFIG --slurm")
    return placement(cfg, job, nodelist)


__all__ = ["SlurmError", "cancel", "follow", "inside_argv", "inside_placement", "job_running", "node_addr",
           "placement", "render_sbatch", "submit", "submit_run"]
