"""``vlmrl doctor``: preflight checks, one verdict per line (ok / warn / fail) and a fix.

:func:`run_checks` is pure reporting (it starts nothing that outlives it); ``vlmrl run``
calls it with ``fast_only=True`` (no heavy imports, well under a second) and refuses to
start when a check fails. The full doctor also imports torch, torchvision and
transformers for real, because a broken pairing (e.g. torch 2.13 with any torchvision)
only shows on import; vLLM is imported by the python that will run it (usually its own
venv), in a subprocess (:mod:`backend.vllm_ext.probe`), never in this process. The GPU
checks (devices, driver vs CUDA build, GPU sharing, P2P, the trainer's memory estimate,
which only the full doctor makes) live in :mod:`vlmrl_tui.doctor_gpu`; the full doctor's
image-token check (a running server's prompt-token count against the trainer's processor's)
in :mod:`vlmrl_tui.doctor_tokens`.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

from backend import net
from backend.config import KNOWN_NCCL_VARS, VlmrlConfig
from backend.errors import ConfigError, VlmrlError
from vlmrl_tui.checks import (FAIL, OK, SKIP, WARN, CheckResult, check_bind_host, check_remote_media, format_check,
                              torch_requirements)
from vlmrl_tui.doctor_gpu import (
    check_colocation,
    check_cuda_build,
    check_gpus,
    check_memory,
    check_overlap,
    check_p2p,
)
from vlmrl_tui.doctor_tokens import check_image_tokens
from vlmrl_tui.doctor_vllm import check_vllm
from vlmrl_tui.plan import build_plan, run_dir_problem

__all__ = ["FAIL", "OK", "SKIP", "WARN", "CheckResult", "check_model", "check_vllm", "doctor_main", "format_check",
           "run_checks"]

GiB = 1024**3
SHM_MIN = 1 * GiB
DISK_FAIL = GiB // 2
DISK_WARN = 5 * GiB
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
MIN_TRANSFORMERS = (5, 19)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        num = "".join(ch for ch in part if ch.isdigit())
        if not num:
            break
        out.append(int(num))
    return tuple(out)


# ----- individual checks -----


def check_python() -> CheckResult:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if v < (3, 10):
        return CheckResult("python", FAIL, text, "vlmrl needs Python >= 3.10")
    return CheckResult("python", OK, text)


def check_torch(fast: bool) -> list[CheckResult]:
    torch_v, tv_v = _version("torch"), _version("torchvision")
    pin = f"pip install {torch_requirements()}"
    if torch_v is None:
        return [CheckResult("torch", FAIL, "not installed", pin)]
    out: list[CheckResult] = []
    if fast:
        out.append(CheckResult("torch", OK, torch_v))
    else:
        try:
            import torch

            cuda = torch.version.cuda
            build = f"CUDA {cuda} build" if cuda else "CPU build"
            avail = torch.cuda.is_available()
            out.append(CheckResult("torch", OK, f"{torch.__version__} ({build}, cuda available: {avail})"))
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            return [CheckResult("torch", FAIL, f"{torch_v} installed but import fails: {e}", pin)]
    if tv_v is None:
        out.append(CheckResult("torchvision", WARN, "not installed: the Qwen-VL processors need it", pin))
    elif torch_v.startswith("2.13") :
        out.append(CheckResult("torchvision", FAIL, f"{tv_v} with torch {torch_v}: this pairing breaks "
                               "transformers' imports", pin))
    elif not fast:
        try:
            import torchvision  # noqa: F401

            out.append(CheckResult("torchvision", OK, tv_v))
        except Exception as e:  # noqa: BLE001
            out.append(CheckResult("torchvision", FAIL, f"{tv_v} import fails: {e}", pin))
    else:
        out.append(CheckResult("torchvision", OK, tv_v))
    return out


def check_transformers(fast: bool) -> CheckResult:
    v = _version("transformers")
    fix = "pip install 'transformers>=5.19,<6'"
    if v is None:
        return CheckResult("transformers", FAIL, "not installed", fix)
    if _vtuple(v) < MIN_TRANSFORMERS:
        return CheckResult("transformers", FAIL, f"{v} is older than 5.19", fix)
    if not fast:
        try:
            from transformers import AutoProcessor  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return CheckResult("transformers", FAIL, f"{v} installed but `from transformers import AutoProcessor` "
                               f"fails: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                               f"fix the torch/torchvision pair: pip install {torch_requirements()}")
    return CheckResult("transformers", OK, v)


def check_port(name: str, host: str, port: int, key: str) -> CheckResult:
    if net.port_free(host, port):
        return CheckResult(name, OK, f"{host}:{port} is free")
    owner = net.port_owner(port)
    who = f" by {owner}" if owner else ""
    pid = owner.split("pid ")[1].split(")")[0] if owner and "pid " in owner else None
    stop = f"stop it (kill {pid})" if pid else "stop the process that holds it"
    return CheckResult(name, FAIL, f"port {port} on {host} is in use{who}",
                       f"{stop}, or choose another port: {key}=<free port>")


def check_nccl(cfg: VlmrlConfig | None, env: Mapping[str, str], plan: Any) -> list[CheckResult]:
    out: list[CheckResult] = []
    if cfg is not None:
        conf = cfg.nccl_env()
        text = ", ".join(f"{k}={v}" for k, v in sorted(conf.items())) or "none"
        out.append(CheckResult("nccl config", OK, f"[nccl]: {text} (names known to NCCL)"))
    shell = {k: v for k, v in env.items() if k.startswith("NCCL_")}
    problems: list[CheckResult] = []
    for name in sorted(shell):
        bare = name[5:]
        if bare not in KNOWN_NCCL_VARS:
            hint = difflib.get_close_matches(bare, sorted(KNOWN_NCCL_VARS), n=1)
            mean = f"; did you mean NCCL_{hint[0]}?" if hint else ""
            problems.append(CheckResult("nccl shell", WARN, f"{name} in your shell is not a variable NCCL knows{mean}",
                                        f"unset {name}" + (f" and set NCCL_{hint[0]} (or [nccl] {hint[0]})" if hint else "")))
    if plan is not None:
        for note in plan.notes:
            if note.name.startswith("NCCL_") and note.plan_value is not None:
                problems.append(CheckResult("nccl shell", WARN, note.message,
                                            f"unset {note.name} (the config's [nccl] table is what both processes get)"))
            elif note.name == "CUDA_DEVICE_ORDER":
                problems.append(CheckResult("env shell", WARN, note.message, f"unset {note.name}"))
    if problems:
        out.extend(problems)
    elif shell:
        out.append(CheckResult("nccl shell", OK, "NCCL variables in your shell agree with the config: "
                               + ", ".join(sorted(shell))))
    else:
        out.append(CheckResult("nccl shell", OK, "no NCCL variables in your shell"))
    return out


def check_proxy(env: Mapping[str, str]) -> CheckResult:
    set_vars = [v for v in PROXY_VARS if env.get(v)]
    if not set_vars:
        return CheckResult("proxy", OK, "no proxy variables")
    no_proxy = ",".join(x for x in (env.get("no_proxy", ""), env.get("NO_PROXY", "")) if x)
    items = {h.strip() for h in no_proxy.split(",") if h.strip()}
    missing = [h for h in ("127.0.0.1", "localhost") if h not in items and "*" not in items]
    if not missing:
        return CheckResult("proxy", OK, f"{', '.join(set_vars)} set; no_proxy covers the loopback")
    return CheckResult(
        "proxy", WARN,
        f"{', '.join(set_vars)} set and no_proxy lacks {', '.join(missing)}: localhost requests would go to the "
        "proxy (vlmrl adds the loopback to no_proxy for its own processes)",
        "export no_proxy=127.0.0.1,localhost,::1 (and NO_PROXY) for other tools",
    )


def check_shm(path: str = "/dev/shm") -> CheckResult:
    try:
        total = shutil.disk_usage(path).total
    except OSError:
        return CheckResult("/dev/shm", WARN, f"{path} is missing", "mount a tmpfs on /dev/shm (docker: --ipc=host)")
    text = f"{total / GiB:.1f} GiB"
    if total < SHM_MIN:
        return CheckResult("/dev/shm", WARN, f"{text}: too small for NCCL and multi-process data loading",
                           "docker run --shm-size=16g (or --ipc=host)")
    return CheckResult("/dev/shm", OK, text)


def _existing_parent(p: Path) -> Path:
    p = p.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(cfg: VlmrlConfig) -> CheckResult:
    out = Path(cfg.trainer.args.output_dir)
    where = _existing_parent(out)
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        return CheckResult("disk", WARN, f"cannot measure free space at {where}: {e}")
    text = f"{free / GiB:.1f} GiB free at {where} (output dir {out})"
    if not os.access(where, os.W_OK):  # also false for root on a read-only mount
        return CheckResult("disk", FAIL, f"{where} is not writable (output dir {out})",
                           "set trainer.args.output_dir (or --output-dir) to a writable directory")
    fix = "free some space or set trainer.args.output_dir to a larger disk"
    if free < DISK_FAIL:
        return CheckResult("disk", FAIL, text, fix)
    if free < DISK_WARN and not cfg.model.startswith("builtin:"):
        return CheckResult("disk", WARN, text + ": checkpoints of a real model need more", fix)
    return CheckResult("disk", OK, text)


def check_model(cfg: VlmrlConfig, env: Mapping[str, str]) -> CheckResult:
    from backend import models

    m = cfg.model.strip()
    if m.startswith(models.BUILTIN_PREFIX):
        name = m[len(models.BUILTIN_PREFIX):]
        if name not in models.BUILTINS:
            hint = difflib.get_close_matches(name, sorted(models.BUILTINS), n=1)
            return CheckResult("model", FAIL, f"unknown builtin model {m!r}",
                               f"use builtin:{hint[0]}" if hint else "one of " + ", ".join(
                                   "builtin:" + n for n in models.BUILTINS))
        try:
            target = models.builtin_dir(name)
        except Exception as e:  # noqa: BLE001
            return CheckResult("model", WARN, f"{m}: cannot locate the cache: {e}")
        from backend.tiny import read_provenance

        if read_provenance(target) is not None:
            return CheckResult("model", OK, f"{m} is built ({target})")
        return CheckResult("model", OK, f"{m} will be built offline on first start into {target} (~10-60 s)")
    path = Path(m).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return CheckResult("model", OK, f"local directory {path}")
        return CheckResult("model", FAIL, f"{path} has no config.json (not a Hugging Face model directory)",
                           "point model at the directory that holds config.json")
    if m.startswith(("/", "./", "../", "~")):
        return CheckResult("model", FAIL, f"{m}: no such directory", "fix the path in `model`")
    cached = models._in_hf_cache(m)
    if cached:
        return CheckResult("model", OK, f"hub id {m} is in the Hugging Face cache (loads offline)")
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        return CheckResult("model", FAIL, f"hub id {m} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                           f"download it first (huggingface-cli download {m}) or use builtin:tiny-qwen3-vl")
    return CheckResult("model", WARN, f"hub id {m} is not in the Hugging Face cache: the first start downloads it",
                       f"huggingface-cli download {m} (ahead of time, so the start does not wait)")


def _importable(module: str) -> bool:
    """Whether ``module`` can be found without importing it (the fast preflight must stay fast)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_env_id(cfg: VlmrlConfig, fast: bool) -> CheckResult:
    import environments
    from environments.modules import module_name

    ids = environments.available()
    if cfg.env.id not in ids and not _importable(module_name(cfg.env.id)):
        hint = difflib.get_close_matches(cfg.env.id, ids, n=1)
        return CheckResult("environment", FAIL, f"unknown environment {cfg.env.id!r}: not built in, and no module "
                           f"{module_name(cfg.env.id)!r} with load_environment() is installed",
                           f"did you mean {hint[0]!r}?" if hint else
                           f"one of: {', '.join(ids)}, or pip install the environment's package")
    if not fast:
        from backend.envs import build_env

        try:  # what the trainer does with [env]: the same refusals, in the same words
            build_env(cfg.env.id, cfg.env.args)
        except ConfigError as e:
            multi_turn = "multi-turn" in e.message
            return CheckResult("environment", FAIL, f"{cfg.env.id!r} with args {cfg.env.args}: {e.message}",
                               "use a single-turn environment (e.g. colors) until multi-turn training lands"
                               if multi_turn else "fix the [env.args] table")
        except Exception as e:  # noqa: BLE001 - an environment's own code may raise anything
            return CheckResult("environment", FAIL, f"{cfg.env.id!r} with args {cfg.env.args}: {e}",
                               "fix the [env.args] table")
    return CheckResult("environment", OK, f"{cfg.env.id}" + ("" if fast else f" (args {cfg.env.args or '{}'})"))


def check_trackers(cfg: VlmrlConfig) -> CheckResult:
    """``report_to``: each tracker's package must be installed, or the trainer drops it (with a
    warning in its log) and the run goes on without it."""
    wanted = list(cfg.trainer.args.report_to)
    if not wanted:
        return CheckResult("trackers", OK, "none (report_to is empty: metrics go to the run directory only)")
    missing = [name for name in wanted if not _importable(name)]
    if missing:
        return CheckResult("trackers", WARN, f"report_to names {', '.join(missing)}, not installed: the run goes on "
                           "without " + ("it" if len(missing) == 1 else "them"),
                           "pip install -e '.[" + ",".join(missing) + "]'")
    return CheckResult("trackers", OK, ", ".join(wanted))


def check_run_dir(cfg: VlmrlConfig, plan: Any) -> CheckResult:
    problem = run_dir_problem(plan.run_dir, resume=False)
    if problem:
        return CheckResult("run dir", WARN, problem)
    state = "exists (a run that never trained; reused)" if plan.run_dir.exists() else "new"
    return CheckResult("run dir", OK, f"{plan.run_dir} {state}")


def config_checks(cfg: VlmrlConfig) -> list[tuple[str, CheckResult]]:
    """The checks of what the config names, with the key each is about: the model (a builtin,
    a local directory, a hub id) and the environment. ``vlmrl config check`` runs these; every
    other check is about the machine (``vlmrl doctor``)."""
    return [("model", check_model(cfg, os.environ)), ("env.id", check_env_id(cfg, fast=True))]


# ----- all together -----


def run_checks(
    cfg: VlmrlConfig | None,
    fast_only: bool = False,
    *,
    plan: Any = None,
    env: Mapping[str, str] | None = None,
    nvml: Any = None,
) -> list[CheckResult]:
    """Every check for ``cfg`` (or the machine alone when ``cfg`` is None)."""
    from vlmrl_tui import gpu

    env = dict(os.environ if env is None else env)
    results: list[CheckResult] = [check_python()]
    results += check_torch(fast_only)
    results.append(check_transformers(fast_only))
    if cfg is not None and cfg.inference.engine == "vllm":
        results += check_vllm(cfg, fast_only)
    snapshot = gpu.take_snapshot(nvml)
    results += check_gpus(cfg, env, snapshot, fast_only)
    results += check_cuda_build(cfg, snapshot)
    if cfg is not None and plan is None:
        try:
            plan = build_plan(cfg, None, base_env=env, sync_port=cfg.trainer.args.sync_port or 1, token="doctor")
        except ConfigError as e:
            results.append(CheckResult("plan", FAIL, str(e), "fix the config or the shell's CUDA_VISIBLE_DEVICES"))
        except VlmrlError as e:
            results.append(CheckResult("plan", FAIL, str(e)))
    if cfg is not None and plan is not None:
        results.append(check_overlap(cfg, plan))
        results += check_colocation(cfg, plan, env, nvml, fast_only)
    if cfg is not None:
        inf = cfg.inference
        results.append(check_port("server port", inf.host, inf.port, "inference.port"))
        results += [check_bind_host(cfg), check_remote_media(cfg)]
        if cfg.trainer.args.sync_port:
            results.append(check_port("sync port", "127.0.0.1", cfg.trainer.args.sync_port, "trainer.args.sync_port"))
        else:
            results.append(CheckResult("sync port", OK, "a free port is picked at start"))
    results += check_nccl(cfg, env, plan)
    if cfg is not None and plan is not None:
        results.append(check_p2p(cfg, plan, snapshot, nvml))
        if not fast_only:  # builds the model on the meta device: needs torch and transformers
            results += check_memory(cfg, plan, snapshot, nvml)
    results.append(check_proxy(env))
    results.append(check_shm())
    if cfg is not None:
        results.append(check_disk(cfg))
        results.append(check_model(cfg, env))
        results.append(check_env_id(cfg, fast_only))
        results.append(check_trackers(cfg))
        if not fast_only:  # needs a running server (else a warning) and the processor (transformers)
            tokens = check_image_tokens(cfg)
            results.append(tokens)
            if not tokens.message.startswith("skipped: no server"):
                # the port is held by the very server this check talked to: worth knowing, not a fault
                results[:] = [CheckResult(r.name, WARN, f"{r.message} (the server the image-token check used); "
                                          "a new run needs the port free", r.fix)
                              if r.name == "server port" and r.status == FAIL else r for r in results]
        if plan is not None:
            results.append(check_run_dir(cfg, plan))
        if cfg.slurm is not None or cfg.run.launcher == "slurm":
            from vlmrl_tui.doctor_slurm import check_slurm

            results += check_slurm(cfg)
    return results


def doctor_main(cfg: VlmrlConfig | None, as_json: bool = False) -> int:
    """Print every check; exit 1 when one fails, else 0."""
    results = run_checks(cfg)
    failed = [r for r in results if r.status == FAIL]
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [r.to_json() for r in results]}, indent=2))
        return 1 if failed else 0
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for r in results:
        print(format_check(r, color))
    warns = sum(r.status == WARN for r in results)
    skips = sum(r.status == SKIP for r in results)
    skipped = f", {skips} skip" if skips else ""
    print(f"\n{len(results) - warns - skips - len(failed)} ok, {warns} warn, {len(failed)} fail{skipped}")
    return 1 if failed else 0
