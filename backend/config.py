"""The config schema: one pydantic tree for the TOML users write.

The format extends the `vf-rl` TOML (top-level ``model``, ``[env]``, ``[inference]``,
``[trainer]`` with ``[trainer.args]``) with ``[nccl]`` and ``[run]``. Every problem is
reported as one line ``FILE: table.key: message`` through :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backend.errors import ConfigError
from backend.net import connect_host

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# NCCL variables (without the NCCL_ prefix) that NCCL documents; used to catch typos.
KNOWN_NCCL_VARS: frozenset[str] = frozenset(
    {
        "P2P_DISABLE", "P2P_LEVEL", "P2P_DIRECT_DISABLE", "P2P_READ_ENABLE", "P2P_NET_CHUNKSIZE",
        "P2P_PCI_CHUNKSIZE", "P2P_NVL_CHUNKSIZE", "P2P_USE_CUDA_MEMCPY",
        "SHM_DISABLE", "SHM_USE_CUDA_MEMCPY", "SHM_MEMCPY_MODE",
        "IB_DISABLE", "IB_HCA", "IB_TIMEOUT", "IB_RETRY_CNT", "IB_GID_INDEX", "IB_TC", "IB_SL",
        "IB_QPS_PER_CONNECTION", "IB_PCI_RELAXED_ORDERING", "IB_ADAPTIVE_ROUTING",
        "NET_GDR_LEVEL", "NET_GDR_READ", "NET_PLUGIN", "NET", "NET_SHARED_BUFFERS",
        "SOCKET_IFNAME", "SOCKET_FAMILY", "SOCKET_NTHREADS", "NSOCKS_PERTHREAD",
        "DEBUG", "DEBUG_SUBSYS", "DEBUG_FILE",
        "ALGO", "PROTO", "BUFFSIZE", "NTHREADS", "MAX_NCHANNELS", "MIN_NCHANNELS",
        "MAX_CTAS", "MIN_CTAS", "CROSS_NIC", "CHECKS_DISABLE", "CHECK_POINTERS",
        "LAUNCH_MODE", "COMM_BLOCKING", "BLOCKING_WAIT", "ASYNC_ERROR_HANDLING",
        "CUMEM_ENABLE", "CUMEM_HOST_ENABLE", "NVLS_ENABLE", "NVLS_CHUNKSIZE",
        "TOPO_FILE", "TOPO_DUMP_FILE", "GRAPH_FILE", "GRAPH_DUMP_FILE", "IGNORE_CPU_AFFINITY",
        "COLLNET_ENABLE", "TREE_THRESHOLD", "LL_THRESHOLD", "LL128_ENABLE",
        "SET_STACK_SIZE", "GRAPH_MIXING_SUPPORT", "RUNTIME_CONNECT", "TIMEOUT",
        "WORK_FIFO_DEPTH", "CONF_FILE", "HOSTID", "PXN_DISABLE", "NVB_DISABLE",
        "SINGLE_RING_THRESHOLD", "RAS_ENABLE", "MNNVL_ENABLE",
        # NCCL >= 2.30: lets two ranks of one communicator use the same GPU (a colocated
        # server and trainer, or MIG slices of one GPU); older NCCL refuses "Duplicate GPU".
        "MULTI_RANK_GPU_ENABLE",
    }
)

_CONFIG = ConfigDict(extra="forbid", validate_assignment=True)


class EnvConfig(BaseModel):
    """``[env]``: which environment and its arguments."""

    model_config = _CONFIG
    id: str = Field(description="environments/ registry name, e.g. 'colors'")
    args: dict[str, Any] = Field(default_factory=dict, description="passed to the environment factory")


RestartPolicy = Literal["never", "on-failure"]


class RestartSettings(BaseModel):
    """How the supervisor restarts a process that dies unexpectedly (``[inference]`` and
    ``[trainer]`` take these keys; each sets its own defaults)."""

    model_config = _CONFIG
    restart: RestartPolicy = Field("never", description="never, or on-failure (with exponential backoff)")
    max_restarts: int = Field(0, ge=0, description="restarts allowed before the run fails")
    restart_backoff_s: float = Field(2.0, ge=0, description="delay before the first restart; doubles each time")


class InferenceArgs(BaseModel):
    """``[inference.args]``: passed to the engine. Unknown keys are kept for vLLM only."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    max_model_len: int = Field(4096, gt=0, description="longest prompt+completion in tokens")
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 4})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool | None = None
    tensor_parallel_size: int | None = Field(None, ge=1)
    data_parallel_size: int | None = Field(None, ge=1)
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="largest accepted image (w*h)")
    max_batch_size: int = Field(64, gt=0, description="hf engine: sequences generated together")
    batch_wait_ms: float = Field(5.0, ge=0, description="hf engine: time to gather a batch")
    allowed_local_media_path: str | None = Field(
        None, description="directory whose images requests may name by path (vLLM's option of the same name)"
    )

    @field_validator("limit_mm_per_prompt")
    @classmethod
    def _non_negative_limits(cls, v: dict[str, int]) -> dict[str, int]:
        for k, n in v.items():
            if n < 0:
                raise ValueError(f"limit for {k!r} must be >= 0, got {n}")
        return v


#: ``[inference.args] allowed_media_domains`` of a vllm server when ``allow_http_media`` is off. vLLM
#: fetches every http(s) image URL unless this names hosts; no URL's host equals this one (URL parsers
#: lower-case host names, and ``.invalid`` never resolves), so vLLM fetches none.
NO_REMOTE_MEDIA = "NO-REMOTE-MEDIA.INVALID"
_MEDIA_DOMAINS = "allowed_media_domains"


class InferenceConfig(RestartSettings):
    """``[inference]``: the inference server process."""

    model_config = _CONFIG
    engine: Literal["hf", "vllm"] = "hf"
    gpus: int = Field(0, ge=0, description="GPUs for the server (0 = CPU)")
    host: str = Field("127.0.0.1", description="address the server binds; anything but loopback exposes the "
                                               "admin routes to the network, guarded by the run token only")
    allow_http_media: bool = Field(
        False, description="vllm engine: fetch the http(s) image URLs requests name (narrow the hosts with "
                           "[inference.args] allowed_media_domains); off, images come only as data: URLs or files "
                           "under allowed_local_media_path. The hf engine never fetches",
    )
    port: int = Field(8000, ge=1, le=65535)
    python: str | None = Field(None, description="python of the venv that has vLLM (engine='vllm')")
    update_pause: Literal["wait", "keep"] = Field(
        "wait", description="vllm engine, a weight update meeting running requests: 'wait' lets them finish "
                            "first; 'keep' freezes them and they finish on the new weights (KV recomputed). "
                            "The hf engine always receives while it generates and swaps between batches")
    startup_timeout_s: float = Field(600.0, gt=0)
    # a restarted server gets the trainer's current weights pushed again: restart it by default
    restart: RestartPolicy = "on-failure"
    max_restarts: int = Field(2, ge=0)
    args: InferenceArgs = Field(default_factory=InferenceArgs)

    @model_validator(mode="after")
    def _remote_media(self) -> "InferenceConfig":
        """A vllm server gets ``allowed_media_domains = NO_REMOTE_MEDIA`` unless ``allow_http_media``."""
        domains = (self.args.model_extra or {}).get(_MEDIA_DOMAINS)
        if domains == NO_REMOTE_MEDIA:  # set here (a resolved config read back, or the engine changed)
            if self.engine != "vllm" or self.allow_http_media:
                delattr(self.args, _MEDIA_DOMAINS)
        elif self.engine == "vllm" and not self.allow_http_media:
            if domains is not None:
                raise ValueError(f"__args.{_MEDIA_DOMAINS}__: lets vLLM fetch http(s) images; set [inference] "
                                 "allow_http_media = true as well, or remove it")
            setattr(self.args, _MEDIA_DOMAINS, NO_REMOTE_MEDIA)
        return self


#: LoRA's default targets: the language model's attention and MLP projections of Qwen-VL and
#: LLaVA (LLaVA's CLIP tower also has q_proj/k_proj/v_proj, so a bare name list would adapt it)
LORA_DEFAULT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class LoraSettings(BaseModel):
    """``[trainer.args] lora``: train low-rank adapters instead of all weights (peft)."""

    model_config = _CONFIG
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the update is alpha / r * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        LORA_DEFAULT_TARGETS, description="module names (list) or a full-match regex (string), as peft takes them",
    )


#: ``[trainer.args] report_to``: the experiment trackers vlmrl feeds (backend/trackers.py)
TrackerName = Literal["trackio", "wandb", "tensorboard"]
TRACKERS: tuple[str, ...] = get_args(TrackerName)


class MultimodalRLConfig(BaseModel):
    """``[trainer.args]``: everything the GRPO trainer needs."""

    model_config = _CONFIG
    run_name: str | None = Field(None, description="run directory name (default: from config file)")
    output_dir: str = Field("runs", description="parent of run directories")
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate after warmup: constant, or decayed to 0 at max_steps"
    )
    max_grad_norm: float = Field(1.0, gt=0)
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(32, gt=0, description="rollouts per optimizer step")
    micro_batch_size: int = Field(8, gt=0, description="rollouts per forward/backward")
    rollouts_per_step: int = Field(4, gt=0, description="completions per prompt (group size)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, gt=0, description="max new tokens per completion")
    mask_ratio_low: float = Field(0.1, ge=0)
    mask_ratio_high: float = Field(10.0, gt=0)
    clip_eps_low: float = Field(0.2, ge=0)
    clip_eps_high: float = Field(0.28, ge=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference model")
    scale_rewards: bool = Field(True, description="divide advantages by the group std")
    loss_agg: Literal["token", "sequence"] = "token"
    seed: int = 0
    sync_to_vllm_every: int = Field(1, gt=0)
    async_level: int = Field(
        1, ge=0, le=1,
        description="with a server: rollouts of the next step are generated while this one trains (0: on-policy)",
    )
    log_every_steps: int = Field(1, gt=0)
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    max_concurrent: int = Field(128, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    bucket_size_mb: int | None = Field(
        None, gt=0,
        description="weight-sync bucket size in MiB (default: 64 over gloo on CPU, 512 over NCCL on GPU, where "
                    "each bucket costs one HTTP call and one engine RPC)",
    )
    sync_port: int | None = Field(None, ge=1, le=65535, description="weight-sync rendezvous port")
    adapter: str | None = Field(None, description="adapter name; default from model_type")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype of the forward/backward and of the weights sent to the server",
    )
    low_precision_update: Literal["fp32-master", "stochastic-rounding"] = Field(
        "fp32-master",
        description="with dtype bfloat16/float16: 'fp32-master' keeps fp32 weights and optimizer state and runs "
                    "the forward/backward under autocast (float16 adds loss scaling); 'stochastic-rounding' "
                    "keeps bf16 weights and state and rounds each AdamW update stochastically (half the memory, "
                    "updates kept in expectation; bfloat16 only)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, ~30% more compute)",
    )
    lora: LoraSettings | None = Field(None, description="LoRA adapters (absent: full fine-tuning)")
    freeze_vision: bool = Field(False, description="never update the vision tower (with LoRA it is frozen anyway "
                                                   "unless target_modules reach it)")
    fsdp_cpu_offload: bool = Field(False, description="several trainer ranks: keep parameters, gradients and "
                                                     "optimizer state on the CPU between uses (FSDP2 offload)")
    torch_threads: int | None = Field(None, gt=0)
    eval_every: int = Field(0, ge=0)
    eval_size: int = Field(32, gt=0)
    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="experiment trackers that get every metric and rollout tables: trackio, wandb, tensorboard "
                    "(a name or a list; pip extras of the same names); the run directory keeps everything anyway",
    )
    log_rollouts_every: int = Field(10, ge=0, description="steps between rollout tables sent to the trackers (0: none)")
    tracker_project: str = Field("vlmrl", min_length=1, description="trackio and wandb project (the tracker run is "
                                                                   "named after the run directory)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, v: Any) -> Any:
        """One name or a list, as TRL takes it ("none": no tracker); an unknown name is refused."""
        names = ([] if v == "none" else [v]) if isinstance(v, str) else v
        if not isinstance(names, list):
            return v  # pydantic reports the type
        for name in names:
            if isinstance(name, str) and name not in TRACKERS:
                hint = difflib.get_close_matches(name, TRACKERS, n=1)
                more = f"did you mean {hint[0]!r}? " if hint else ""
                raise ValueError(f"unknown tracker {name!r}; {more}known: {', '.join(TRACKERS)}")
        return list(dict.fromkeys(names))  # each tracker once

    @model_validator(mode="after")
    def _check_sizes(self) -> "MultimodalRLConfig":
        if self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"__micro_batch_size__: {self.micro_batch_size} must be <= batch_size ({self.batch_size})"
            )
        if self.batch_size % self.rollouts_per_step:
            raise ValueError(
                f"__batch_size__: {self.batch_size} must be a multiple of rollouts_per_step "
                f"({self.rollouts_per_step})"
            )
        if self.mask_ratio_low >= self.mask_ratio_high:
            raise ValueError("__mask_ratio_low__: must be < mask_ratio_high")
        if self.low_precision_update == "stochastic-rounding" and self.dtype != "bfloat16":
            raise ValueError(
                f"__low_precision_update__: 'stochastic-rounding' needs dtype = \"bfloat16\" (dtype is {self.dtype!r})"
            )
        return self

    def bucket_bytes(self, backend: str) -> int:
        """Weight-sync bucket size for ``backend`` (``bucket_size_mb`` or its default)."""
        mb = self.bucket_size_mb if self.bucket_size_mb is not None else (512 if backend == "nccl" else 64)
        return mb << 20

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.rollouts_per_step


class TrainerConfig(RestartSettings):
    """``[trainer]``: the trainer process."""

    model_config = _CONFIG
    gpus: int = Field(0, ge=0, description="GPUs for the trainer (0 = CPU)")
    processes: int | None = Field(None, gt=0, description="trainer ranks (torchrun, FSDP2); default: gpus, "
                                                          "or 1 on CPU")
    args: MultimodalRLConfig = Field(default_factory=MultimodalRLConfig)

    @model_validator(mode="after")
    def _ranks(self) -> "TrainerConfig":
        if self.processes is not None and self.gpus and self.processes != self.gpus:
            raise ValueError(f"__processes__: is {self.processes} but gpus is {self.gpus}; on GPU each rank "
                             "has one GPU (leave processes out, or make them equal)")
        if self.ranks > 1 and self.args.lora is not None:
            raise ValueError("__processes__: LoRA with several trainer ranks is not supported yet; "
                             "use one rank (processes = 1) or full fine-tuning")
        return self

    @property
    def ranks(self) -> int:
        """How many trainer processes run (torchrun's nproc-per-node)."""
        return self.processes if self.processes is not None else max(self.gpus, 1)


class RunConfig(BaseModel):
    """``[run]``: the supervisor."""

    model_config = _CONFIG
    stop_grace_s: float = Field(10.0, ge=0, description="SIGTERM -> SIGKILL delay")
    health_poll_s: float = Field(1.0, gt=0)
    share_gpus: bool = Field(False, description="allow server and trainer on the same GPUs")
    launcher: Literal["local", "slurm"] = Field("local", description="'slurm': vlmrl run submits the run as a "
                                                                     "SLURM job ([slurm] table), as --slurm does")


class SlurmConfig(BaseModel):
    """``[slurm]``: how ``vlmrl run --slurm`` asks SLURM for the run's nodes."""

    model_config = _CONFIG
    partition: str | None = None
    account: str | None = None
    time: str = Field("01:00:00", description="the job's time limit (sbatch --time)")
    inference_nodes: int = Field(1, ge=1, description="nodes for the inference server")
    trainer_nodes: int = Field(1, ge=1, description="nodes for the trainer (torchrun across them)")
    gpus_per_node: int = Field(0, ge=0, description="sbatch --gpus-per-node (0: none asked)")
    cpus_per_node: int | None = Field(None, ge=1, description="sbatch --cpus-per-task (one task per node)")
    sbatch: list[str] = Field(default_factory=list, description="more sbatch options, e.g. '--qos=high'")
    setup: list[str] = Field(default_factory=list, description="shell lines run first on the job's first node "
                                                               "(module load, source a venv)")
    socket_ifname: str | None = Field(None, description="network interface for NCCL and gloo between nodes "
                                                        "(NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)")
    rdzv_port: int = Field(29400, ge=1, le=65535, description="torchrun's rendezvous port on the first "
                                                              "trainer node")

    @field_validator("sbatch")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for opt in v:
            if not opt.startswith("-") or "\n" in opt:
                raise ValueError(f"sbatch options look like '--qos=high', got {opt!r}")
        return v


class VlmrlConfig(BaseModel):
    """The whole config file."""

    model_config = _CONFIG
    model: str = Field(description="hub id, local path, or builtin:tiny-<family>")
    env: EnvConfig
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    nccl: dict[str, str | int | bool] = Field(default_factory=dict)
    run: RunConfig = Field(default_factory=RunConfig)
    slurm: SlurmConfig | None = None

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("nccl")
    @classmethod
    def _nccl_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name, value in v.items():
            bare = name[5:] if name.upper().startswith("NCCL_") else name
            if bare.upper() not in KNOWN_NCCL_VARS:
                hint = difflib.get_close_matches(bare.upper(), sorted(KNOWN_NCCL_VARS), n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ValueError(f"__{name}__: unknown NCCL variable{more}")
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"__{name}__: empty value")
        return v

    @model_validator(mode="after")
    def _hf_args_known(self) -> "VlmrlConfig":
        extra = self.inference.args.model_extra or {}
        if self.inference.engine == "hf" and extra:
            key = sorted(extra)[0]
            known = sorted(InferenceArgs.model_fields)
            hint = difflib.get_close_matches(key, known, n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"__inference.args.{key}__: not an option of engine 'hf'{more}")
        return self

    def nccl_env(self) -> dict[str, str]:
        """The ``[nccl]`` table as environment variables (``NCCL_`` prefixed, strings)."""
        out: dict[str, str] = {}
        for name, value in self.nccl.items():
            bare = name[5:] if name.upper().startswith("NCCL_") else name
            if isinstance(value, bool):
                value = int(value)
            out["NCCL_" + bare.upper()] = str(value)
        return out

    @property
    def run_name(self) -> str:
        return self.trainer.args.run_name or "run"

    def run_dir(self) -> Path:
        return Path(self.trainer.args.output_dir) / self.run_name


# Keys of the old vf-rl [trainer.args] that now live elsewhere: old key -> dotted new key.
LEGACY_KEYS: dict[str, str] = {
    "vllm_server_host": "inference.host",
    "vllm_server_port": "inference.port",
}


def _map_legacy(data: dict[str, Any]) -> None:
    targs = data.get("trainer", {}).get("args", {}) if isinstance(data.get("trainer"), dict) else {}
    if not isinstance(targs, dict):
        return
    for old, new in LEGACY_KEYS.items():
        if old in targs:
            value = targs.pop(old)
            table, key = new.split(".")
            inf = data.setdefault(table, {})
            if isinstance(inf, dict):
                if key == "host" and isinstance(value, str):
                    # vf-rl users wrote 0.0.0.0 as the client's target; admin routes stay on loopback.
                    value = connect_host(value)
                inf.setdefault(key, value)


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for did-you-mean hints)."""
    model: type[BaseModel] | None = VlmrlConfig
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _union_members(ann: Any) -> tuple[Any, ...]:
    """The members of a union annotation other than None (empty for anything else)."""
    if get_origin(ann) in (Union, types.UnionType):
        return tuple(a for a in get_args(ann) if a is not type(None))
    return ()


def _child_annotation(ann: Any, part: Any) -> Any:
    """The annotation of ``part`` inside a value annotated ``ann`` (Any where unknown)."""
    if get_origin(ann) is None and isinstance(ann, type) and issubclass(ann, BaseModel):
        field = ann.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else Any
    args = get_args(ann)
    if get_origin(ann) is dict and len(args) == 2:
        return args[1]
    if get_origin(ann) is list and args:
        return args[0]
    return Any


def _user_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``loc`` as the keys the user wrote: without the member name pydantic inserts under a
    union (``nccl.X.str`` -> ``nccl.X``), found from the schema, so that a key merely spelled
    like one (``[run] str = 1``, ``"a[b]" = 1``) is kept."""
    out = []
    ann: Any = VlmrlConfig
    for part in loc:
        members = _union_members(ann)
        if len(members) == 1:  # X | None: pydantic names no member
            ann, members = members[0], ()
        if members:  # `part` is the member that rejected the value
            ann = Any
            continue
        out.append(part)
        ann = _child_annotation(ann, part)
    return tuple(out)


def _format_error(err: dict[str, Any]) -> tuple[str, str]:
    loc = _user_loc(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid"))
    etype = err.get("type", "")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # A model-level validator that names a key marks it as __key__.
    if msg.startswith("__") and "__:" in msg:
        inner, msg = msg[2:].rsplit("__:", 1)  # the key may contain "__:" ([nccl] "a__:b"), messages do not
        prefix = ".".join(str(p) for p in loc if not isinstance(p, int))
        return (f"{prefix}.{inner}" if prefix else inner), msg.strip()
    key = ".".join(str(p) for p in loc if not isinstance(p, int)) or "(top level)"
    if etype == "extra_forbidden":
        owner = _model_for(loc)
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), sorted(owner.model_fields), n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        if loc and loc[-1] in LEGACY_KEYS:
            hint = f"; it belongs in {LEGACY_KEYS[str(loc[-1])]}"
        return key, f"unknown key{hint}"
    if etype == "missing":
        return key, "required key is missing"
    if "input" in err and etype not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {err['input']!r})"
    return key, msg


def validate_config(data: dict[str, Any], path: str | Path | None = None) -> VlmrlConfig:
    """Validate a parsed TOML mapping; raise :class:`ConfigError` naming file and key."""
    data = _deepcopy(data)
    _map_legacy(data)
    try:
        cfg = VlmrlConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        key, msg = _format_error(errors[0])
        same = [err for err in errors if _format_error(err)[0] == key]
        if len(same) > 1 and all(err.get("type", "").endswith("_type") for err in same):
            # A union rejected every member: name the accepted types once.
            kinds = [str(err["type"]).removesuffix("_type").replace("_parsing", "") for err in same]
            msg = f"must be one of: {', '.join(kinds)} (got {same[0].get('input')!r})"
        extra = len({_format_error(err)[0] for err in errors}) - 1
        if extra:
            msg += f" (and {extra} more problem{'s' if extra > 1 else ''})"
        raise ConfigError(path, key, msg) from None
    if cfg.trainer.args.run_name is None and path is not None:
        cfg.trainer.args.run_name = Path(path).stem
    return cfg


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value as a TOML value, else a bare string)."""
    if "=" not in text:
        raise ConfigError(None, text, "override must look like key=value, e.g. trainer.args.max_steps=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(None, text, "override key is empty")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError, an integer past Python's digit limit, deep nesting
        value = raw
    return key.split("."), value


def location_overrides(name: str | None, output_dir: str | Path | None) -> list[str]:
    """The overrides that put a run in ``output_dir/name`` (what ``vlmrl run --name
    --output-dir`` adds), as TOML strings."""

    def toml_str(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = []
    if name:
        out.append(f"trainer.args.run_name={toml_str(name)}")
    if output_dir is not None:
        out.append(f"trainer.args.output_dir={toml_str(str(output_dir))}")
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key=value`` overrides applied."""
    data = _deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(None, ".".join(parts), f"{p!r} is not a table")
            node = nxt
        node[parts[-1]] = value
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; syntax and I/O problems become a :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(p, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(p, None, f"cannot read: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, None, f"TOML syntax error: {e}") from None
    except RecursionError:  # arrays or inline tables nested ~1000 deep
        raise ConfigError(p, None, "TOML syntax error: arrays or tables nested too deeply") from None
    except ValueError as e:  # an integer longer than Python's int-string limit (4300 digits)
        raise ConfigError(p, None, f"cannot read a value: {e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> VlmrlConfig:
    """Read, override and validate a config file."""
    data = read_toml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_config(data, path)


def config_to_dict(cfg: VlmrlConfig) -> dict[str, Any]:
    """The resolved config as plain data (None values dropped: TOML has no null). Values stay
    Python objects: dates and times in ``[env.args]`` are written back as TOML dates, not strings."""
    return _drop_none(cfg.model_dump())


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


def config_to_toml(cfg: VlmrlConfig) -> str:
    """The resolved config as TOML with every default filled."""
    import tomli_w

    return tomli_w.dumps(config_to_dict(cfg))
