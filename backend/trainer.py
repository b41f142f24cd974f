"""``MultimodalGRPOTrainer``: the GRPO training loop for vision-language models.

One step::

    examples  = env.train_examples(step, prompts_per_step)
    rollouts  = source.collect(env, examples, n=rollouts_per_step, ...)   # server or in-process
    advantages per group (backend/loss.py)
    for each micro-batch: adapter.build_batch -> forward -> grpo_loss -> backward
    clip grad norm, AdamW step, LR schedule (backend/optim.py)
    every sync_to_vllm_every steps: push weights to the server
    metrics.jsonl / rollouts.jsonl (backend/rollout_writer.py) / checkpoints (backend/checkpoint.py)

With a server and ``async_level = 1`` the rollouts of step k+1 are generated (by the
server, on its own core) while step k trains (and, on one rank, step k's weights are pushed
while the trainer waits for them), so they come from the weights of step k-1;
the importance ratio pi_theta / pi_behaviour and its clipping/masking correct for that.
The trainer's logprobs use the server's sampling transform (logit bias on banned tokens,
then temperature; backend/logprobs.py), so the ratio compares like with like.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from backend import checkpoint
from backend import distributed as D
from backend import records as rec
from backend.adapters.base import MultimodalAdapter
from backend.config import MultimodalRLConfig
from backend.errors import VlmrlError
from backend.logprobs import token_logprobs
from backend.lora import dropout_modules, is_lora, merged_weights, prepare_model
from backend.models import enable_gradient_checkpointing
from backend.loss import group_advantages
from backend.optim import make_optimizer
from backend.precision import Precision, precision_of
from backend.rollout_types import DropWatch, Rollout, RolloutSource
from backend.rollout_writer import RolloutWriter
from backend.rundir import JsonlWriter, RunDirectory, checkpoint_complete
from backend.trackers import Trackers, open_trackers
from backend.sampling import banned_token_ids, bias_vector, logit_bias_for
from backend.threads import in_thread
from backend.trainpush import WeightSink, gather_buckets, push, rejoin
from backend.tokencheck import check_rollout_tokens
from environments.base import Environment, MultiTurnEnvironment


@dataclass
class _Prefetch:
    """Rollouts asked for ahead, and what the trainer knew when it asked."""

    step: int
    future: cf.Future[list[Rollout]]
    floor: int  # the weights version the server had been given: older samples mean a restart
    rejoins: int  # re-joins done so far: a later one already reacted to this request's failure


class MultimodalGRPOTrainer:
    """GRPO for VLMs: rollouts in, gradient steps out, weights pushed to the server.

    ``model`` is a Hugging Face VLM, ``processor`` its processor, ``adapter`` its batch
    builder (``backend.adapters.adapter_for``), ``config`` the ``[trainer.args]`` table.
    Optional: ``env`` (or :meth:`set_environment`), ``rollout_source`` (a
    ``RolloutClient``; default: in-process sampling with the model itself),
    ``weight_sync`` (a ``WeightSyncClient``), ``run_dir`` (where metrics, rollouts and
    checkpoints go), ``ref_model`` (frozen reference for ``beta > 0``).

    With a ``weight_sync``, the model's parameters are first moved into one flat buffer
    (values and training unchanged) so buckets go on the wire without a packing copy; that
    has to happen before the optimizer holds the parameters, which is why it is done here.

    Precision follows ``config.dtype`` and ``config.low_precision_update``
    (:mod:`backend.precision`): a model loaded in another dtype than the scheme stores its
    weights in is converted here (e.g. to float32 master weights for bfloat16 autocast).
    ``config.gradient_checkpointing`` recomputes each layer's activations in the backward.
    ``config.lora`` wraps the model in peft adapters and ``config.freeze_vision`` freezes the
    vision tower (:mod:`backend.lora`); ``self.model`` is then the peft model.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        adapter: MultimodalAdapter,
        config: MultimodalRLConfig,
        *,
        env: Environment | MultiTurnEnvironment | None = None,
        rollout_source: RolloutSource | None = None,
        weight_sync: WeightSink | None = None,
        run_dir: str | Path | None = None,
        ref_model: Any = None,
        banned_ids: Sequence[int] | None = None,
        log: Callable[[str], None] | None = None,
        dist: D.DistInfo | None = None,
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
        self.dist = dist
        self.precision: Precision = precision_of(config.dtype, config.low_precision_update)
        # LoRA under autocast: the frozen base needs no float32 master copy, only the adapters do
        keep = self.precision.compute_dtype if config.lora is not None else self.precision.param_dtype
        stored = next(model.parameters()).dtype
        if stored != keep:
            self.log(f"trainer: converting the model from {stored} to {keep} ({self.precision.describe()})")
            model.to(keep)
        if config.lora is not None or config.freeze_vision:
            model = self.model = prepare_model(model, config.lora, config.freeze_vision,
                                               fp32_adapters=not self.precision.stochastic_rounding)
        self._ckpt_layers: list[torch.nn.Module] = []
        if config.gradient_checkpointing:
            self._ckpt_layers = enable_gradient_checkpointing(model)
        self._ckpt_layers += dropout_modules(model)  # also in training mode for the loss's forward only
        tok = getattr(processor, "tokenizer", processor)
        self.banned_ids = list(banned_ids) if banned_ids is not None else banned_token_ids(tok)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.bias = bias_vector(logit_bias_for(self.banned_ids), vocab, device=self.device)
        if rollout_source is None:
            from backend.evaluate import InProcessRolloutSource

            rollout_source = InProcessRolloutSource(model, processor, banned_ids=self.banned_ids)
        self.rollout_source = rollout_source
        if dist is not None and dist.is_main and rollout_source.shares_model:
            raise VlmrlError("several trainer ranks need a server to sample (a sharded model cannot generate on "
                             "rank 0 alone): pass rollout_source=RolloutClient(...)")
        if config.beta > 0 and ref_model is None:
            import copy

            ref_model = copy.deepcopy(model)
        self.ref_model = ref_model
        if self.ref_model is not None:
            self.ref_model.eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        if dist is not None:
            if is_lora(model):
                raise VlmrlError("LoRA with several trainer ranks is not supported yet: set trainer.processes = 1")
            D.shard_model(model, dist, cpu_offload=config.fsdp_cpu_offload)
        elif weight_sync is not None and not is_lora(model):  # LoRA sends fresh merged tensors: nothing to flatten
            self._flatten_parameters()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params, config, self.precision)
        # float16 autocast only: scale the loss so small gradients do not flush to zero
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.loss_scaling else None
        self.step = 0  # optimizer steps done
        self.history: list[dict[str, Any]] = []
        self.identity: dict[str, Any] | None = None  # saved in each checkpoint: what --resume compares
        self._metrics: JsonlWriter | None = None
        self._rollout_writer: RolloutWriter | None = None
        self._trackers: Trackers | None = None  # report_to: fed on their own thread (backend/trackers.py)
        # The weights version the server holds, as far as the trainer knows; a rollout
        # sampled with an older one means the server restarted and lost our weights.
        self.server_version = 0
        self.rejoins = 0
        self.tokens_checked = False  # the server's prompt-token counts were compared with ours

    # --- setup ------------------------------------------------------------------------------

    def _flatten_parameters(self) -> None:
        from backend.weight_sync.layout import try_flatten

        # benchmarks/weight_sync.py: 1.1-1.3x a raw broadcast this way, 1.5-1.8x packing
        _, why_not = try_flatten(self.model)
        if why_not:
            self.log(f"trainer: parameters not flattened ({why_not}); weight sync packs buckets")

    def set_environment(self, env: Environment | MultiTurnEnvironment | str,
                        args: dict[str, Any] | None = None) -> None:
        """Train on ``env`` (an environment, or a registry id or module name with ``args``:
        :func:`backend.envs.build_env`)."""
        if isinstance(env, str):
            from backend.envs import build_env

            env = build_env(env, args)
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

        See :mod:`backend.trainstep` (zero-advantage sequences, several ranks)."""
        from backend.trainstep import grpo_step

        if self.dist is not None and self.dist.is_main:
            D.broadcast_command(D.Command(D.CMD_STEP, list(rollouts)), self.dist)  # the others train their share
        return grpo_step(self, rollouts)

    def follow(self) -> None:
        """On a rank other than 0: do what rank 0 broadcasts (train, push, save) until it stops."""
        assert self.dist is not None and not self.dist.is_main
        while True:
            cmd = D.broadcast_command(None, self.dist)
            if cmd.kind == D.CMD_STEP:
                self.train_step(cmd.payload)
            elif cmd.kind == D.CMD_PUSH:
                bucket_bytes, dtype = cmd.payload
                gather_buckets(self, bucket_bytes, dtype, 0)
            elif cmd.kind == D.CMD_SAVE:
                self.save_checkpoint()
            elif cmd.kind == D.CMD_STOP:
                return
            else:
                raise RuntimeError(f"rank {self.dist.rank}: unknown command {cmd.kind!r}")

    def stop_followers(self) -> None:
        """Rank 0: let the other ranks leave :meth:`follow`."""
        if self.dist is not None and self.dist.is_main:
            D.broadcast_command(D.Command(D.CMD_STOP), self.dist)

    def sync_weights(self) -> float:
        """Push the current weights to the server (version = step). Returns seconds taken."""
        if self.weight_sync is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            push(self)
        except VlmrlError as e:
            rejoin(self, f"weight sync failed ({e})")
        return time.perf_counter() - t0

    def _sync_on(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # a new thread starts on device 0
        return self.sync_weights()

    @staticmethod
    def _joined(push: cf.Future[float] | None) -> None:
        """Wait for a push started in the background; its error is raised here."""
        if push is not None:
            push.result()

    def _prefetch(self, step: int) -> _Prefetch:
        """Ask for the rollouts of ``step`` on a helper thread, which then encodes their prompts
        (the processor's work, done while the current step trains)."""
        return _Prefetch(step, in_thread(self._collect_encoded, step, name="rollouts"), self.server_version,
                         self.rejoins)

    def _collect_encoded(self, step: int) -> list[Rollout]:
        rollouts = self._collect(step)
        prepare = getattr(self.adapter, "prepare", None)
        if prepare is not None:
            with contextlib.suppress(Exception):  # the training thread encodes again and reports it
                prepare(rollouts)
        return rollouts

    def _rollouts_of(self, pending: _Prefetch) -> list[Rollout]:
        """The rollouts ``pending`` brings, or fresh ones if the server lost our weights
        while sampling them (a restart: it answers with a version below ``pending.floor``)."""
        step = pending.step
        try:
            rollouts = pending.future.result()
        except VlmrlError as e:
            if self.weight_sync is None or 400 <= (getattr(e, "status", None) or 0) < 500:  # refused: no restart
                raise
            if self.rejoins == pending.rejoins:  # else the server was joined again since: just ask again
                rejoin(self, f"rollouts of step {step} failed ({e})")
            return self._collect(step)
        lost = [r.weight_version for r in rollouts if r.weight_version is not None and r.weight_version < pending.floor]
        if lost and self.weight_sync is not None:
            rejoin(self, f"rollouts of step {step} came from weights version {min(lost)} but the server "
                         f"was given version {pending.floor}: it restarted")
            return self._collect(step)
        return rollouts

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The weights the server needs, by their Hugging Face names (with LoRA: the merged adapted ones)."""
        if is_lora(self.model):
            return list(merged_weights(self.model, self.precision.compute_dtype))
        return [(n, p.detach()) for n, p in self.model.named_parameters()]

    # --- the loop ---------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        """Run steps ``self.step + 1 .. max_steps``; returns the metrics of each step."""
        if self.env is None:
            raise RuntimeError("no environment: pass env= or call set_environment()")
        if self.dist is not None and not self.dist.is_main:
            raise RuntimeError("train() runs on rank 0; the other ranks call follow()")
        cfg = self.config
        if self.run_dir is not None:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self._metrics = JsonlWriter(self.run_dir.metrics)
            self._rollout_writer = RolloutWriter(self.run_dir)
        self._trackers = open_trackers(cfg, self.run_dir, self.identity, self.step, self.log)
        self.model.eval()  # no dropout: the server samples without it
        last_saved = None
        # With a server (it holds its own copy of the weights), the next step's rollouts are
        # generated while this step trains: one step off-policy, corrected by the ratio. A
        # source sampling with the trainer's own model stays synchronous.
        ahead = cfg.async_level > 0 and not self.rollout_source.shares_model
        pending: _Prefetch | None = None
        # Alone (no ranks to keep in step), the trainer pushes its weights while it waits for
        # the next step's rollouts; the push is joined before anything reads the server again.
        overlap = ahead and self.dist is None
        pushing: cf.Future[float] | None = None
        drops = DropWatch(self.log)  # examples left out (broken images, ...); stops a run that loses them all
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                step = self.step + 1
                if pending is not None and pushing is not None:
                    cf.wait([pending.future])  # while the weights go out
                ts = time.perf_counter()
                self._joined(pushing)  # before the rollouts' errors are handled (they may re-join the server)
                pushing = None
                sync_wait = time.perf_counter() - ts
                rollouts = self._rollouts_of(pending or self._prefetch(step))
                dropped = drops.note(step, rollouts)  # none left: train_step([]) makes a step without an update
                # server and trainer must count the same prompt tokens (raises ImageTokenMismatch)
                self.tokens_checked = self.tokens_checked or check_rollout_tokens(self.adapter, rollouts)
                pending = self._prefetch(step + 1) if ahead and step < cfg.max_steps else None
                t1 = time.perf_counter()
                metrics = self.train_step(rollouts)
                t2 = time.perf_counter()
                if step % cfg.sync_to_vllm_every == 0:
                    if overlap and step < cfg.max_steps:
                        pushing = in_thread(self._sync_on, self.device, name="weight-push")
                    else:
                        self.sync_weights()
                t3 = time.perf_counter()
                # Rollouts (PNGs, JSON) are written by a helper thread while the next step runs.
                if self._rollout_writer is not None:
                    self._rollout_writer.submit(step, rollouts)
                t4 = time.perf_counter()
                record = rec.MetricRecord(step, {
                    **metrics, rec.EXAMPLES_DROPPED: dropped,
                    rec.TOKENS_PER_S: metrics[rec.TOKENS] / max(t2 - t1, 1e-9),
                    rec.ROLLOUT_S: t1 - t0 - sync_wait,
                    rec.TRAIN_S: t2 - t1,
                    # sync_weights' own figure leaves out its bookkeeping; an overlapped push counts
                    # where the trainer waited for it, in the next step
                    rec.SYNC_S: t3 - t2 + sync_wait,
                    rec.WRITE_S: t4 - t3,
                    rec.STEP_S: t4 - t0,
                    rec.TIME: time.time(),
                    # a push in flight counts: the server has this version before it samples again
                    **({rec.WEIGHT_VERSION: step if pushing is not None else self.server_version}
                       if self.weight_sync is not None else {}),
                })
                line = record.to_json()  # JSON has no NaN: a metric with no token to average over is null
                self.history.append(line)
                if self._metrics is not None:
                    self._metrics.write(line)
                if self._trackers is not None:
                    self._trackers.step(line, rollouts)  # queued: sent on the trackers' thread
                if step % cfg.log_every_steps == 0 or step == cfg.max_steps:
                    self.log(self.progress_line(line))
                drops.check()
                if cfg.eval_every and step % cfg.eval_every == 0:
                    self._joined(pushing)  # the server answers with this step's weights
                    pushing = None
                    self._evaluate(step)
                if cfg.save_every and step % cfg.save_every == 0 and self.run_dir is not None:
                    self.save_checkpoint()
                    last_saved = step
            if self.run_dir is not None and last_saved != self.step and not checkpoint_complete(
                    self.run_dir.checkpoint(self.step)):
                self.save_checkpoint()
            self.stop_followers()
        finally:
            if pushing is not None:
                cf.wait([pushing])  # never leave a push on the wire behind
            try:
                if self._rollout_writer is not None:
                    self._rollout_writer.close()  # nothing already produced is lost on Ctrl-C or an error
            finally:
                try:
                    if self._metrics is not None:
                        self._metrics.close()
                finally:
                    if self._trackers is not None:
                        self._trackers.close()  # last (it may wait on uploads); never raises
                    self._metrics = self._rollout_writer = self._trackers = None
        return self.history

    def _collect(self, step: int) -> list[Rollout]:
        """The scored rollouts of ``step`` from the rollout source."""
        cfg = self.config
        assert self.env is not None
        if isinstance(self.env, MultiTurnEnvironment):
            # a group is rollouts_per_step episodes of one seed
            return self.rollout_source.collect_episodes(
                self.env, self.env.train_seeds(step, cfg.prompts_per_step), cfg.rollouts_per_step,
                temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, step=step,
                max_context=getattr(self.adapter, "max_length", None),
            )
        examples = self.env.train_examples(step, cfg.prompts_per_step)
        # No per-request seed: the hf engine batches unseeded requests together (a seeded
        # one runs alone), so sampling uses the server's own generator.
        return self.rollout_source.collect(
            self.env, examples, cfg.rollouts_per_step, temperature=cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_tokens, step=step, seed=None,
        )

    def progress_line(self, m: dict[str, Any]) -> str:
        """``step 12/100 reward=0.62 loss=0.045 ir=1.02 ent=2.34 kl=0.010 0.41s/it`` (``-``: no value)."""
        return rec.step_line(m, self.config.max_steps, missing="-")

    def _evaluate(self, step: int) -> None:
        """Greedy scores on the held-out split through the rollout source (the server, which
        holds this step's weights when ``eval_every`` is a multiple of ``sync_to_vllm_every``)."""
        from backend.evaluate import score_split

        assert self.env is not None
        cfg = self.config
        res = score_split(self.rollout_source, self.env, count=cfg.eval_size, max_tokens=cfg.max_tokens, step=step,
                          max_context=getattr(self.adapter, "max_length", None), name=f"step {step}")
        parts = " ".join(f"{k}={v:.3f}" for k, v in res.parts.items())
        self.log(f"eval step {step}: mean reward {res.mean:.3f} (std {res.std:.3f}) on {res.n} held-out "
                 f"{'episodes' if isinstance(self.env, MultiTurnEnvironment) else 'prompts'}"
                 + (f" [{parts}]" if parts else ""))
        if self.run_dir is not None:
            with JsonlWriter(self.run_dir.eval) as w:
                w.write(rec.EvalRecord(step, res.mean, res.n, time.time(), res.std, res.parts,
                                       res.achievements).to_json())

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/<step>/``: weights, processor, optimizer, scheduler, RNG, step.

        Pending rollout writes are finished first, so the checkpoint's run directory is whole.
        """
        assert self.run_dir is not None, "save_checkpoint needs a run_dir"
        if self._rollout_writer is not None:
            self._rollout_writer.drain()
        if self.dist is not None and self.dist.is_main:
            D.broadcast_command(D.Command(D.CMD_SAVE), self.dist)  # every rank writes its shard
        state = rec.TrainerState(self.step, self.config.model_dump(mode="json"), self.identity)
        path = checkpoint.save_checkpoint(self.run_dir, self.model, self.processor, self.optimizer, self.scheduler,
                                          state, self.dist)
        if self.dist is None or self.dist.is_main:
            self.log(f"checkpoint step {self.step}: {path}")
        return path

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore weights, optimizer, scheduler, RNG and step from ``path``; returns the step."""
        self.step = checkpoint.load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.device)
        return self.step


__all__ = [
    "MultimodalGRPOTrainer",
    "RolloutSource",
    "WeightSink",
    "token_logprobs",
]
