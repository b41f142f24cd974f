"""``vlmrl doctor``'s GPU checks: devices, driver vs torch's CUDA, sharing, P2P, trainer memory.

Everything about the machine comes from NVML (:mod:`vlmrl_tui.gpu`); where NVML is missing
but CUDA works (a container without the ``utility`` driver capability) the device count comes
from torch in a subprocess. Nothing here initialises CUDA in this process: torch's CUDA build
is read from its installed ``torch/version.py``, NCCL's version from the installed
``nvidia-nccl-cu*`` distribution (or, in the full doctor, from torch in a subprocess).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from typing import Any, Callable, Mapping

from backend.config import VlmrlConfig
from backend.records import PROC_SERVER, PROC_TRAINER
from vlmrl_tui import gpu
from vlmrl_tui.checks import FAIL, OK, SKIP, WARN, CheckResult, torch_requirements
from vlmrl_tui.plan import MULTI_RANK_GPU_VAR, RunPlan, gpus_needed, visible_gpus

GiB = 1024**3
#: the first NCCL that lets two ranks of one communicator use one GPU (with MULTI_RANK_GPU_ENABLE=1)
NCCL_MULTI_RANK = (2, 30)
#: above this share of a GPU the estimate warns: allocator fragmentation may not leave room
MEMORY_WARN_FRACTION = 0.95
VLLM_DEFAULT_MEMORY_UTILIZATION = 0.9  # vLLM's own default for gpu_memory_utilization
CPU_ONLY_FIX = "run on a GPU machine, or set inference.gpus = 0 and trainer.gpus = 0 (engine 'hf' on CPU)"

_NCCL_CODE = """import importlib.metadata as m, sys
for d in m.distributions():
    if (d.metadata['Name'] or '').lower().startswith('nvidia-nccl-cu'):
        print(d.version); sys.exit()
if sys.argv[1] == 'torch':
    import torch
    v = torch.cuda.nccl.version()
    print('.'.join(map(str, v)) if isinstance(v, tuple) else f'{v // 10000}.{v // 100 % 100}.{v % 100}')
"""


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def torch_cuda_build(path: list[str] | None = None) -> str | None:
    """The CUDA version the torch installed on ``path`` (default: this python's) was built for
    ("13.0"); None for a CPU build or no torch.

    Read from ``torch/version.py`` on disk: importing torch here would cost seconds.
    """
    dist = next(iter(md.distributions(name="torch", **({"path": path} if path is not None else {}))), None)
    try:
        text = dist.locate_file("torch/version.py").read_text()  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return None
    m = re.search(r"^cuda\b[^=]*=\s*['\"]([\d.]+)['\"]", text, re.M)
    return m.group(1) if m else None


def nccl_version(python: str, env: Mapping[str, str], use_torch: bool = False) -> tuple[int, ...] | None:
    """The NCCL of ``python`` under ``env`` (its ``nvidia-nccl-cu*`` distribution; with ``use_torch``,
    else ``torch.cuda.nccl.version()``), asked in a subprocess; None when it cannot tell."""
    try:
        r = subprocess.run([python, "-c", _NCCL_CODE, "torch" if use_torch else "meta"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, **env})
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = r.stdout.strip().splitlines()
    return _vtuple(lines[-1]) if r.returncode == 0 and lines and _vtuple(lines[-1]) else None


def _pythons(cfg: VlmrlConfig) -> dict[str, str]:
    """The python of each process that joins the weight-sync communicator."""
    from backend.vllm_ext.command import vllm_python

    server = vllm_python(cfg) if cfg.inference.engine == "vllm" else sys.executable
    return {"trainer": sys.executable, "server": server}


def sharing_refusal(cfg: VlmrlConfig, env: Mapping[str, str], use_torch: bool = False) -> str | None:
    """Why NCCL would refuse server and trainer on one GPU (None: it would not, or cannot tell)."""
    if cfg.nccl_env().get(MULTI_RANK_GPU_VAR) == "0":
        return f"[nccl] sets {MULTI_RANK_GPU_VAR[5:]} = 0"
    for who, py in _pythons(cfg).items():
        v = nccl_version(py, env, use_torch)
        if v is not None and v[:2] < NCCL_MULTI_RANK:
            return f"the {who}'s NCCL is {'.'.join(map(str, v))} ({py}); sharing a GPU needs >= 2.30"
    return None


def _asks(cfg: VlmrlConfig) -> str:
    """Who asks for GPUs: "the server (inference.gpus = 1) and the trainer (trainer.gpus = 2) ask"."""
    parts = [f"the {who} ({key} = {n})" for who, key, n in (("server", "inference.gpus", cfg.inference.gpus),
                                                             ("trainer", "trainer.gpus", cfg.trainer.gpus)) if n]
    return " and ".join(parts) + (" ask" if len(parts) > 1 else " asks")


def check_gpus(cfg: VlmrlConfig | None, env: Mapping[str, str], snapshot: gpu.GpuSystemSnapshot, fast: bool,
               count_devices: Callable[[Mapping[str, str]], int | None] = gpu.cuda_device_count) -> list[CheckResult]:
    """GPUs found (NVML, else torch in a subprocess) against what the config asks for."""
    need = gpus_needed(cfg.inference.gpus, cfg.trainer.gpus, cfg.run.share_gpus) if cfg else 0
    shown = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}" if "CUDA_VISIBLE_DEVICES" in env else \
        "CUDA_VISIBLE_DEVICES unset"
    if snapshot.available and snapshot.gpus:
        names = sorted({g.name for g in snapshot.gpus})
        out = [CheckResult("gpus", OK, f"{len(snapshot.gpus)} x {', '.join(names)}; driver "
                           f"{snapshot.driver_version}, CUDA {snapshot.cuda_version}")]
        listed = visible_gpus(env)
        if listed is None:
            visible = len(snapshot.gpus)
        else:  # MIG slices are devices of their own; indices and GPU UUIDs name whole GPUs
            visible = len(listed) if any(x.startswith("MIG-") for x in listed) else min(len(listed), len(snapshot.gpus))
    else:
        why = snapshot.error or "NVML reports no GPU"
        # NVML missing is not CUDA missing (a container without the utility capability): ask torch
        probe = bool(snapshot.error) and bool(need or not fast)
        count = count_devices(env) if probe else None
        if not count:
            torch_saw = "" if not probe else "; torch cannot tell" if count is None else "; torch sees 0 CUDA devices"
            if need and cfg is not None:
                return [CheckResult("gpus", FAIL, f"{_asks(cfg)} for GPUs, but there is no usable CUDA device "
                                    f"({why}{torch_saw}; {shown})", CPU_ONLY_FIX)]
            return [CheckResult("gpus", OK, f"no GPU ({why}{torch_saw}); this config runs on CPU")]
        out = [CheckResult("gpus", WARN, f"{why}, but torch sees {count} CUDA device(s) ({shown}): GPU stats, "
                           "memory and P2P checks are skipped",
                           "give the container NVML: docker --gpus all, or NVIDIA_DRIVER_CAPABILITIES=compute,utility")]
        visible = count
    if cfg is not None:
        want = f"inference.gpus {cfg.inference.gpus} + trainer.gpus {cfg.trainer.gpus}" + (
            " (shared)" if cfg.run.share_gpus else "")
        seen = f"{visible} visible ({shown})"
        if need > visible:
            fix = "lower inference.gpus/trainer.gpus, or widen CUDA_VISIBLE_DEVICES"
            if not cfg.run.share_gpus and max(cfg.inference.gpus, cfg.trainer.gpus) <= visible:
                refused = sharing_refusal(cfg, env)
                fix += (f" (run.share_gpus = true would not work: {refused})" if refused else
                        ", or set run.share_gpus = true (server and trainer on the same GPUs, NCCL >= 2.30)")
            out.append(CheckResult("gpu count", FAIL, f"{want} = {need}, but {seen}", fix))
        else:
            out.append(CheckResult("gpu count", OK, f"{want} = {need}; {seen}"))
    return out


def check_cuda_build(cfg: VlmrlConfig | None, snapshot: gpu.GpuSystemSnapshot,
                     torch_path: list[str] | None = None) -> list[CheckResult]:
    """torch's CUDA build (installed on ``torch_path``, default this python's) against the
    driver's CUDA version (NVML) and against the GPUs asked for."""
    build = torch_cuda_build(torch_path)
    need = bool(cfg and (cfg.trainer.gpus or (cfg.inference.gpus and cfg.inference.engine == "hf")))
    if build is None:
        if need and snapshot.gpus:
            return [CheckResult("cuda build", FAIL, f"torch in {sys.executable} is a CPU build, but "
                                f"{_asks(cfg)} for GPUs: they would run on the CPU",  # type: ignore[arg-type]
                                f"pip install {torch_requirements()} --index-url "
                                "https://download.pytorch.org/whl/cu130 (or the cuXYZ your driver supports)")]
        return []
    driver = snapshot.cuda_version
    if not isinstance(driver, str):
        return []
    d, b = _vtuple(driver), _vtuple(build)
    text = f"driver supports CUDA {driver}, torch is built for CUDA {build}"
    fix = (f"upgrade the NVIDIA driver to one for CUDA >= {build}, or install a torch built for the driver's "
           f"CUDA (pip install {torch_requirements()} --index-url https://download.pytorch.org/whl/cu{d[0]}{d[1]}, "
           "if that build exists)")
    if d[:1] < b[:1]:
        return [CheckResult("cuda driver", FAIL, f"{text}: CUDA will not initialise", fix)]
    if d[:2] < b[:2]:
        return [CheckResult("cuda driver", WARN, f"{text}: runs on minor-version compatibility; kernels that need "
                            "PTX JIT or newer driver features fail", fix)]
    return [CheckResult("cuda driver", OK, text)]


def check_overlap(cfg: VlmrlConfig, plan: RunPlan) -> CheckResult:
    s, t = plan.process(PROC_SERVER).gpus, plan.process(PROC_TRAINER).gpus
    both = sorted(set(s) & set(t))
    text = f"server GPUs [{','.join(s) or 'none'}], trainer GPUs [{','.join(t) or 'none'}]"
    if both:
        return CheckResult("gpu overlap", WARN, f"{text}: GPU {','.join(both)} shared (run.share_gpus = true)",
                           "keep inference.args.gpu_memory_utilization low enough for the trainer to fit")
    return CheckResult("gpu overlap", OK, text + ": no GPU shared")


def _devices(ids: tuple[str, ...], nvml: gpu.Nvml | None) -> list[gpu.DeviceRef]:
    return [d for d in (gpu.resolve_device(i, nvml) for i in ids) if d is not None]


def check_colocation(cfg: VlmrlConfig, plan: RunPlan, env: Mapping[str, str], nvml: gpu.Nvml | None,
                     fast: bool) -> list[CheckResult]:
    """Server and trainer on one physical GPU (shared ids, or MIG slices of one GPU): will NCCL allow it?"""
    s_ids, t_ids = plan.process(PROC_SERVER).gpus, plan.process(PROC_TRAINER).gpus
    same = sorted(set(s_ids) & set(t_ids))
    slices = sorted({d.gpu for d in _devices(s_ids, nvml)} & {d.gpu for d in _devices(t_ids, nvml)})
    if not same and not slices:
        return []
    where = f"GPU {','.join(same)}" if same else f"MIG slices of GPU {','.join(map(str, slices))}"
    refused = "NCCL refuses two ranks of one communicator on one GPU (\"Duplicate GPU detected\")"
    other_gpus = "or give server and trainer their own GPUs (run.share_gpus = false)"
    value = plan.shared_env.get(MULTI_RANK_GPU_VAR)
    if value != "1":
        got = f"{MULTI_RANK_GPU_VAR[5:]} = {value}" if value is not None else f"{MULTI_RANK_GPU_VAR[5:]} unset"
        fix = (f"remove {MULTI_RANK_GPU_VAR[5:]} from [nccl] (vlmrl sets it to 1 on a shared GPU)"
               if value is not None else f"add {MULTI_RANK_GPU_VAR[5:]} = 1 to [nccl] (NCCL >= 2.30)")
        return [CheckResult("nccl sharing", FAIL, f"server and trainer share {where} with {got}: {refused}",
                            f"{fix}, {other_gpus}")]
    found = []
    for who, py in _pythons(cfg).items():
        v = nccl_version(py, env, use_torch=not fast)
        if v is None:
            return [CheckResult("nccl sharing", WARN, f"server and trainer share {where}; cannot tell the "
                                f"{who}'s NCCL version ({py}): before 2.30 {refused}",
                                "check `python -c 'import torch; print(torch.cuda.nccl.version())'` there, "
                                + other_gpus)]
        text = ".".join(map(str, v))
        if v[:2] < NCCL_MULTI_RANK:
            return [CheckResult("nccl sharing", FAIL, f"server and trainer share {where}, but the {who}'s NCCL is "
                                f"{text} ({py}): before 2.30 {refused}",
                                f"pip install -U 'nvidia-nccl-cu{(torch_cuda_build() or '13').split('.')[0]}>=2.30' "
                                f"in that environment, {other_gpus}")]
        found.append(f"{who} {text}")
    return [CheckResult("nccl sharing", OK, f"server and trainer share {where}: NCCL {', '.join(found)} with "
                        f"{MULTI_RANK_GPU_VAR}=1 allows it")]


def check_p2p(cfg: VlmrlConfig, plan: RunPlan, snapshot: gpu.GpuSystemSnapshot, nvml: gpu.Nvml | None,
              p2p: Callable[[int, int], Any] | None = None) -> CheckResult:
    """P2P between every pair of physical GPUs the run's NCCL connects (weight sync, vLLM's TP)."""
    p2p = p2p or (lambda i, j: gpu.p2p_status(i, j, nvml))
    if cfg.inference.gpus == 0 and cfg.trainer.gpus == 0:
        return CheckResult("nccl p2p", OK, "no GPU in use: weight sync goes over gloo, NCCL is not used")
    if not snapshot.gpus:
        return CheckResult("nccl p2p", OK, "no GPU visible to NVML: P2P support cannot be checked here")
    devices = _devices(plan.process(PROC_SERVER).gpus + plan.process(PROC_TRAINER).gpus, nvml)
    used = sorted({d.gpu for d in devices if not d.mig})  # MIG slices have no P2P; NCCL uses shared memory
    if len(used) < 2:
        return CheckResult("nccl p2p", OK, "the run's NCCL does not cross two GPUs")
    status = {(i, j): p2p(i, j) for n, i in enumerate(used) for j in used[n + 1:]}
    missing = [f"{i}<->{j}" for (i, j), ok in status.items() if ok is False]
    unknown = [f"{i}<->{j}" for (i, j), ok in status.items() if ok is not True and ok is not False]
    disabled = cfg.nccl_env().get("NCCL_P2P_DISABLE") == "1"
    pairs = f"GPU {', '.join(f'{i}<->{j}' for i, j in status)}"
    if missing:
        if disabled:
            return CheckResult("nccl p2p", OK, f"no P2P between GPU {', '.join(missing)}; P2P_DISABLE = 1 is set")
        return CheckResult("nccl p2p", WARN, f"no P2P between GPU {', '.join(missing)} (NVML): NCCL may hang or fail",
                           "add P2P_DISABLE = 1 to the [nccl] table")
    if unknown:
        return CheckResult("nccl p2p", OK, f"{pairs}: P2P support unknown for {', '.join(unknown)} (NVML cannot tell)")
    if disabled:
        return CheckResult("nccl p2p", WARN, f"{pairs} support P2P, but P2P_DISABLE = 1 sends every weight sync "
                           "through host shared memory (slower)",
                           "remove P2P_DISABLE from [nccl] (keep it only if NCCL hangs over P2P on this machine)")
    return CheckResult("nccl p2p", OK, f"{pairs} support P2P")


def _server_share(cfg: VlmrlConfig, total: float, shape: Any) -> float:
    """Bytes the inference server takes on a GPU it shares with the trainer."""
    if cfg.inference.engine == "vllm":
        frac = cfg.inference.args.gpu_memory_utilization or VLLM_DEFAULT_MEMORY_UTILIZATION
        return frac * total
    return _server_weights(cfg, shape) + 2 * GiB  # then the generation's KV cache and context


def _server_weights(cfg: VlmrlConfig, shape: Any) -> float:
    dtype = cfg.inference.args.dtype
    per_param = 4 if dtype == "float32" or (dtype == "auto" and cfg.trainer.args.dtype == "float32") else 2
    return per_param * shape.params


def _memory_fixes(shape: Any, cfg: VlmrlConfig, room: float) -> list[str]:
    """Settings that would make the trainer fit in ``room`` bytes, each with its estimate: single
    changes first (the largest micro-batch / length that fits), all of them together if none does."""
    from backend.config import apply_overrides, config_to_dict, validate_config
    from backend.memory import estimate_for_config

    a = cfg.trainer.args
    tries: list[tuple[str, list[str]]] = []
    if not a.gradient_checkpointing:
        tries.append(("trainer.args.gradient_checkpointing = true", ["trainer.args.gradient_checkpointing=true"]))
    if a.low_precision_update != "stochastic-rounding" or a.dtype != "bfloat16":
        tries.append(('trainer.args.low_precision_update = "stochastic-rounding" with dtype = "bfloat16"',
                      ['trainer.args.low_precision_update="stochastic-rounding"', 'trainer.args.dtype="bfloat16"']))
    for mb in range(a.micro_batch_size - 1, 0, -1):
        tries.append((f"trainer.args.micro_batch_size = {mb}", [f"trainer.args.micro_batch_size={mb}"]))
    length = cfg.inference.args.max_model_len // 2
    while length >= 512:
        tries.append((f"inference.args.max_model_len = {length}", [f"inference.args.max_model_len={length}"]))
        length //= 2

    def total(overrides: list[str]) -> float:
        return estimate_for_config(shape, validate_config(apply_overrides(config_to_dict(cfg), overrides))).total

    fits, done = [], set()
    for label, overrides in tries:
        knob = label.split(" = ")[0]
        if knob not in done and (got := total(overrides)) <= room * MEMORY_WARN_FRACTION:
            fits.append(f"{label} (~{got / GiB:.0f} GiB)")
            done.add(knob)
    if not fits and tries:  # all together: every precision/checkpointing change and micro-batches of 1
        together = [(label, ov) for label, ov in tries if "gradient_checkpointing" in label or "precision" in label]
        together.append(("trainer.args.micro_batch_size = 1", ["trainer.args.micro_batch_size=1"]))
        got = total([o for _, ov in together for o in ov])
        if got <= room * MEMORY_WARN_FRACTION:
            fits.append(f"all of {', '.join(label for label, _ in together)} (~{got / GiB:.0f} GiB)")
    return fits + ["coming: LoRA, and trainer.gpus > 1 with FSDP"]


def _share_fix(cfg: VlmrlConfig, shape: Any, total: int, needed: float) -> str:
    """How a GPU shared with the server could hold the trainer too, if it can."""
    left = total - needed / MEMORY_WARN_FRACTION
    if cfg.inference.engine == "vllm" and left > _server_weights(cfg, shape) + GiB:
        return (f"inference.args.gpu_memory_utilization = {int(100 * left / total) / 100:.2f} "
                f"(vLLM keeps {left / GiB:.1f} GiB for weights and KV cache)")
    return (f"run.share_gpus = false: the trainer needs ~{needed / GiB:.0f} GiB and the server "
            f"~{_server_weights(cfg, shape) / GiB:.0f} GiB of weights alone")


def check_memory(cfg: VlmrlConfig, plan: RunPlan, snapshot: gpu.GpuSystemSnapshot,
                 nvml: gpu.Nvml | None) -> list[CheckResult]:
    """The trainer's estimated peak (backend/memory.py) against each trainer GPU's memory."""
    from backend.errors import ModelError
    from backend.memory import estimate_for_config, hf_config, model_shape

    try:
        shape = model_shape(hf_config(cfg.model))
    except ModelError as e:
        return [CheckResult("memory", SKIP, f"no estimate: {e}")]
    if cfg.trainer.gpus == 0:
        host = estimate_for_config(shape, cfg, overhead=0)
        return [CheckResult("memory", SKIP, f"trainer on CPU (trainer.gpus = 0), in host memory: {host.describe()}")]
    est = estimate_for_config(shape, cfg)
    if not snapshot.gpus:
        why = snapshot.error or "NVML reports no GPU"
        return [CheckResult("memory", SKIP, f"{est.describe()}; no GPU memory to compare with ({why})")]
    server = set(plan.process(PROC_SERVER).gpus)
    out = []
    for ident in plan.process(PROC_TRAINER).gpus:
        dev = gpu.resolve_device(ident, nvml)
        total = dev.memory_total if dev is not None else gpu.NA
        if not isinstance(total, int):
            out.append(CheckResult("memory", SKIP, f"GPU {ident}: NVML cannot tell its memory; {est.describe()}"))
            continue
        room, shared = float(total), ""
        if ident in server:
            taken = _server_share(cfg, total, shape)
            room -= taken
            shared = f", {taken / GiB:.1f} GiB of it the server's"
        text = f"GPU {ident} ({total / GiB:.1f} GiB{shared}): {est.describe()}"
        if est.total <= MEMORY_WARN_FRACTION * room:
            out.append(CheckResult("memory", OK, text))
            continue
        fixes = ([_share_fix(cfg, shape, total, est.total)] if shared else []) + _memory_fixes(shape, cfg, room)
        if est.total > room:
            out.append(CheckResult("memory", FAIL, f"{text}: does not fit", "; ".join(fixes)))
        else:
            out.append(CheckResult("memory", WARN, f"{text}: within {100 * (1 - MEMORY_WARN_FRACTION):.0f}% of "
                                   "the card, allocator fragmentation may not leave room",
                                   "; ".join(["PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", *fixes])))
    return out
