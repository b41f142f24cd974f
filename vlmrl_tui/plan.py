"""The run plan: what the supervisor will start, derived from a config without side effects.

``build_plan`` turns a :class:`~backend.config.VlmrlConfig` into a :class:`RunPlan`: the
resolved config to write into the run directory, an optional one-shot ``prepare`` step
(building a ``builtin:tiny-*`` model once, before the children could race to build it),
and one :class:`ProcessSpec` each for the inference server and the trainer.

Both children get ONE environment: the caller's shell, then the variables vlmrl sets
(``[nccl]`` table, ``CUDA_DEVICE_ORDER``, run token and directory, server URL, loopback in
``no_proxy``). The weight-sync port travels one way only: in the resolved config
(``trainer.args.sync_port``) that both children read. Only ``CUDA_VISIBLE_DEVICES`` differs,
so that server and trainer never share a GPU unless ``run.share_gpus`` says so; when they do,
both get ``NCCL_MULTI_RANK_GPU_ENABLE=1`` (unless ``[nccl]`` sets it), without which NCCL
refuses two ranks of the weight-sync communicator on one GPU ("Duplicate GPU detected"). A
shell variable that contradicts the config is reported in :attr:`RunPlan.notes` (the config
wins), never mixed in silently.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from backend import contract, net
from backend.config import KNOWN_NCCL_VARS, RestartPolicy, RestartSettings, VlmrlConfig, config_to_toml
from backend.errors import ConfigError
from backend.records import PROC_PREPARE, PROC_SERVER, PROC_TRAINER, RunInfoError
from backend.rundir import RunDirectory
from backend.vllm_ext.command import vllm_server_argv, vllm_server_env
from vlmrl_tui.proctree import supervisor_alive

MASKED = "********"
#: NCCL >= 2.30: two ranks of one communicator may use the same GPU (server and trainer sharing one)
MULTI_RANK_GPU_VAR = "NCCL_MULTI_RANK_GPU_ENABLE"
#: vLLM follows redirects of the image URLs it fetches unless this is 0
MEDIA_REDIRECTS_VAR = "VLLM_MEDIA_URL_ALLOW_REDIRECTS"
# Variables whose value is a secret: never printed.
SECRET_VARS = frozenset({contract.ENV_RUN_TOKEN})
# Variables vlmrl sets for which a different value in the shell is worth a warning.
_NOT_CONFLICTS = frozenset({"PYTHONUNBUFFERED", "no_proxy", "NO_PROXY", contract.ENV_RUN_TOKEN})

# One-shot step that builds/resolves a builtin model before the children start.
_PREPARE_CODE = 'import sys; from backend.models import resolve_model; print("model:", resolve_model(sys.argv[1]))'

@dataclass(frozen=True)
class ProcessSpec:
    """How to start, watch and restart one child process."""

    name: str
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    log_path: Path
    gpus: tuple[str, ...] = ()  # its CUDA_VISIBLE_DEVICES
    health_url: str | None = None  # polled until 200 before dependents start
    models_url: str | None = None  # also polled (must answer 200) once health is ok
    restart: RestartPolicy = "never"
    max_restarts: int = 0
    restart_backoff_s: float = 2.0
    start_timeout_s: float | None = None  # for health; None: no health to wait for
    restart_argv: tuple[str, ...] | None = None  # argv after a restart (trainer: --resume)
    depends_on: str | None = None  # name of the process that must be healthy first
    one_shot: bool = False  # runs to completion before the others (prepare)


@dataclass(frozen=True)
class EnvNote:
    """A shell variable that the plan overrides or inherits: reported, never hidden."""

    name: str
    shell_value: str
    plan_value: str | None  # None: inherited as is (not set by the config)
    message: str


@dataclass(frozen=True)
class RunPlan:
    """Everything ``vlmrl run`` will do, before it does it."""

    name: str
    run_dir: Path
    config_file: Path  # the resolved config inside the run directory
    config_toml: str  # its content (overrides and picked ports included)
    model: str
    engine: str
    server_port: int
    sync_port: int
    server_url: str
    shared_env: Mapping[str, str]  # what vlmrl sets on top of the shell, same for both
    processes: tuple[ProcessSpec, ...]  # prepare (optional), server, trainer
    notes: tuple[EnvNote, ...] = ()
    stop_grace_s: float = 10.0
    health_poll_s: float = 1.0
    resume: bool = False
    max_steps: int = 0
    slurm_job: str | None = None  # inside a SLURM job: its id
    nodes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # process -> its SLURM nodes

    def process(self, name: str) -> ProcessSpec:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def prepare(self) -> ProcessSpec | None:
        return next((p for p in self.processes if p.one_shot), None)

    @property
    def services(self) -> tuple[ProcessSpec, ...]:
        """The long-running children (server, trainer), in start order."""
        return tuple(p for p in self.processes if not p.one_shot)

    def replace_process(self, name: str, **changes: object) -> "RunPlan":
        """A copy with one process spec changed (tests swap in stand-in commands)."""
        self.process(name)
        procs = tuple(replace(p, **changes) if p.name == name else p for p in self.processes)  # type: ignore[arg-type]
        return replace(self, processes=procs)

    def without_process(self, name: str) -> "RunPlan":
        return replace(self, processes=tuple(p for p in self.processes if p.name != name))


@dataclass(frozen=True)
class Placement:
    """Inside a SLURM job: which nodes run what, and the addresses the others reach them by
    (``vlmrl_tui/slurm.py`` finds them)."""

    job_id: str
    server_nodes: tuple[str, ...]
    trainer_nodes: tuple[str, ...]
    server_addr: str
    trainer_addr: str


def srun_prefix(nodes: Sequence[str]) -> list[str]:
    """``srun`` for one task on each of ``nodes`` (signals forwarded; the step dies as a whole)."""
    return ["srun", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}", "--ntasks-per-node=1",
            f"--nodelist={','.join(nodes)}", "--kill-on-bad-exit=1", "--export=ALL", "--unbuffered"]


def gpus_needed(n_server: int, n_trainer: int, share: bool) -> int:
    """GPUs a run needs: the larger count when server and trainer may share, else both."""
    return max(n_server, n_trainer) if share else n_server + n_trainer


def visible_gpus(env: Mapping[str, str]) -> list[str] | None:
    """The GPU ids (or UUIDs) ``CUDA_VISIBLE_DEVICES`` makes visible; None when it is not set.

    Like CUDA, the list ends at the first entry that is neither an index nor a GPU-/MIG- UUID
    (``-1`` hides every GPU).
    """
    text = env.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    out = []
    for x in (x.strip() for x in text.split(",")):
        if not (x.isdigit() or x.startswith(("GPU-", "MIG-"))):
            break
        out.append(x)
    return out


def split_gpus(
    n_server: int, n_trainer: int, pool: Sequence[str] | None, share: bool, shell_value: str | None = None
) -> tuple[list[str], list[str]]:
    """GPU ids for server and trainer: disjoint slices of ``pool`` unless ``share``.

    ``pool`` is what the shell's ``CUDA_VISIBLE_DEVICES`` (``shell_value``) makes visible (ids
    or UUIDs); None means all GPUs, numbered from 0 (the doctor checks that enough exist).
    """
    need = gpus_needed(n_server, n_trainer, share)
    ids = list(pool) if pool is not None else [str(i) for i in range(need)]
    if need > len(ids):
        raise ConfigError(
            None,
            "inference.gpus",
            f"server needs {n_server} GPU(s) and trainer {n_trainer}"
            f"{' (shared)' if share else ''}, but CUDA_VISIBLE_DEVICES"
            f"{'' if shell_value is None else '=' + repr(shell_value)} in your shell makes {len(ids)} visible: "
            f"{','.join(ids) or '(none)'}; widen it, or lower inference.gpus/trainer.gpus",
        )
    server = ids[:n_server]
    trainer = ids[:n_trainer] if share else ids[n_server : n_server + n_trainer]
    return server, trainer


def merge_no_proxy(current: str | None, hosts: Sequence[str]) -> str:
    """``current`` (comma list) plus ``hosts``, without duplicates, order kept."""
    items = [h.strip() for h in (current or "").split(",") if h.strip()]
    for h in hosts:
        if h and h not in items:
            items.append(h)
    return ",".join(items)


def env_notes(shared: Mapping[str, str], base_env: Mapping[str, str]) -> list[EnvNote]:
    """Shell variables that contradict what vlmrl sets, and NCCL ones it inherits."""
    notes: list[EnvNote] = []
    for name in sorted(shared):
        if name in _NOT_CONFLICTS or name not in base_env:
            continue
        if base_env[name] != shared[name]:
            notes.append(
                EnvNote(
                    name,
                    base_env[name],
                    shared[name],
                    f"{name}={base_env[name]} in your shell contradicts the config "
                    f"({name}={shared[name]}); both processes get the config's value",
                )
            )
    for name in sorted(base_env):
        if name.startswith("NCCL_") and name not in shared:
            bare = name[5:]
            unknown = "" if bare in KNOWN_NCCL_VARS else " (not a variable NCCL knows)"
            notes.append(
                EnvNote(
                    name,
                    base_env[name],
                    None,
                    f"{name}={base_env[name]} comes from your shell, not [nccl]{unknown}; "
                    f"both processes inherit it (put it in [nccl] or unset it)",
                )
            )
    return notes


def _restart(settings: RestartSettings) -> dict[str, object]:
    """The restart fields of a process spec, from the config's one restart model."""
    return settings.model_dump(include=set(RestartSettings.model_fields))


def build_plan(
    cfg: VlmrlConfig,
    config_path: str | Path | None,
    *,
    resume: bool = False,
    base_env: Mapping[str, str] | None = None,
    token: str | None = None,
    sync_port: int | None = None,
    cwd: str | Path | None = None,
    python: str | None = None,
    placement: Placement | None = None,
) -> RunPlan:
    """The plan for ``cfg``: resolved config, environment and the process specs.

    Pure apart from picking a free weight-sync port when neither ``sync_port`` nor
    ``trainer.args.sync_port`` gives one. Raises :class:`ConfigError` for settings that
    cannot run. With ``placement`` (inside a SLURM job) the server and the trainer are
    started with ``srun`` on their nodes, the trainer's ranks by torchrun's c10d rendezvous
    on its first node; SLURM, not the plan, gives each its GPUs.
    """
    base = dict(os.environ if base_env is None else base_env)
    work = Path(cwd if cwd is not None else os.getcwd()).resolve()
    py = python or sys.executable
    cfg = cfg.model_copy(deep=True)

    targs = cfg.trainer.args
    if targs.device == "cuda" and cfg.trainer.gpus == 0:
        raise ConfigError(config_path, "trainer.gpus", "is 0 but trainer.args.device is 'cuda'; give the trainer a GPU")
    port = sync_port or targs.sync_port or net.free_port()
    targs.sync_port = port

    run_dir = (work / cfg.run_dir()).resolve()
    rd = RunDirectory(run_dir)
    config_file = rd.config
    if placement is not None and placement.server_addr not in net.LOOPBACK_HOSTS:
        cfg.inference.host = "0.0.0.0"  # reached from the trainer's nodes (admin routes need the run token)
    server_url = net.http_url(placement.server_addr if placement is not None else cfg.inference.host,
                              cfg.inference.port)

    shared: dict[str, str] = {}
    shared.update(cfg.nccl_env())
    shared["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    shared[contract.ENV_RUN_TOKEN] = token or secrets.token_urlsafe(24)
    shared[contract.ENV_RUN_DIR] = str(run_dir)
    shared[contract.ENV_SERVER_URL] = server_url
    shared["PYTHONUNBUFFERED"] = "1"
    loop_hosts = list(net.LOOPBACK_HOSTS) + [net.connect_host(cfg.inference.host)]
    no_proxy = merge_no_proxy(base.get("no_proxy") or base.get("NO_PROXY"), loop_hosts)
    shared["no_proxy"] = shared["NO_PROXY"] = no_proxy

    if cfg.inference.engine == "vllm":
        server_argv = vllm_server_argv(cfg)  # --allowed-media-domains: none unless inference.allow_http_media
        shared.update(vllm_server_env(cfg))
        shared[MEDIA_REDIRECTS_VAR] = "0"  # a fetch from an allowed host must not be redirected to another
    else:
        server_argv = [py, "-m", "vlmrl_tui.cli", "serve", str(config_file)]
    trainer_argv = [py, "-m", "vlmrl_tui.cli", "train", str(config_file)]
    if placement is not None and (len(placement.trainer_nodes) > 1 or cfg.trainer.ranks > 1):
        sl_port = cfg.slurm.rdzv_port if cfg.slurm is not None else 29400
        trainer_argv = [py, "-m", "torch.distributed.run", f"--nnodes={len(placement.trainer_nodes)}",
                        f"--nproc-per-node={cfg.trainer.ranks}", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint={placement.trainer_addr}:{sl_port}", f"--rdzv-id=vlmrl-{placement.job_id}",
                        "-m", "vlmrl_tui.cli", "train", str(config_file)]
    elif cfg.trainer.ranks > 1:  # torchrun starts the ranks; its tree is the trainer (stopped as one)
        trainer_argv = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(cfg.trainer.ranks), "-m", "vlmrl_tui.cli", "train", str(config_file)]
    if placement is not None:
        server_argv = srun_prefix(placement.server_nodes) + list(server_argv)
        trainer_argv = srun_prefix(placement.trainer_nodes) + trainer_argv
        shared[contract.ENV_SYNC_HOST] = placement.trainer_addr
        ifname = cfg.slurm.socket_ifname if cfg.slurm is not None else None
        if ifname:
            shared["NCCL_SOCKET_IFNAME"] = shared["GLOO_SOCKET_IFNAME"] = ifname
    restart_trainer = trainer_argv + ["--resume"]
    if resume:
        trainer_argv = list(restart_trainer)

    if placement is not None:
        server_gpus, trainer_gpus = [], []  # SLURM gives each node's tasks their GPUs
    else:
        server_gpus, trainer_gpus = split_gpus(cfg.inference.gpus, cfg.trainer.gpus, visible_gpus(base),
                                               cfg.run.share_gpus, base.get("CUDA_VISIBLE_DEVICES"))
    if set(server_gpus) & set(trainer_gpus):
        # NCCL >= 2.30 lets two ranks of one communicator share a GPU only when asked to
        shared.setdefault(MULTI_RANK_GPU_VAR, "1")

    def env_for(gpus: list[str]) -> dict[str, str]:
        env = dict(base)
        env.update(shared)
        if placement is None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    inf = cfg.inference
    tr = cfg.trainer
    procs: list[ProcessSpec] = []
    if cfg.model.startswith("builtin:"):
        procs.append(
            ProcessSpec(
                name=PROC_PREPARE,
                argv=(py, "-c", _PREPARE_CODE, cfg.model),
                cwd=work,
                env=env_for([]),
                log_path=rd.log(PROC_PREPARE),
                one_shot=True,
            )
        )
    procs.append(
        ProcessSpec(
            name=PROC_SERVER,
            argv=tuple(server_argv),
            cwd=work,
            env=env_for(server_gpus),
            log_path=rd.log(PROC_SERVER),
            gpus=tuple(server_gpus),
            health_url=server_url + contract.ROUTE_HEALTH,
            models_url=server_url + contract.ROUTE_MODELS,
            start_timeout_s=inf.startup_timeout_s,
            **_restart(inf),  # type: ignore[arg-type]
        )
    )
    procs.append(
        ProcessSpec(
            name=PROC_TRAINER,
            argv=tuple(trainer_argv),
            cwd=work,
            env=env_for(trainer_gpus),
            log_path=rd.log(PROC_TRAINER),
            gpus=tuple(trainer_gpus),
            restart_argv=tuple(restart_trainer),
            **_restart(tr),  # type: ignore[arg-type]
            depends_on=PROC_SERVER,
        )
    )
    return RunPlan(
        name=cfg.run_name,
        run_dir=run_dir,
        config_file=config_file,
        config_toml=config_to_toml(cfg),
        model=cfg.model,
        engine=inf.engine,
        server_port=inf.port,
        sync_port=port,
        server_url=server_url,
        shared_env=shared,
        processes=tuple(procs),
        notes=tuple(env_notes(shared, base)),
        stop_grace_s=cfg.run.stop_grace_s,
        health_poll_s=cfg.run.health_poll_s,
        resume=resume,
        max_steps=targs.max_steps,
        slurm_job=placement.job_id if placement is not None else None,
        nodes={} if placement is None else {PROC_SERVER: placement.server_nodes, PROC_TRAINER: placement.trainer_nodes},
    )


def run_dir_problem(run_dir: str | Path, resume: bool) -> str | None:
    """Why a new run must not start in ``run_dir`` (None when it may).

    A directory whose supervisor is alive is refused; so is one that already holds
    training progress (metrics or checkpoints) unless ``resume``. A directory left by a
    run that never trained is reused (logs are appended).
    """
    rd = RunDirectory(run_dir)
    if not rd.exists():
        return None
    try:
        info = rd.run_info()
    except RunInfoError as e:
        return f"{e}; start another run with --name NEW, or remove the directory"
    if info is not None and not info.finished and info.supervisor_pid != os.getpid() and supervisor_alive(info):
        return (f"{rd.path} is in use by a running supervisor (pid {info.supervisor_pid}); watch it with "
                f"`vlmrl attach {rd.path}`")
    if resume:
        return None
    progressed = (rd.metrics.exists() and rd.metrics.stat().st_size > 0) or rd.latest_checkpoint() is not None
    if progressed:
        return (
            f"{rd.path} already holds a run; continue it with --resume, start another with "
            f"--name NEW, or remove the directory"
        )
    return None


def _short(path: Path, cwd: Path) -> str:
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _shown_value(name: str, value: str, show_secrets: bool) -> str:
    if name in SECRET_VARS and not show_secrets:
        return MASKED + " (fresh per run)"
    return shlex.quote(value) if value else '""'


def format_plan(plan: RunPlan, *, show_secrets: bool = False) -> str:
    """The plan as text for ``vlmrl run --dry-run``: commands and environment."""
    cwd = plan.services[0].cwd if plan.services else Path.cwd()
    lines = [
        f"run      {plan.name}  ->  {plan.run_dir}",
        f"config   {_short(plan.config_file, cwd)}  (resolved config, written at start)",
        f"model    {plan.model}",
        f"engine   {plan.engine}   server {plan.server_url}   weight-sync port {plan.sync_port}",
        "",
    ]
    for p in plan.processes:
        lines.append(f"[{p.name}]" + ("  one-shot, before the others" if p.one_shot else ""))
        lines.append(f"  argv     {shlex.join(p.argv)}")
        if p.restart_argv and p.restart_argv != p.argv:
            lines.append(f"  argv on restart  {shlex.join(p.restart_argv)}")
        lines.append(f"  cwd      {p.cwd}")
        lines.append(f"  log      {_short(p.log_path, cwd)}")
        if p.health_url:
            probes = p.health_url + (f" then {p.models_url}" if p.models_url else "")
            lines.append(
                f"  health   {probes}  every {plan.health_poll_s:g} s, start timeout {p.start_timeout_s:g} s"
            )
        if p.depends_on:
            lines.append(f"  starts   after {p.depends_on} is healthy")
        if not p.one_shot:
            policy = p.restart if p.restart == "never" else (
                f"{p.restart} (max {p.max_restarts}, backoff {p.restart_backoff_s:g} s)"
            )
            lines.append(f"  restart  {policy}")
        lines.append(f"  env      CUDA_VISIBLE_DEVICES={_shown_value('', p.env.get('CUDA_VISIBLE_DEVICES', ''), True)}")
        lines.append("")
    lines.append("environment (identical for every process, set on top of your shell)")
    for name in sorted(plan.shared_env):
        lines.append(f"  {name}={_shown_value(name, plan.shared_env[name], show_secrets)}")
    if plan.notes:
        lines.append("")
        lines.append("shell variables")
        for note in plan.notes:
            lines.append(f"  warn  {note.message}")
    lines.append("")
    lines.append(f"stop     SIGTERM to each process group, SIGKILL after {plan.stop_grace_s:g} s")
    return "\n".join(lines)
