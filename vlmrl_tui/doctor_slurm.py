"""``vlmrl doctor`` for a config with a ``[slurm]`` table: what a cluster run needs, from the login node.

SLURM's commands on PATH; the job script accepted (``sbatch --test-only``: partition,
account, time, nodes); the network interface named for NCCL/gloo present (here; the nodes'
must match); the run directory on a filesystem every node sees (a network filesystem; a
local one only works when the whole cluster is this host); GPUs per node in the partition.
Ports between nodes (the server's, torchrun's rendezvous) can only be tried from inside the
job: the run's own health wait and rendezvous report them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil

from backend.config import SlurmConfig, VlmrlConfig
from vlmrl_tui.checks import FAIL, OK, SKIP, WARN, CheckResult
from vlmrl_tui.slurmctl import inside_argv, render_sbatch

COMMANDS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
#: filesystems every node of a cluster can mount
NETWORK_FS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "fuse.glusterfs",
                        "wekafs", "fuse.sshfs", "cifs", "smb3", "pvfs2", "orangefs"})


def check_commands() -> CheckResult:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return CheckResult("slurm", FAIL, f"not on PATH: {', '.join(missing)}",
                           "run vlmrl on a login node of the cluster (or load its slurm module)")
    return CheckResult("slurm", OK, "sbatch, srun, squeue, scancel, scontrol, sinfo found")


def check_test_only(cfg: VlmrlConfig, config_path: Path | None) -> CheckResult:
    """``sbatch --test-only`` on the script ``vlmrl run --slurm`` would submit."""
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "test.sbatch"
        run_dir = cfg.run_dir().resolve()
        script.write_text(render_sbatch(cfg, inside_argv(config_path or Path("CONFIG"), [], False), run_dir,
                                        Path.cwd()).replace(f"--output={run_dir}", f"--output={d}"))
        try:
            out = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return CheckResult("slurm job", FAIL, f"sbatch --test-only did not answer: {e}")
    text = (out.stderr + out.stdout).strip().splitlines()
    last = text[-1] if text else ""
    if out.returncode != 0:
        return CheckResult("slurm job", FAIL, f"sbatch --test-only refused the job: {last}",
                           "fix [slurm] partition/account/time/nodes (sinfo lists what the cluster has)")
    return CheckResult("slurm job", OK, f"sbatch --test-only accepts it: {last}")


def check_ifname(sl: SlurmConfig) -> CheckResult:
    if not sl.socket_ifname:
        return CheckResult("net interface", SKIP, "no [slurm] socket_ifname: NCCL and gloo pick an interface")
    names = sorted(psutil.net_if_addrs())
    if sl.socket_ifname in names:
        return CheckResult("net interface", OK, f"{sl.socket_ifname} exists here (the nodes must have it too)")
    return CheckResult("net interface", FAIL, f"{sl.socket_ifname} is not an interface here ({', '.join(names)})",
                       "set [slurm] socket_ifname to the nodes' interface between them (ip -br addr on a node)")


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    best = ("/", "?")
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if (str(p) == mp or str(p).startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[0]):
            best = (mp, part.fstype)
    return best


def check_shared_fs(cfg: VlmrlConfig) -> CheckResult:
    run_dir = cfg.run_dir().resolve()
    mp, fstype = mount_of(run_dir)
    if fstype in NETWORK_FS:
        return CheckResult("shared fs", OK, f"{run_dir} is on {fstype} ({mp})")
    return CheckResult("shared fs", WARN, f"{run_dir} is on {fstype} ({mp}), not a network filesystem: every node "
                       "writes logs and checkpoints there and the login node reads them",
                       "put trainer.args.output_dir on the cluster's shared filesystem (fine when the whole "
                       "cluster is this host)")


def check_gpus_per_node(sl: SlurmConfig) -> CheckResult:
    if not sl.gpus_per_node:
        return CheckResult("gpus per node", SKIP, "[slurm] gpus_per_node = 0: no GPUs asked for")
    argv = ["sinfo", "-h", "-o", "%G"] + (["-p", sl.partition] if sl.partition else [])
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return CheckResult("gpus per node", FAIL, f"sinfo did not answer: {e}")
    counts = [int(m.group(1)) for g in out.stdout.split() for m in [re.search(r"gpu(?::[^:,()]+)?:(\d+)", g)] if m]
    if not counts:
        return CheckResult("gpus per node", FAIL, f"the partition lists no GPUs (sinfo %G: {out.stdout.strip()!r})",
                           "pick a GPU partition in [slurm] partition")
    if max(counts) < sl.gpus_per_node:
        return CheckResult("gpus per node", FAIL, f"[slurm] gpus_per_node = {sl.gpus_per_node} but the partition's "
                           f"nodes have at most {max(counts)}", "lower gpus_per_node or pick another partition")
    return CheckResult("gpus per node", OK, f"nodes with up to {max(counts)} GPUs >= {sl.gpus_per_node}")


def check_slurm(cfg: VlmrlConfig, config_path: Path | None = None) -> list[CheckResult]:
    """The cluster checks of a config that runs under SLURM."""
    sl = cfg.slurm or SlurmConfig()
    commands = check_commands()
    results = [commands]
    if commands.status == OK:
        results.append(check_test_only(cfg, config_path))
        results.append(check_gpus_per_node(sl))
    results += [check_ifname(sl), check_shared_fs(cfg),
                CheckResult("node ports", SKIP, f"the server's port {cfg.inference.port} and torchrun's rendezvous "
                            f"port {sl.rdzv_port} are tried from inside the job (health wait, rendezvous)")]
    return results


__all__ = ["check_slurm", "mount_of"]
