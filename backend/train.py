"""``vlmrl train CONFIG``: the trainer process against a running inference server.

Loads the model, waits for the server's ``/health``, joins the weight-sync group, then
runs :class:`~backend.trainer.MultimodalGRPOTrainer` and writes metrics, rollouts and
checkpoints into the run directory. ``--resume`` restores the latest complete
checkpoint (weights, optimizer, scheduler, RNG, step), drops metric and rollout lines
written after it, pushes the restored weights to the server and continues.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend import contract, net
from backend.config import VlmrlConfig
from backend.device import trainer_device
from backend.errors import ConfigError
from backend.logs import setup_logging
from backend.records import TrainerState, line_step
from backend.rundir import RunDirectory

if TYPE_CHECKING:
    from backend.weight_sync import WeightSyncClient

log = logging.getLogger("vlmrl.train")

#: trainer.args keys that may change between a run and its resumption
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"max_steps", "save_every", "log_every_steps", "eval_every", "eval_size", "max_concurrent",
     "request_timeout_s", "torch_threads", "sync_port", "run_name", "output_dir", "device",
     "gradient_checkpointing", "bucket_size_mb",  # memory and transport only: the same updates either way
     "report_to", "log_rollouts_every", "tracker_project"}  # where copies of the metrics go
)


def _sigterm_to_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_identity(cfg: VlmrlConfig) -> dict[str, Any]:
    """What must not change for ``--resume``: model, environment and the training args."""
    args = cfg.trainer.args.model_dump(mode="json")
    return {
        "model": cfg.model,
        "env": {"id": cfg.env.id, "args": cfg.env.args},
        "args": {k: v for k, v in args.items() if k not in RESUMABLE_CHANGES},
    }


def check_resumable(saved: TrainerState, cfg: VlmrlConfig, ckpt: Path) -> None:
    """``ConfigError`` naming the first key that differs from the checkpoint's config."""
    now = run_identity(cfg)
    then = saved.identity
    if then is None:
        return  # a checkpoint written by the Python API without an identity
    if then.get("model") != now["model"]:
        raise ConfigError(None, "model", f"is {now['model']!r} but checkpoint {ckpt} trained {then.get('model')!r}")
    if then.get("env") != now["env"]:
        raise ConfigError(None, "env", f"differs from the checkpoint's ({then.get('env')}); resume needs the same")
    old_args = then.get("args", {})
    for k in sorted(set(old_args) | set(now["args"])):
        if old_args.get(k) != now["args"].get(k):
            raise ConfigError(
                None, f"trainer.args.{k}",
                f"is {now['args'].get(k)!r} but checkpoint {ckpt} ran with {old_args.get(k)!r}; "
                "resume needs the same config",
            )


def truncate_jsonl_after(path: Path, step: int) -> int:
    """Keep only the records of ``path`` with ``step <= step`` (atomic rewrite). Returns lines dropped."""
    import json

    if not path.exists():
        return 0
    keep: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1  # a partial line from a kill mid-write
            continue
        if (rec_step := line_step(rec)) is not None and rec_step > step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _reset_run_files(rd: RunDirectory, step: int) -> None:
    """Forget everything the trainer wrote after ``step`` (0: a fresh start)."""
    import shutil

    for f in (rd.metrics, rd.rollouts, rd.eval):
        n = truncate_jsonl_after(f, step)
        if n:
            log.info("%s: dropped %d line(s) after step %d", f.name, n, step)
    img_root = rd.rollout_images_dir
    if img_root.is_dir():
        for d in img_root.iterdir():
            if d.is_dir() and d.name.isdigit() and int(d.name) > step:
                shutil.rmtree(d, ignore_errors=True)
    if rd.checkpoints_dir.is_dir():
        for d in rd.checkpoints_dir.iterdir():
            if d.is_dir() and d.name.isdigit() and int(d.name) > step:
                shutil.rmtree(d, ignore_errors=True)


def server_url(cfg: VlmrlConfig) -> str:
    """The inference server's base URL: ``$VLMRL_SERVER_URL`` (the supervisor's) or the config's."""
    env = os.environ.get(contract.ENV_SERVER_URL)
    return env.rstrip("/") if env else net.http_url(cfg.inference.host, cfg.inference.port)


def weight_sync_client(cfg: VlmrlConfig, device: str, token: str | None) -> "WeightSyncClient":
    """The trainer's weight-sync client for ``cfg`` (not yet joined; call ``init``).

    The group holds the trainer (rank 0) and every server worker: one for the hf engine,
    tensor x pipeline x data parallel for vLLM, whose workers each join as a rank.
    """
    from backend.vllm_ext.command import server_ranks
    from backend.weight_sync import WeightSyncClient

    args = cfg.trainer.args
    backend = "nccl" if device == "cuda" else "gloo"
    return WeightSyncClient(
        server_url(cfg), token, backend=backend, host=os.environ.get(contract.ENV_SYNC_HOST) or "127.0.0.1",
        port=args.sync_port, bucket_bytes=args.bucket_bytes(backend), timeout_s=args.request_timeout_s,
        server_ranks=server_ranks(cfg) if cfg.inference.engine == "vllm" else 1,
    )


def train_main(cfg: VlmrlConfig, resume: bool = False) -> int:
    """Run the trainer of ``cfg``; returns the exit code (0 after the final checkpoint)."""
    import numpy as np
    import torch

    from backend.adapters import adapter_for
    from backend.models import load_model_and_processor
    from backend.rollout import RolloutClient, wait_for_health
    from backend.sampling import banned_token_ids
    from backend.checkpoint import read_trainer_state
    from backend.precision import precision_of
    from backend.trainer import MultimodalGRPOTrainer
    from backend.envs import build_env
    from backend import distributed as D

    setup_logging(sys.stdout, timestamps=False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights"/"Writing model shards" bars in trainer.log
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    args = cfg.trainer.args
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    random.seed(args.seed)
    np.random.seed(args.seed % (2**32))
    torch.manual_seed(args.seed)

    # the supervisor names the run directory it watches; alone, the config does
    rd = RunDirectory(os.environ.get(contract.ENV_RUN_DIR) or cfg.run_dir())
    rd.path.mkdir(parents=True, exist_ok=True)
    ckpt = rd.latest_checkpoint() if resume else None
    if ckpt is not None:
        check_resumable(read_trainer_state(ckpt), cfg, ckpt)

    env = build_env(cfg.env.id, cfg.env.args)
    device = trainer_device(args.device, cfg.trainer.gpus)
    dist = D.init_from_env(torch.device(device).type, args.request_timeout_s)  # None with one rank
    main = dist is None or dist.is_main
    if dist is not None and torch.device(device).type == "cuda":
        device = f"cuda:{dist.local_rank}"
    precision = precision_of(args.dtype, args.low_precision_update)
    t0 = time.perf_counter()
    # loaded straight into the dtype the weights are kept in (float32 master weights for autocast)
    # (with LoRA the frozen base stays in the compute dtype: backend/trainer.py)
    model, processor = load_model_and_processor(cfg.model, dtype=args.dtype if args.lora else precision.param_dtype_name,
                                                device=device)
    ref_model = None
    if args.beta > 0:
        ref_model, _ = load_model_and_processor(cfg.model, dtype=args.dtype, device=device)
    adapter = adapter_for(model.config, args.adapter, processor=processor,
                          max_length=cfg.inference.args.max_model_len)
    banned = banned_token_ids(processor.tokenizer)
    ranks = f", {dist.world} ranks (FSDP2 over {dist.backend})" if dist is not None else ""
    if main:
        print(f"trainer: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) "
              f"on {device}, adapter {adapter.name}, {precision.describe()}{ranks}, loaded in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

    client = sync = None
    if main:  # rank 0 alone talks to the server (backend/distributed.py says why)
        url = server_url(cfg)
        wait_for_health(url, timeout_s=cfg.inference.startup_timeout_s)
        client = RolloutClient(url, banned_ids=banned, max_concurrent=args.max_concurrent,
                               timeout_s=args.request_timeout_s, retries=2)
        sync = weight_sync_client(cfg, device, os.environ.get(contract.ENV_RUN_TOKEN))
    trainer = MultimodalGRPOTrainer(
        model, processor, adapter, args, env=env, rollout_source=client, weight_sync=sync, run_dir=rd.path,
        ref_model=ref_model, banned_ids=banned, log=None if main else (lambda s: None), dist=dist,
    )
    trainer.identity = run_identity(cfg)
    if ckpt is not None:
        step = trainer.load_checkpoint(ckpt)
        if main:
            _reset_run_files(rd, step)
            print(f"resumed from {ckpt} at step {step}", flush=True)
    elif main:
        if resume:
            print(f"no complete checkpoint in {rd.checkpoints_dir}; starting from step 0", flush=True)
        _reset_run_files(rd, 0)
    try:
        if not main:
            trainer.follow()
            return 0
        assert sync is not None
        sync.init()
        if trainer.step > 0:
            trainer.sync_weights()  # the server may hold other weights than the checkpoint
        trainer.train()
    except KeyboardInterrupt:
        if main:
            print("trainer: interrupted", flush=True)
        return 130
    finally:
        try:
            if sync is not None:
                sync.close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the real error
            log.warning("closing weight sync: %s", e)
        if client is not None:
            client.close()
        D.close(dist)
    print(f"trainer: done, {trainer.step} steps, final checkpoint {rd.checkpoint(trainer.step)}", flush=True)
    return 0
