"""The run directory's records: ``run.json``, metric and rollout lines, and every file name.

One module owns what the supervisor, the trainer and every view agree on:

* file and folder names of a run directory and of a checkpoint;
* the ``run.json`` schema (:class:`RunInfo`, :class:`ProcessInfo`, versioned), its process
  and run statuses and the exit code each run status means;
* the keys of a ``metrics.jsonl`` line (:class:`MetricRecord`) and the fields of a
  ``rollouts.jsonl`` line (:class:`RolloutRecord`, or :class:`DropRecord` for an example
  left out of its step);
* the one-line form of a metric record (``step 12/100 reward=0.62 ...``) that the trainer's
  log and the headless view both print.

Writers build these types and write their JSON; readers parse each file once, through
:meth:`RunInfo.from_json`, :meth:`MetricRecord.from_json` and
:meth:`RolloutRecord.from_json`. A reader never guesses another key: a ``run.json`` of
another schema version is refused with a message saying so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from backend.errors import VlmrlError

# --------------------------------------------------------------------------- file names

CONFIG_FILE = "config.toml"  # the resolved config that ran
RUN_FILE = "run.json"  # supervisor state (RunInfo)
METRICS_FILE = "metrics.jsonl"  # one MetricRecord per optimizer step
ROLLOUTS_FILE = "rollouts.jsonl"  # one RolloutRecord per rollout, one DropRecord per example left out
EVAL_FILE = "eval.jsonl"  # one line per held-out evaluation
EVAL_SCORES_FILE = "eval.json"  # `vlmrl eval`: every scored model side by side
EVAL_RUNS_DIR = "eval"  # eval/<model>/: the supervised server of each model `vlmrl eval` scored
SBATCH_FILE = "slurm.sbatch"  # `vlmrl run --slurm`: the job script it submitted
SLURM_OUTPUT = "slurm-%j.out"  # in logs/: the job's own output (%j: SLURM's job id)
LOGS_DIR = "logs"  # logs/<process>.log
LOG_SUFFIX = ".log"
ROLLOUT_IMAGES_DIR = "rollouts"  # rollouts/<step>/<example>-<k>.png
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/<step>/
TENSORBOARD_DIR = "tensorboard"  # report_to = ["tensorboard"]: the trainer's event files
WANDB_RUNS_DIR = "wandb"  # report_to = ["wandb"], WANDB_DIR unset: the folder wandb itself makes in the run directory
CONTROL_SOCKET = "supervisor.sock"  # the supervisor's control channel
SPACE_RESERVE = "supervisor.reserve"  # disk space the supervisor frees to record a run's end on a full disk
RUN_LOCK = "supervisor.lock"  # flock'd by the run's supervisor while it runs: one supervisor per run
CHECKPOINT_MARKER = "COMPLETE"  # written last: a checkpoint without it is ignored
TRAINER_STATE = "trainer_state.json"  # in a checkpoint: step, config, run identity
OPTIMIZER_STATE = "optimizer.pt"  # in a checkpoint: optimizer and scheduler
RNG_STATE = "rng.pt"  # in a checkpoint: torch, python and numpy generators
SHARDED_OPTIMIZER = "optimizer"  # in a checkpoint of several ranks: torch.distributed.checkpoint folder

# --------------------------------------------------------------------------- processes

PROC_PREPARE = "prepare"  # one-shot: builds a builtin model before the others start
PROC_SERVER = "server"
PROC_TRAINER = "trainer"
PROC_SUPERVISOR = "supervisor"  # the log of a `vlmrl run` that vlmrl-tui launched
PROCESS_ORDER = (PROC_PREPARE, PROC_SERVER, PROC_TRAINER, PROC_SUPERVISOR)


def proc_sort_key(name: str) -> tuple[int, str]:
    """prepare, server, trainer, supervisor, then the rest by name."""
    return (PROCESS_ORDER.index(name) if name in PROCESS_ORDER else len(PROCESS_ORDER), name)


# Process statuses.
PENDING = "pending"
STARTING = "starting"
HEALTHY = "healthy"
RUNNING = "running"
RESTARTING = "restarting"
EXITED = "exited"
FAILED = "failed"
KILLED = "killed"
STOPPED = "stopped"
PROCESS_STATUSES = frozenset({PENDING, STARTING, HEALTHY, RUNNING, RESTARTING, EXITED, FAILED, KILLED, STOPPED})
ALIVE_STATUSES = frozenset({STARTING, HEALTHY, RUNNING})  # a process of this run exists now
ENDED_STATUSES = frozenset({EXITED, FAILED, KILLED, STOPPED})

# Run statuses.
RUN_PREPARING = "preparing"
RUN_STARTING = "starting"
RUN_RUNNING = "running"
RUN_STOPPING = "stopping"
RUN_COMPLETED = "completed"
RUN_FAILED = "failed"
RUN_STOPPED = "stopped"
RUN_STATUSES = frozenset({RUN_PREPARING, RUN_STARTING, RUN_RUNNING, RUN_STOPPING, RUN_COMPLETED, RUN_FAILED,
                          RUN_STOPPED})
RUN_TERMINAL = frozenset({RUN_COMPLETED, RUN_FAILED, RUN_STOPPED})

# What `vlmrl run` exits with for each way a run ends (run.json's exit_code).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130
EXIT_SIGTERM = 143
RUN_EXIT_CODES = {RUN_COMPLETED: EXIT_OK, RUN_FAILED: EXIT_FAILED, RUN_STOPPED: EXIT_INTERRUPTED}

# --------------------------------------------------------------------------- run.json

RUN_JSON_VERSION = 2  # 2: processes carry health_url; the run carries max_steps


class RunInfoError(VlmrlError):
    """A ``run.json`` that this vlmrl cannot read (another schema version, a wrong field)."""

    exit_code = EXIT_BAD_CONFIG


def _check(cond: bool, where: str, key: str, want: str, value: Any) -> None:
    if not cond:
        raise RunInfoError(f"{where}: {key} must be {want}, got {value!r}")


def _opt_num(d: Mapping[str, Any], key: str, where: str) -> float | None:
    v = d.get(key)
    _check(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), where, key, "a number", v)
    return None if v is None else float(v)


def _opt_int(d: Mapping[str, Any], key: str, where: str) -> int | None:
    v = d.get(key)
    _check(v is None or (isinstance(v, int) and not isinstance(v, bool)), where, key, "an integer", v)
    return v


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    _check(v is None or isinstance(v, str), where, key, "a string", v)
    return v


def _ports(d: Mapping[str, Any], source: str) -> dict[str, int]:
    ports = d.get("ports", {})
    ok = isinstance(ports, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in ports.values())
    _check(ok, source, "ports", "an object of port numbers", ports)
    return {str(k): v for k, v in ports.items()}


@dataclass
class ProcessInfo:
    """One supervised process as ``run.json`` records it (the supervisor updates it in place)."""

    name: str
    argv: list[str]
    log: str
    status: str = PENDING
    pid: int | None = None
    pgid: int | None = None
    started_at: float | None = None  # Unix epoch seconds
    healthy_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None  # Popen convention: -9 = killed by SIGKILL
    signal: str | None = None  # "SIGKILL" when a signal ended it
    restarts: int = 0
    reason: str | None = None  # why it is in this status
    stopping: bool = False  # vlmrl is stopping it
    health: str | None = None  # the supervisor's probe once healthy: "ok" | "failing"
    health_url: str | None = None  # what the supervisor probes (None: no probe)

    @property
    def alive(self) -> bool:
        """A process of this name exists now."""
        return self.status in ALIVE_STATUSES

    def uptime(self, now: float) -> float | None:
        """Seconds since its (last) start, up to now while alive, else to its end."""
        if self.started_at is None:
            return None
        end = now if self.alive or self.ended_at is None else self.ended_at
        return max(0.0, end - self.started_at)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, name: str, d: Any, source: str = RUN_FILE) -> "ProcessInfo":
        where = f"{source}: processes.{name}"
        _check(isinstance(d, dict), source, f"processes.{name}", "an object", d)
        status = d.get("status")
        _check(status in PROCESS_STATUSES, where, "status", f"one of {sorted(PROCESS_STATUSES)}", status)
        argv = d.get("argv", [])
        _check(isinstance(argv, list) and all(isinstance(a, str) for a in argv), where, "argv", "a list of strings",
               argv)
        restarts = d.get("restarts", 0)
        _check(isinstance(restarts, int) and not isinstance(restarts, bool), where, "restarts", "an integer", restarts)
        stopping = d.get("stopping", False)
        _check(isinstance(stopping, bool), where, "stopping", "true or false", stopping)
        return cls(
            name=name, argv=list(argv), log=_opt_str(d, "log", where) or "", status=status,
            pid=_opt_int(d, "pid", where), pgid=_opt_int(d, "pgid", where),
            started_at=_opt_num(d, "started_at", where), healthy_at=_opt_num(d, "healthy_at", where),
            ended_at=_opt_num(d, "ended_at", where), exit_code=_opt_int(d, "exit_code", where),
            signal=_opt_str(d, "signal", where), restarts=restarts, reason=_opt_str(d, "reason", where),
            stopping=stopping, health=_opt_str(d, "health", where), health_url=_opt_str(d, "health_url", where),
        )


@dataclass
class HistoryEntry:
    """One status change: of a process (``proc`` set) or of the run (``proc`` None)."""

    time: float
    proc: str | None
    status: str
    reason: str | None = None

    def line(self) -> str:
        """``server: healthy - answered ...`` or ``run: stopping - stop requested``."""
        return f"{self.proc or 'run'}: {self.status}" + (f" - {self.reason}" if self.reason else "")


def state_line(p: ProcessInfo) -> str:
    """One human line for a process state (``trainer: failed - exit code 3``)."""
    return f"{p.name}: {p.status}" + (f" - {p.reason}" if p.reason else "")


@dataclass
class RunInfo:
    """The whole ``run.json``: written by the supervisor on every change, read by every view."""

    name: str
    status: str
    run_dir: str = ""
    config: str = ""
    supervisor_pid: int | None = None
    exit_code: int | None = None  # set once the run ended (RUN_EXIT_CODES)
    started_at: float | None = None
    ended_at: float | None = None
    ports: dict[str, int] = field(default_factory=dict)  # "server", "sync"
    server_url: str | None = None
    engine: str | None = None
    model: str | None = None
    max_steps: int | None = None
    control_socket: str | None = None  # None when the supervisor no longer listens
    failed_process: str | None = None
    reason: str | None = None
    stop_grace_s: float | None = None
    processes: dict[str, ProcessInfo] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    version: int = RUN_JSON_VERSION
    slurm_job: str | None = None  # the SLURM job id of a run started by `vlmrl run --slurm`
    nodes: dict[str, list[str]] = field(default_factory=dict)  # process -> the nodes it runs on (SLURM)
    host: str | None = None  # where the supervisor runs (its pid means something there only)

    @property
    def finished(self) -> bool:
        return self.status in RUN_TERMINAL

    def proc(self, name: str) -> ProcessInfo | None:
        return self.processes.get(name)

    def lost(self, reason: str, now: float, status: str = RUN_FAILED) -> None:
        """Mark a run whose supervisor died before finishing (killed with its SLURM job, say)
        as ``status`` (failed, or stopped when someone cancelled the job), and say why: what a
        reader of ``run.json`` finds afterwards."""
        self.status, self.reason, self.exit_code = status, reason, RUN_EXIT_CODES[status]
        self.ended_at, self.control_socket = now, None
        self.history.append(HistoryEntry(now, None, status, reason))

    def procs(self) -> list[ProcessInfo]:
        """Processes in display order (prepare, server, trainer, ...)."""
        return [self.processes[n] for n in sorted(self.processes, key=proc_sort_key)]

    def pids(self) -> dict[str, int]:
        """Pids of the processes that are alive now."""
        return {p.name: p.pid for p in self.processes.values() if p.alive and p.pid is not None}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["processes"] = {n: p.to_json() for n, p in self.processes.items()}
        d["history"] = [asdict(h) for h in self.history]
        return d

    @classmethod
    def from_json(cls, d: Any, source: str = RUN_FILE) -> "RunInfo":
        """Parse ``run.json`` content; :class:`RunInfoError` names the field that is wrong."""
        _check(isinstance(d, dict), source, "the file", "a JSON object", type(d).__name__)
        version = d.get("version")
        if version != RUN_JSON_VERSION:
            if isinstance(version, int) and not isinstance(version, bool):
                age = "an older" if version < RUN_JSON_VERSION else "a newer"
                raise RunInfoError(
                    f"{source} has schema version {version}, written by {age} vlmrl; this vlmrl reads version "
                    f"{RUN_JSON_VERSION}: use the vlmrl that made the run (or start a new one)")
            raise RunInfoError(f"{source} has no schema version: it was not written by a vlmrl supervisor")
        name, status = d.get("name"), d.get("status")
        _check(isinstance(name, str), source, "name", "a string", name)
        _check(status in RUN_STATUSES, source, "status", f"one of {sorted(RUN_STATUSES)}", status)
        procs = d.get("processes", {})
        _check(isinstance(procs, dict), source, "processes", "an object", procs)
        history = d.get("history", [])
        _check(isinstance(history, list), source, "history", "a list", history)
        entries = []
        for i, h in enumerate(history):
            where = f"{source}: history[{i}]"
            _check(isinstance(h, dict) and isinstance(h.get("status"), str), source, f"history[{i}]",
                   "an object with a status", h)
            entries.append(HistoryEntry(time=_opt_num(h, "time", where) or 0.0, proc=_opt_str(h, "proc", where),
                                        status=h["status"], reason=_opt_str(h, "reason", where)))
        return cls(
            name=name, status=status, run_dir=_opt_str(d, "run_dir", source) or "",
            config=_opt_str(d, "config", source) or "", supervisor_pid=_opt_int(d, "supervisor_pid", source),
            exit_code=_opt_int(d, "exit_code", source), started_at=_opt_num(d, "started_at", source),
            ended_at=_opt_num(d, "ended_at", source), ports=_ports(d, source),
            server_url=_opt_str(d, "server_url", source),
            engine=_opt_str(d, "engine", source), model=_opt_str(d, "model", source),
            max_steps=_opt_int(d, "max_steps", source), control_socket=_opt_str(d, "control_socket", source),
            failed_process=_opt_str(d, "failed_process", source), reason=_opt_str(d, "reason", source),
            stop_grace_s=_opt_num(d, "stop_grace_s", source),
            processes={str(n): ProcessInfo.from_json(str(n), p, source) for n, p in procs.items()},
            history=entries, version=version, slurm_job=_opt_str(d, "slurm_job", source),
            host=_opt_str(d, "host", source),
            nodes={str(k): [str(n) for n in v] for k, v in (d.get("nodes") or {}).items() if isinstance(v, list)}
            if isinstance(d.get("nodes"), dict) else {},
        )

    @classmethod
    def read(cls, path: str | Path) -> "RunInfo | None":
        """The ``run.json`` at ``path``; None while it does not exist or is not (yet) whole JSON.

        Raises :class:`RunInfoError` for a file of another schema version or a wrong field.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cls.from_json(data, source=str(path))


# --------------------------------------------------------------------------- metrics.jsonl

# The keys of a metrics.jsonl line (one line per optimizer step), written by the trainer.
STEP = "step"
REWARD_MEAN = "reward_mean"
REWARD_STD = "reward_std"
LOSS = "loss"
IR = "ir"  # importance ratio pi_theta / pi_behaviour, mean over loss tokens
IR_MIN = "ir_min"
IR_MAX = "ir_max"
CLIP_FRAC = "clip_frac"
MASKED_FRAC = "masked_frac"
MISMATCH_KL = "mismatch_kl"  # KL(behaviour || trainer): how off-policy the rollouts were
KL = "kl"  # KL(trainer || reference); 0 without a reference model
ENTROPY = "entropy"
GRAD_NORM = "grad_norm"
LR = "lr"
NUM_ROLLOUTS = "num_rollouts"
DROPPED = "dropped"  # rollouts left out of the batch (overlong, empty, bad images)
EXAMPLES_DROPPED = "examples_dropped"  # examples (whole groups) refused for their content: DropRecords
LOSS_TOKENS = "loss_tokens"
TRAINED_SEQUENCES = "trained_sequences"
TOKENS = "tokens"
TOKENS_PER_S = "tokens_per_s"
# Where a step's time went: step_s = rollout_s + train_s + sync_s + write_s, and train_s =
# batch_s + forward_backward_s + optimizer_s (what is left, a few function calls, is not split)
ROLLOUT_S = "rollout_s"  # waiting for this step's rollouts (and checking them)
TRAIN_S = "train_s"  # advantages, batches, forward/backward and the update
BATCH_S = "batch_s"  # advantages, processor work and tensors of the micro-batches
FORWARD_BACKWARD_S = "forward_backward_s"
OPTIMIZER_S = "optimizer_s"  # gradient clipping, the optimizer and scheduler steps, reductions
SYNC_S = "sync_s"  # the weights sent to the server
WRITE_S = "write_s"  # handing the rollouts to the writer thread (PNG and JSON are written off the step)
STEP_S = "step_s"
PHASES: tuple[str, ...] = (ROLLOUT_S, TRAIN_S, SYNC_S, WRITE_S)  # they add up to STEP_S
TRAIN_PHASES: tuple[str, ...] = (BATCH_S, FORWARD_BACKWARD_S, OPTIMIZER_S)  # they add up to about TRAIN_S
TIME = "time"  # Unix epoch seconds when the step ended
TURNS = "episode_turns"  # multi-turn environments: model turns per episode, mean over the step's episodes
WEIGHT_VERSION = "weights_version"  # the weights version the server holds (or is receiving) after the step

METRIC_KEYS: tuple[str, ...] = (
    STEP, REWARD_MEAN, REWARD_STD, LOSS, IR, IR_MIN, IR_MAX, CLIP_FRAC, MASKED_FRAC, MISMATCH_KL, KL, ENTROPY,
    GRAD_NORM, LR, NUM_ROLLOUTS, DROPPED, EXAMPLES_DROPPED, LOSS_TOKENS, TRAINED_SEQUENCES, TOKENS, TOKENS_PER_S,
    ROLLOUT_S, TRAIN_S, BATCH_S, FORWARD_BACKWARD_S, OPTIMIZER_S, SYNC_S, WRITE_S, STEP_S, TIME, TURNS, WEIGHT_VERSION,
)


@dataclass(frozen=True)
class MetricRecord:
    """One ``metrics.jsonl`` line: the step and its values by key (see :data:`METRIC_KEYS`)."""

    step: int
    values: Mapping[str, Any]

    def get(self, key: str) -> float | None:
        """The value of ``key`` as a float (NaN and inf included); None if absent or not a number."""
        v = self.values.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        return float(v)

    def finite(self, key: str) -> float | None:
        """Like :meth:`get`, but None for NaN and infinities (what a chart can draw)."""
        v = self.get(key)
        return v if v is not None and math.isfinite(v) else None

    def to_json(self) -> dict[str, Any]:
        """The JSON line: NaN and infinities become null (JSON has no NaN)."""
        out: dict[str, Any] = {STEP: self.step}
        for k, v in self.values.items():
            if k != STEP:
                out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out

    @classmethod
    def from_json(cls, d: Any) -> "MetricRecord | None":
        """Parse one line's object; None when it has no integer ``step`` (not a metric line)."""
        if isinstance(d, MetricRecord):
            return d
        step = line_step(d)
        return None if step is None else cls(step, dict(d))


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class TrainerState:
    """A checkpoint's ``trainer_state.json``: its step, the ``[trainer.args]`` it ran with and
    the run identity ``--resume`` compares (None for a checkpoint of the Python API)."""

    step: int
    config: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, source: str = TRAINER_STATE) -> "TrainerState":
        step = _int_field(d, "step")
        if step is None:
            raise ValueError(f"{source}: no integer step")
        config, identity = d.get("config"), d.get("identity")
        return cls(step, config if isinstance(config, dict) else {}, identity if isinstance(identity, dict) else None)


# --------------------------------------------------------------------------- eval.jsonl


@dataclass(frozen=True)
class EvalRecord:
    """One ``eval.jsonl`` line: greedy scores on the held-out split after ``step``.

    ``accuracy`` is the mean reward (the name predates multi-part rewards; for the colour
    task it is the share of right answers); ``parts`` the mean of each reward part,
    ``achievements`` the success rate of each (for games that have them).
    """

    step: int
    accuracy: float
    n: int  # held-out prompts or episodes scored
    time: float
    std: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    achievements: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "EvalRecord | None":
        """Parse one line's object; None when it is not an eval line (no integer step or no mean)."""
        step = line_step(d)
        acc = d.get("accuracy") if isinstance(d, Mapping) else None
        if step is None or isinstance(acc, bool) or not isinstance(acc, (int, float)):
            return None

        def floats(key: str) -> dict[str, float]:
            v = d.get(key)
            return {str(k): float(x) for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)
                    } if isinstance(v, Mapping) else {}

        n, t, std = d.get("n"), d.get("time"), d.get("std")
        return cls(step, float(acc), n if isinstance(n, int) and not isinstance(n, bool) else 0,
                   float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else 0.0,
                   float(std) if isinstance(std, (int, float)) and not isinstance(std, bool) else None,
                   floats("parts"), floats("achievements"))


# --------------------------------------------------------------------------- rollouts.jsonl


def _json_safe(v: Any) -> Any:
    """``v`` with what JSON cannot hold turned into strings (turn info comes from environments)."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return str(v)


@dataclass(frozen=True)
class TurnRecord:
    """One model turn of an episode in a rollout record: what the model saw and did, and its reward."""

    completion: str
    reward: float
    reward_parts: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the parsed action
    images: list[str] = field(default_factory=list)  # the images of this turn's new observation
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # the server's count for this turn's whole prompt
    completion_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["info"] = _json_safe(self.info)
        return d

    @classmethod
    def from_json(cls, d: Any) -> "TurnRecord":
        """Parse one turn's object; ``ValueError`` naming the first wrong field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a turn must be an object, got {type(d).__name__}")
        reward = d.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise ValueError(f"turn field 'reward' is {reward!r}")
        parts = d.get("reward_parts") or {}
        info = d.get("info") or {}
        return cls(
            completion=str(d.get("completion") or ""), reward=float(reward),
            reward_parts={str(k): float(v) for k, v in parts.items() if isinstance(v, (int, float))}
            if isinstance(parts, Mapping) else {},
            info=dict(info) if isinstance(info, Mapping) else {},
            images=[str(p) for p in d.get("images") or []],
            finish_reason=d.get("finish_reason") if isinstance(d.get("finish_reason"), str) else None,
            prompt_tokens=_int_field(d, "prompt_tokens"),
            completion_tokens=_int_field(d, "completion_tokens") or 0,
        )


@dataclass(frozen=True)
class RolloutRecord:
    """One ``rollouts.jsonl`` line: a scored completion, the images it saw and its advantage."""

    step: int
    index: int  # within the step
    group: int  # rollouts of a group share a prompt
    example_id: str
    prompt: str  # the prompt's text, images marked "<image>"
    completion: str
    reward: float
    reward_parts: dict[str, float] = field(default_factory=dict)
    advantage: float | None = None
    answer: str | int | float | bool | None = None
    finish_reason: str | None = None
    weight_version: int | None = None  # the server's weights that sampled it
    images: list[str] = field(default_factory=list)  # PNG paths relative to the run directory
    #: an episode's model turns (empty for a single-turn rollout); ``completion`` is then the
    #: last reply and ``reward``/``reward_parts`` the episode's sums
    turns: list[TurnRecord] = field(default_factory=list)
    end_reason: str | None = None  # why an episode ended (done, max_turns, context, cut: ...)
    summary: dict[str, float] = field(default_factory=dict)  # an episode's flat metrics

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["turns"] = [t.to_json() for t in self.turns]
        return d

    @classmethod
    def from_json(cls, d: Any) -> "RolloutRecord":
        """Parse one line's object; ``ValueError`` naming the first wrong field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a rollout record must be an object, got {type(d).__name__}")

        def req(key: str, kinds: tuple[type, ...]) -> Any:
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise ValueError(f"rollout field {key!r} is {v!r}")
            return v

        parts = d.get("reward_parts") or {}
        adv = d.get("advantage")
        version = d.get("weight_version")
        answer = d.get("answer")
        return cls(
            step=req("step", (int,)), index=req("index", (int,)), group=req("group", (int,)),
            example_id=str(req("example_id", (str,))), prompt=str(d.get("prompt") or ""),
            completion=str(d.get("completion") or ""), reward=float(req("reward", (int, float))),
            reward_parts={str(k): float(v) for k, v in parts.items() if isinstance(v, (int, float))}
            if isinstance(parts, Mapping) else {},
            advantage=float(adv) if isinstance(adv, (int, float)) and not isinstance(adv, bool) else None,
            answer=answer if isinstance(answer, (str, int, float, bool)) else None,
            finish_reason=d.get("finish_reason") if isinstance(d.get("finish_reason"), str) else None,
            weight_version=version if isinstance(version, int) and not isinstance(version, bool) else None,
            images=[str(p) for p in d.get("images") or []],
            turns=[TurnRecord.from_json(t) for t in d.get("turns") or []],
            end_reason=d.get("end_reason") if isinstance(d.get("end_reason"), str) else None,
            summary={str(k): float(v) for k, v in (d.get("summary") or {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if isinstance(d.get("summary"), Mapping) else {},
        )


@dataclass(frozen=True)
class DropRecord:
    """A ``rollouts.jsonl`` line for an example left out of its step (its whole group): the
    server refused it for its content, or its image could not be sent. It has no reward, so a
    reader of rollout lines (:meth:`RolloutRecord.from_json`) refuses it; tell the two apart
    with :meth:`from_json` first. ``index`` is the one its group's first rollout would have had,
    so ``(step, index)`` stays unique in the file."""

    step: int
    index: int
    group: int
    example_id: str
    drop_reason: str  # what the server (or the client) said
    error_code: str | None = None  # invalid_image, image_too_large, too_many_images, prompt_too_long, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> "DropRecord | None":
        """The drop record of one line's object; None when it is not one (a rollout line)."""
        pos = rollout_position(d)
        reason = d.get("drop_reason") if isinstance(d, Mapping) else None
        if pos is None or not isinstance(reason, str):
            return None
        code = d.get("error_code")
        return cls(pos[0], pos[1], _int_field(d, "group") or 0, str(d.get("example_id") or ""), reason,
                   code if isinstance(code, str) else None)


def _int_field(d: Any, key: str) -> int | None:
    v = d.get(key) if isinstance(d, Mapping) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def line_step(d: Any) -> int | None:
    """The step of a metrics, rollouts or eval line (None when it has no integer step)."""
    return _int_field(d, STEP)


def rollout_position(d: Any) -> tuple[int, int] | None:
    """(step, index) of a rollouts.jsonl object, without parsing the rest (None if it has none).

    A view holding thousands of lines parses a line whole only when it is shown.
    """
    step, index = line_step(d), _int_field(d, "index")
    return None if step is None or index is None else (step, index)


# --------------------------------------------------------------------------- the step line

# What the one-line form shows: (label, key, format).
_LINE_FIELDS = (("reward", REWARD_MEAN, ".2f"), ("loss", LOSS, ".3f"), ("ir", IR, ".2f"), ("ent", ENTROPY, ".2f"),
                ("kl", KL, ".3f"))


def step_line(rec: MetricRecord | Mapping[str, Any], max_steps: int, step_s: float | None = None,
              missing: str | None = None) -> str:
    """``step 12/100 reward=0.62 loss=0.045 ir=1.02 ent=2.34 kl=0.010 4.10s/it``.

    A value the record lacks is left out, or shown as ``missing`` when given; ``step_s``
    stands in for a record without ``step_s`` (time measured by the viewer).
    """
    m = MetricRecord.from_json(rec)
    step = m.step if m is not None else "?"
    parts = [f"step {step}/{max_steps}" if max_steps else f"step {step}"]
    for label, key, fmt in _LINE_FIELDS:
        v = m.get(key) if m is not None else None
        if v is not None:
            parts.append(f"{label}={format(v, fmt) if math.isfinite(v) else v}")
        elif missing is not None:
            parts.append(f"{label}={missing}")
    t = m.get(STEP_S) if m is not None else None
    t = t if t is not None else step_s
    if t is not None and math.isfinite(t):
        parts.append(f"{t:.2f}s/it")
    return " ".join(parts)
