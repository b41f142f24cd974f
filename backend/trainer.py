"""``MultimodalGRPOTrainer``: the GRPO training loop for vision-language models.

One step::

    examples  = env.train_examples(step, prompts_per_step)
    rollouts  = source.collect(env, examples, n=rollouts_per_step, ...)   # server or in-process
    advantages per group (backend/loss.py)
    for each micro-batch: adapter.build_batch -> forward -> grpo_loss -> backward
    clip grad norm, AdamW step, LR schedule
    every sync_to_vllm_every steps: push weights to the server
    metrics.jsonl / rollouts.jsonl / rollouts/<step>/*.png / checkpoints/<step>/

With a server and ``async_level = 1`` the rollouts of step k+1 are generated (by the
server, on its own core) while step k trains, so they come from the weights of step k-1;
the importance ratio pi_theta / pi_behaviour and its clipping/masking correct for that.
The trainer's logprobs use the server's sampling transform (logit bias on banned tokens,
then temperature), so the ratio compares like with like.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import os
import math
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from backend.adapters.base import DroppedRollout, MultimodalAdapter, MultimodalBatch, ProcessorAdapter, iter_chunks
from backend.config import MultimodalRLConfig
from backend.errors import VlmrlError
from backend.loss import LossStats, entropy_from_logprobs, group_advantages, grpo_loss
from backend.rollout_types import Rollout
from backend.rundir import JsonlWriter, RunDirectory, write_json_atomic
from backend.sampling import banned_token_ids, bias_vector, logit_bias_for, processed_logprobs
from environments.base import Environment, Example

CHECKPOINT_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"


class RolloutSource(Protocol):
    """Where rollouts come from: ``backend.rollout.RolloutClient`` or an in-process sampler."""

    def collect(
        self, env: Environment, examples: Sequence[Example], n: int, *, temperature: float, top_p: float,
        max_tokens: int, step: int, seed: int | None = None,
    ) -> list[Rollout]: ...


class WeightSink(Protocol):
    """Where weights go after an update: ``backend.weight_sync.WeightSyncClient``.

    A sink that also has ``reconnect(timeout_s)`` lets the trainer carry on when the
    server restarts (it then holds its start weights): re-join, push the current weights.
    """

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> Any: ...


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_logprobs(
    model: Any,
    adapter: MultimodalAdapter,
    batch: MultimodalBatch,
    *,
    temperature: float,
    bias: torch.Tensor | None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs (and entropies) of ``batch.input_ids`` under the sampling transform.

    Returns ``logprobs`` (B, L) with ``logprobs[b, t] = log p(input_ids[b, t] | < t)`` and 0
    at t = 0, and ``entropy`` (B, L) or None. Only the logits from the first completion
    position on are materialised (``logits_to_keep``), not the prompt's.
    """
    B, L = batch.input_ids.shape
    start = 0  # first position whose logits are needed
    if batch.prompt_lengths is not None and B:
        start = max(int(batch.prompt_lengths.min()) - 1, 0)
    extra: dict[str, Any] = {}
    if start > 0 and _accepts_logits_to_keep(model):
        extra["logits_to_keep"] = L - start
    else:
        start = 0
    logits = adapter.forward(model, batch, **extra, use_cache=False).logits  # (B, L - start, V)
    lp_full = processed_logprobs(logits[:, :-1], temperature, bias)  # (B, L - start - 1, V)
    targets = batch.input_ids[:, start + 1 :]  # (B, L - start - 1)
    chosen = lp_full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L - start - 1)
    logprobs = torch.zeros((B, L), dtype=chosen.dtype, device=chosen.device)
    logprobs[:, start + 1 :] = chosen
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.zeros((B, L), dtype=chosen.dtype, device=chosen.device)
            entropy[:, start + 1 :] = entropy_from_logprobs(lp_full.detach())
    return logprobs, entropy


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for p in content:
                if p.get("type") == "text":
                    parts.append(str(p.get("text", "")))
                elif p.get("type") == "image":
                    parts.append("<image>")
    return " ".join(parts)


class MultimodalGRPOTrainer:
    """GRPO for VLMs: rollouts in, gradient steps out, weights pushed to the server.

    ``model`` is a Hugging Face VLM, ``processor`` its processor, ``adapter`` its batch
    builder (``backend.adapters.adapter_for``), ``config`` the ``[trainer.args]`` table.
    Optional: ``env`` (or :meth:`set_environment`), ``rollout_source`` (a
    ``RolloutClient``; default: in-process sampling with the model itself),
    ``weight_sync`` (a ``WeightSyncClient``), ``run_dir`` (where metrics, rollouts and
    checkpoints go), ``ref_model`` (frozen reference for ``beta > 0``).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        adapter: MultimodalAdapter,
        config: MultimodalRLConfig,
        *,
        env: Environment | None = None,
        rollout_source: RolloutSource | None = None,
        weight_sync: WeightSink | None = None,
        run_dir: str | Path | None = None,
        ref_model: Any = None,
        banned_ids: Sequence[int] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.adapter = adapter
        self.config = config
        self.env = env
        self.weight_sync = weight_sync
        self.run_dir = RunDirectory(run_dir) if run_dir is not None else None
        self.log = log or (lambda s: print(s, flush=True))
        self.device = next(model.parameters()).device
        tok = getattr(processor, "tokenizer", processor)
        self.banned_ids = list(banned_ids) if banned_ids is not None else banned_token_ids(tok)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.bias = bias_vector(logit_bias_for(self.banned_ids), vocab, device=self.device)
        if rollout_source is None:
            from backend.evaluate import InProcessRolloutSource

            rollout_source = InProcessRolloutSource(model, processor, banned_ids=self.banned_ids)
        self.rollout_source = rollout_source
        if config.beta > 0 and ref_model is None:
            import copy

            ref_model = copy.deepcopy(model)
        self.ref_model = ref_model
        if self.ref_model is not None:
            self.ref_model.eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup=config.warmup_steps, total=config.max_steps, kind=config.lr_scheduler_type),
        )
        self.step = 0  # optimizer steps done
        self.history: list[dict[str, Any]] = []
        self.extra_state: dict[str, Any] = {}  # saved in every checkpoint's trainer_state.json
        self._metrics: JsonlWriter | None = None
        self._rollouts: JsonlWriter | None = None
        # The weights version the server holds, as far as the trainer knows; a rollout
        # sampled with an older one means the server restarted and lost our weights.
        self.server_version = 0
        self.rejoins = 0
        self._pending_write: cf.Future[None] | None = None

    # --- setup ------------------------------------------------------------------------------

    def set_environment(self, env: Environment | str, args: dict[str, Any] | None = None) -> None:
        """Train on ``env`` (an Environment or a registry id with ``args``)."""
        if isinstance(env, str):
            from environments import make_env

            env = make_env(env, args)
        self.env = env

    # --- one step ---------------------------------------------------------------------------

    def compute_advantages(self, rollouts: Sequence[Rollout]) -> None:
        """Set ``rollout.advantage`` from the rewards of its group (in place)."""
        if not rollouts:
            return
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        groups = torch.tensor([r.group for r in rollouts], dtype=torch.long)
        adv = group_advantages(rewards, groups, scale=self.config.scale_rewards)
        for r, a in zip(rollouts, adv.tolist()):
            r.advantage = a

    def train_step(self, rollouts: Sequence[Rollout]) -> dict[str, Any]:
        """One optimizer step on ``rollouts`` (advantages computed here). Returns metrics.

        With ``beta == 0`` a sequence with zero advantage has zero gradient, so it is not
        forwarded at all (most groups early and late in training); it still counts in the
        loss denominator, so the update equals the one of the full batch. Per-token metrics
        (ir, entropy, clip/masked fractions, KLs) are then those of the trained sequences.
        """
        cfg = self.config
        self.compute_advantages(rollouts)
        dropped: list[DroppedRollout] = []
        todo: list[Rollout] = list(rollouts)
        denom_tokens = denom_seqs = None
        if cfg.beta == 0 and isinstance(self.adapter, ProcessorAdapter):
            valid, dropped = self.adapter.validate(rollouts)
            denom_tokens = sum(len(r.completion_ids) for r in valid)
            denom_seqs = len(valid)
            todo = [r for r in valid if r.advantage]
        batches: list[MultimodalBatch] = []
        for chunk in iter_chunks(todo, cfg.micro_batch_size):
            mb = self.adapter.build_batch(chunk)
            dropped.extend(mb.dropped)
            if len(mb):
                batches.append(mb.to(self.device))
        if denom_tokens is None or denom_seqs is None:
            denom_tokens = sum(mb.num_loss_tokens for mb in batches)
            denom_seqs = sum(len(mb) for mb in batches)
        denom = float(denom_tokens if cfg.loss_agg == "token" else denom_seqs)
        stats = LossStats()
        loss_sum = 0.0
        seq_tokens = 0
        self.optimizer.zero_grad(set_to_none=True)
        for mb in batches:
            logprobs, entropy = token_logprobs(
                self.model, self.adapter, mb, temperature=cfg.temperature, bias=self.bias, with_entropy=True
            )
            ref_lp = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_lp, _ = token_logprobs(
                        self.ref_model, self.adapter, mb, temperature=cfg.temperature, bias=self.bias
                    )
            out = grpo_loss(
                logprobs, mb.behavior_logprobs, mb.advantages, mb.loss_mask,
                clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                mask_ratio_low=cfg.mask_ratio_low, mask_ratio_high=cfg.mask_ratio_high,
                ref_logprobs=ref_lp, beta=cfg.beta, agg=cfg.loss_agg, denominator=denom, entropy=entropy,
            )
            out.loss.backward()
            loss_sum += float(out.loss.detach())
            stats.merge(out.stats)
            seq_tokens += mb.num_tokens
        has_data = denom_seqs > 0
        if has_data and not batches:
            for p in self.params:  # what a batch of zero advantages gives: AdamW still steps
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)) if has_data else 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        if has_data and math.isfinite(grad_norm):
            self.optimizer.step()
        elif has_data:
            self.log(f"step {self.step + 1}: non-finite grad norm, update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        return {
            "loss": loss_sum,
            "reward_mean": float(rewards.mean()) if len(rewards) else float("nan"),
            "reward_std": float(rewards.std(unbiased=False)) if len(rewards) else float("nan"),
            **stats.summary(),
            "grad_norm": grad_norm,
            "lr": lr,
            "num_rollouts": len(rollouts),
            "dropped": len(dropped),
            "loss_tokens": int(denom_tokens),
            "trained_sequences": int(stats.sequences),
            "tokens": seq_tokens,
        }

    def sync_weights(self) -> float:
        """Push the current weights to the server (version = step). Returns seconds taken."""
        if self.weight_sync is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            self._push()
        except VlmrlError as e:
            if not self._can_rejoin():
                raise
            self._rejoin(f"weight sync failed ({e})")
        return time.perf_counter() - t0

    def _push(self) -> None:
        """Send the current weights as version ``step``; the server then holds them."""
        with torch.no_grad():
            self.weight_sync.sync(self.named_weights(), version=self.step)  # type: ignore[union-attr]
        self.server_version = self.step

    def _can_rejoin(self) -> bool:
        return callable(getattr(self.weight_sync, "reconnect", None))

    def _rejoin(self, why: str) -> None:
        """The server restarted or the sync group broke: wait for the server, join it
        again and push the current weights (raises if that fails too)."""
        self.log(f"trainer: {why}; re-joining the server and pushing the weights of step {self.step}")
        t0 = time.perf_counter()
        self.weight_sync.reconnect(self.config.request_timeout_s)  # type: ignore[union-attr]
        self._push()
        self.rejoins += 1
        self.log(f"trainer: server holds the weights of step {self.step} again ({time.perf_counter() - t0:.1f}s)")

    def _rollouts_of(self, step: int, pending: cf.Future[list[Rollout]], floor: int, rejoins: int) -> list[Rollout]:
        """The rollouts ``pending`` brings, or fresh ones if the server lost our weights
        while sampling them (a restart: it answers with a version below ``floor``).
        ``rejoins``: :attr:`rejoins` when ``pending`` was sent."""
        try:
            rollouts = pending.result()
        except VlmrlError as e:
            if not self._can_rejoin():
                raise
            if self.rejoins == rejoins:  # else the server was joined again since: just ask again
                self._rejoin(f"rollouts of step {step} failed ({e})")
            return self._collect(step)
        lost = [r.weight_version for r in rollouts if r.weight_version is not None and r.weight_version < floor]
        if lost and self._can_rejoin():
            self._rejoin(f"rollouts of step {step} came from weights version {min(lost)} but the server "
                         f"was given version {floor}: it restarted")
            return self._collect(step)
        return rollouts

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The weights the server needs, by their Hugging Face names."""
        return [(n, p.detach()) for n, p in self.model.named_parameters()]

    # --- the loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        """Run steps ``self.step + 1 .. max_steps``; returns the metrics of each step."""
        if self.env is None:
            raise RuntimeError("no environment: pass env= or call set_environment()")
        cfg = self.config
        if self.run_dir is not None:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self._metrics = JsonlWriter(self.run_dir.metrics)
            self._rollouts = JsonlWriter(self.run_dir.rollouts)
        self.model.eval()  # no dropout: the server samples without it
        last_saved = None
        # With a server (it holds its own copy of the weights), the next step's rollouts are
        # generated while this step trains: one step off-policy, corrected by the ratio. A
        # source sampling with the trainer's own model stays synchronous.
        ahead = cfg.async_level > 0 and not getattr(self.rollout_source, "shares_model", False)
        pending: cf.Future[list[Rollout]] | None = None
        writer = cf.ThreadPoolExecutor(1, thread_name_prefix="rollout-writer") if self._rollouts is not None else None
        floor, rejoins = self.server_version, self.rejoins  # when `pending` was sent
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                step = self.step + 1
                if pending is None:
                    pending, floor, rejoins = _in_thread(self._collect, step), self.server_version, self.rejoins
                rollouts = self._rollouts_of(step, pending, floor, rejoins)
                pending = None
                if ahead and step < cfg.max_steps:
                    pending, floor, rejoins = _in_thread(self._collect, step + 1), self.server_version, self.rejoins
                t1 = time.perf_counter()
                metrics = self.train_step(rollouts)
                t2 = time.perf_counter()
                sync_s = self.sync_weights() if step % cfg.sync_to_vllm_every == 0 else 0.0
                # Rollouts (PNGs, JSON) are written by a helper thread while the next step
                # runs; at most one write is pending, and it is done before a checkpoint.
                self._drain_writes()
                if writer is not None:
                    self._pending_write = writer.submit(self._write_rollouts, step, rollouts)
                step_s = time.perf_counter() - t0
                metrics = {
                    "step": step,
                    **metrics,
                    "tokens_per_s": metrics["tokens"] / max(t2 - t1, 1e-9),
                    "rollout_s": t1 - t0,
                    "train_s": t2 - t1,
                    "sync_s": sync_s,
                    "step_s": step_s,
                    "time": time.time(),
                }
                # JSON has no NaN: a metric with no token to average over (nothing trained) is null
                metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
                self.history.append(metrics)
                if self._metrics is not None:
                    self._metrics.write(metrics)
                if step % cfg.log_every_steps == 0 or step == cfg.max_steps:
                    self.log(self.progress_line(metrics))
                if cfg.eval_every and step % cfg.eval_every == 0:
                    self._evaluate(step)
                if cfg.save_every and step % cfg.save_every == 0 and self.run_dir is not None:
                    self._drain_writes()
                    self.save_checkpoint()
                    last_saved = step
            self._drain_writes()
            done = self.run_dir is not None and (self.run_dir.checkpoint(self.step) / CHECKPOINT_MARKER).exists()
            if self.run_dir is not None and last_saved != self.step and not done:
                self.save_checkpoint()
        finally:
            try:
                self._drain_writes()  # nothing already produced is lost on Ctrl-C or an error
            finally:
                if writer is not None:
                    writer.shutdown(wait=True)
            for w in (self._metrics, self._rollouts):
                if w is not None:
                    w.close()
            self._metrics = self._rollouts = None
        return self.history

    def _collect(self, step: int) -> list[Rollout]:
        """The scored rollouts of ``step`` from the rollout source."""
        cfg = self.config
        assert self.env is not None
        examples = self.env.train_examples(step, cfg.prompts_per_step)
        # No per-request seed: the hf engine batches unseeded requests together (a seeded
        # one runs alone), so sampling uses the server's own generator.
        return self.rollout_source.collect(
            self.env, examples, cfg.rollouts_per_step, temperature=cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_tokens, step=step, seed=None,
        )

    def progress_line(self, m: dict[str, Any]) -> str:
        """``step 12/100 reward=0.62 loss=0.045 ir=1.02 ent=2.34 kl=0.010 0.41s/it`` (``-``: no value)."""

        def f(key: str, spec: str) -> str:
            v = m.get(key)
            return "-" if v is None else format(v, spec)

        return (
            f"step {m['step']}/{self.config.max_steps} reward={f('reward_mean', '.2f')} loss={f('loss', '.3f')} "
            f"ir={f('ir', '.2f')} ent={f('entropy', '.2f')} kl={f('kl', '.3f')} {m['step_s']:.2f}s/it"
        )

    def _evaluate(self, step: int) -> None:
        from backend.evaluate import greedy_accuracy

        res = greedy_accuracy(self.model, self.processor, self.env, self.config.eval_size,  # type: ignore[arg-type]
                              max_tokens=self.config.max_tokens, banned_ids=self.banned_ids)
        self.log(f"eval step {step}: accuracy {res['accuracy']:.3f} on {res['n']} held-out prompts")
        if self.run_dir is not None:
            with JsonlWriter(self.run_dir.eval) as w:
                w.write({"step": step, "accuracy": res["accuracy"], "n": res["n"], "time": time.time()})

    def _drain_writes(self) -> None:
        """Wait for the pending rollout write (raising its error, if any)."""
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            pending.result()

    def _write_rollouts(self, step: int, rollouts: Sequence[Rollout]) -> None:
        if self._rollouts is None or self.run_dir is None:
            return
        img_dir = self.run_dir.rollout_images(step)
        saved: dict[tuple[str, int], list[str]] = {}
        for r in rollouts:
            key = (r.example_id, r.group)
            if key not in saved:
                names: list[str] = []
                for k, img in enumerate(r.images):
                    img_dir.mkdir(parents=True, exist_ok=True)
                    name = f"{r.example_id}-{k}.png"
                    img.save(img_dir / name)
                    names.append(f"{img_dir.parent.name}/{step}/{name}")  # relative to the run dir
                saved[key] = names
            self._rollouts.write(
                {
                    "step": step,
                    "example_id": r.example_id,
                    "group": r.group,
                    "index": r.index,
                    "prompt": _prompt_text(r.messages),
                    "completion": r.completion,
                    "reward": r.reward,
                    "parts": r.reward_parts,
                    "advantage": r.advantage,
                    "answer": r.answer if isinstance(r.answer, (str, int, float, bool, type(None))) else str(r.answer),
                    "finish_reason": r.finish_reason,
                    "weight_version": r.weight_version,
                    "images": saved[key],
                }
            )

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/<step>/``: weights, processor, optimizer, scheduler, RNG, step.

        The ``COMPLETE`` marker is written last; a checkpoint without it is ignored.
        """
        assert self.run_dir is not None, "save_checkpoint needs a run_dir"
        final = self.run_dir.checkpoint(self.step)
        path = final.with_name(f".{final.name}.tmp")  # written whole, then renamed into place
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        self.model.save_pretrained(path)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(path)
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            path / "optimizer.pt",
        )
        torch.save(
            {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": _numpy_rng_state(),
            },
            path / "rng.pt",
        )
        write_json_atomic(
            path / TRAINER_STATE,
            {"step": self.step, "config": self.config.model_dump(mode="json"), **self.extra_state},
        )
        (path / CHECKPOINT_MARKER).write_text(f"{self.step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(path, final)
        self.log(f"checkpoint step {self.step}: {final}")
        return final

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore weights, optimizer, scheduler, RNG and step from ``path``; returns the step."""
        path = Path(path)
        if not (path / CHECKPOINT_MARKER).exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {CHECKPOINT_MARKER})")
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(str(f), device=str(self.device)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _is_tied(self.model, k)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path}: missing {missing[:5]} unexpected {unexpected[:5]}")
        opt = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        rng = torch.load(path / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("numpy") is not None:
            import numpy as np

            np.random.set_state(rng["numpy"])
        self.step = int(json.loads((path / TRAINER_STATE).read_text())["step"])
        return self.step


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warmup over
    ``warmup`` steps, then constant, or decayed linearly / by a half cosine to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def _in_thread(fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
    """Run ``fn(*args)`` on a daemon thread: a request still in flight never blocks exit."""
    fut: cf.Future[Any] = cf.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            fut.set_exception(e)

    threading.Thread(target=run, name="rollouts", daemon=True).start()
    return fut


def _is_tied(model: Any, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied and bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _numpy_rng_state() -> Any:
    try:
        import numpy as np

        return np.random.get_state()
    except ImportError:  # pragma: no cover
        return None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint."""
    return json.loads((Path(path) / TRAINER_STATE).read_text())


__all__ = [
    "MultimodalGRPOTrainer",
    "RolloutSource",
    "WeightSink",
    "read_trainer_state",
    "token_logprobs",
]
