"""Held-out evaluation, and in-process generation (sampled rollouts without a server).

:func:`score_split` scores a rollout source (the server through ``RolloutClient``, or
:class:`InProcessRolloutSource`) greedily on an environment's held-out split: prompts for
a single-turn environment, fixed episode seeds for a game. ``vlmrl eval`` runs it against
the configured engine (``vlmrl_tui/evaluation.py`` starts and stops the server per model)
and the trainer's ``eval_every`` against its own server. :class:`InProcessRolloutSource`
samples rollouts with ``model.generate`` from the same processed distribution as the
server (backend/sampling.py) and has the rollout client's ``collect``/``collect_episodes``
signatures, so tests and benchmarks can drive the trainer without an inference server.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from backend.rollout_types import Rollout, Turn, episode_end_reason, episode_example_id
from backend.sampling import banned_token_ids, bias_vector, end_of_turn_ids, logit_bias_for, processed_logprobs
from environments.base import Environment, Example, MultiTurnEnvironment


class _BiasProcessor:
    """Adds a dense logit bias (banned tokens at -100) to the next-token scores."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.bias[: scores.shape[-1]].to(scores.dtype)


@torch.no_grad()
def generate(
    model: Any,
    processor: Any,
    prompts: Sequence[tuple[list[dict[str, Any]], list[Any]]],
    *,
    max_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    banned_ids: Sequence[int] | None = None,
) -> list[tuple[list[int], list[float], str]]:
    """Generate one completion per ``(messages, images)`` prompt.

    Returns ``(token_ids, logprobs, finish_reason)`` per prompt: ids up to and including
    the end-of-turn token, logprobs of the processed distribution (bias, then temperature),
    finish reason ``stop`` or ``length``.
    """
    tok = processor.tokenizer
    if banned_ids is None:
        banned_ids = banned_token_ids(tok)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    bias = bias_vector(logit_bias_for(banned_ids), vocab, device=device)
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in prompts]
    images = [list(imgs) for _, imgs in prompts]
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if any(images):
        kwargs["images"] = images
    old_side = tok.padding_side
    tok.padding_side = "left"  # generation continues every row from its last column
    try:
        enc = processor(**kwargs).to(device)
    finally:
        tok.padding_side = old_side
    end_ids = end_of_turn_ids(tok, getattr(model, "generation_config", None))
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_tokens,
        do_sample=not greedy,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=sorted(end_ids),
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else sorted(end_ids)[0],
    )
    if not greedy:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    if bias is not None:
        from transformers import LogitsProcessorList

        gen_kwargs["logits_processor"] = LogitsProcessorList([_BiasProcessor(bias)])
    out = model.generate(**enc, **gen_kwargs)
    P = enc["input_ids"].shape[1]
    new = out.sequences[:, P:]  # (N, T)
    # raw logits per step -> logprobs of the processed distribution, as the server reports them
    logits = torch.stack(out.logits, dim=1).float()  # (N, T, V)
    lps = processed_logprobs(logits, 1.0 if greedy else temperature, bias)  # (N, T, V)
    chosen = lps.gather(-1, new[..., None]).squeeze(-1)  # (N, T)
    results: list[tuple[list[int], list[float], str]] = []
    for i in range(new.shape[0]):
        ids: list[int] = []
        lp: list[float] = []
        reason = "length"
        for t in range(new.shape[1]):
            tid = int(new[i, t])
            ids.append(tid)
            lp.append(float(chosen[i, t]))
            if tid in end_ids:
                reason = "stop"
                break
        results.append((ids, lp, reason))
    return results


class InProcessRolloutSource:
    """Samples and scores rollouts with the trainer's own model (no server, no weight sync)."""

    #: generation uses the trained model itself: the trainer must not sample ahead
    shares_model = True

    def __init__(self, model: Any, processor: Any, *, banned_ids: Sequence[int] | None = None) -> None:
        self.model = model
        self.processor = processor
        self.banned_ids = list(banned_ids) if banned_ids is not None else banned_token_ids(processor.tokenizer)

    def collect(
        self,
        env: Environment,
        examples: Sequence[Example],
        n: int,
        *,
        temperature: float,
        top_p: float = 1.0,
        max_tokens: int,
        step: int,
        seed: int | None = None,
    ) -> list[Rollout]:
        if top_p != 1.0:
            raise ValueError("InProcessRolloutSource samples with top_p = 1 only")
        prompts = [(ex.messages, ex.images) for ex in examples for _ in range(n)]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                outs = generate(
                    self.model, self.processor, prompts, max_tokens=max_tokens, temperature=temperature,
                    greedy=temperature == 0, banned_ids=self.banned_ids,
                )
        finally:
            self.model.train(was_training)
        tok = self.processor.tokenizer
        rollouts: list[Rollout] = []
        for k, (ids, lps, reason) in enumerate(outs):
            ex = examples[k // n]
            text = tok.decode(ids, skip_special_tokens=True)
            score = env.score(ex, text)
            rollouts.append(
                Rollout(
                    example_id=ex.id, group=k // n, messages=ex.messages, images=ex.images, completion=text,
                    completion_ids=ids, behavior_logprobs=lps, finish_reason=reason, reward=score.reward,
                    reward_parts=dict(score.parts), answer=ex.answer, step=step, index=k,
                )
            )
        return rollouts

    def collect_episodes(self, env: MultiTurnEnvironment, seeds: Sequence[int], n: int, *, temperature: float,
                         top_p: float = 1.0, max_tokens: int, step: int,
                         max_context: int | None = None) -> list[Rollout]:
        """``n`` episodes per seed, played in lockstep: one batched generation per turn
        (greedy at ``temperature == 0``, as the server).

        ``max_context`` is not checked here (no server counts the prompt's tokens); the
        trainer's batch builder cuts an overlong episode at a turn boundary.
        """
        if top_p != 1.0:
            raise ValueError("InProcessRolloutSource samples with top_p = 1 only")
        episodes = [(g, j, env.reset(seed)) for g, seed in enumerate(seeds) for j in range(n)]
        turns: list[list[Turn]] = [[] for _ in episodes]
        tok = self.processor.tokenizer
        was_training = self.model.training
        self.model.eval()
        try:
            active = list(range(len(episodes)))
            while active:
                prompts = [(episodes[i][2].messages, episodes[i][2].images) for i in active]
                outs = generate(self.model, self.processor, prompts, max_tokens=max_tokens, temperature=temperature,
                                greedy=temperature == 0, banned_ids=self.banned_ids)
                for i, (ids, lps, reason) in zip(active, outs):
                    ep = episodes[i][2]
                    text = tok.decode(ids, skip_special_tokens=True)
                    end = len(ep.messages)
                    tr = env.step(ep, text)
                    turns[i].append(Turn.played(end, text, ids, lps, reason, tr))
                active = [i for i in active if not episodes[i][2].done]
        finally:
            self.model.train(was_training)
        return [
            Rollout.from_turns(
                turns[k], example_id=episode_example_id(env.id, ep.seed), group=g, messages=ep.messages,
                images=ep.images, step=step, index=g * n + j,
                end_reason=episode_end_reason(env, ep), summary=dict(env.summary(ep)),
            )
            for k, (g, j, ep) in enumerate(episodes)
        ]


ACHIEVEMENT_PREFIX = "achievement/"


@dataclass
class EvalResult:
    """Greedy scores of one model on a held-out split (what ``eval.json`` holds per model)."""

    name: str  # "base", a checkpoint path, or a server URL
    env_id: str
    n: int  # prompts or episodes scored
    mean: float
    std: float
    per_seed: dict[str, float]  # example id (or episode seed) -> reward
    parts: dict[str, float]  # reward part -> mean
    achievements: dict[str, float] = field(default_factory=dict)  # name -> success rate
    turns_mean: float | None = None  # episodes only
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def eval_items(env: Environment | MultiTurnEnvironment, count: int, start: int = 0) -> list[Any]:
    """Held-out items ``start .. start + count - 1``: examples, or seeds of a game."""
    if isinstance(env, MultiTurnEnvironment):
        return list(env.eval_seeds(start + count))[start:]
    return list(env.eval_examples(start + count))[start:]


def summarize(name: str, env: Environment | MultiTurnEnvironment, rollouts: Sequence[Rollout],
              seconds: float = 0.0) -> EvalResult:
    """Mean, std, per-item rewards, per-part means and success rates of scored ``rollouts``."""
    rewards = [r.reward for r in rollouts]
    n = len(rewards)
    mean = sum(rewards) / n if n else float("nan")
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / n) if n else float("nan")

    def means(dicts: list[dict[str, float]]) -> dict[str, float]:
        keys = sorted({k for d in dicts for k in d})
        return {k: sum(d.get(k, 0.0) for d in dicts) / len(dicts) for k in keys}

    summary = means([r.summary for r in rollouts]) if any(r.summary for r in rollouts) else {}
    episodes = [r for r in rollouts if r.is_episode]
    return EvalResult(
        name=name, env_id=env.id, n=n, mean=mean, std=std,
        per_seed={r.example_id: r.reward for r in rollouts},
        parts=means([r.reward_parts for r in rollouts]) if n else {},
        achievements={k[len(ACHIEVEMENT_PREFIX):]: v for k, v in summary.items() if k.startswith(ACHIEVEMENT_PREFIX)},
        turns_mean=sum(len(r.turns) for r in episodes) / len(episodes) if episodes else None,
        seconds=seconds,
    )


def score_split(source: Any, env: Environment | MultiTurnEnvironment, *, count: int, start: int = 0,
                max_tokens: int, max_context: int | None = None, step: int = 0, name: str = "model") -> EvalResult:
    """Greedy scores of ``source`` on held-out items ``start .. start + count - 1`` of ``env``
    (one completion per prompt, one episode per seed)."""
    t0 = time.perf_counter()
    items = eval_items(env, count, start)
    if isinstance(env, MultiTurnEnvironment):
        rollouts = source.collect_episodes(env, items, 1, temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                           step=step, max_context=max_context)
    else:
        rollouts = source.collect(env, items, 1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, step=step)
    return summarize(name, env, rollouts, time.perf_counter() - t0)


def eval_model_source(cfg: Any, checkpoint: str | Path | None, out_dir: Path) -> str:
    """What a server must load to serve ``checkpoint`` of ``cfg``'s run (None: the config's model).

    A full checkpoint is a model directory already; a LoRA checkpoint holds only its adapter,
    so the config's model with the adapter merged in is written to ``out_dir`` (weights and
    processor) and served from there. Raises :class:`~backend.errors.ModelError` for a
    directory that is neither.
    """
    from backend import lora
    from backend.errors import ModelError

    if checkpoint is None:
        return str(cfg.model)
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise ModelError(f"checkpoint {ckpt}: no such directory")
    if (ckpt / "config.json").is_file():
        return str(ckpt)
    if not lora.has_adapter(ckpt):
        raise ModelError(f"checkpoint {ckpt}: neither a model (config.json) nor a LoRA adapter "
                         "(adapter_config.json); pass a checkpoints/<step> directory")
    from backend.models import load_model_and_processor

    model, processor = load_model_and_processor(cfg.model, dtype=cfg.trainer.args.dtype, device="cpu")
    merged = lora.merged_model(model, ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def eval_client_main(cfg: Any, server_url: str, *, count: int, start: int = 0, label: str = "model",
                     output: Path | None = None) -> int:
    """Score the model ``server_url`` serves on ``cfg``'s held-out split; print a summary line and
    write the :class:`EvalResult` as JSON to ``output`` (what ``vlmrl eval`` runs per model)."""
    from transformers import AutoProcessor

    from backend.envs import build_env
    from backend.models import resolve_model
    from backend.rollout import RolloutClient, wait_for_health

    args = cfg.trainer.args
    env = build_env(cfg.env.id, cfg.env.args)  # before anything slow: a bad [env] fails at once
    processor = AutoProcessor.from_pretrained(resolve_model(cfg.model))
    wait_for_health(server_url, timeout_s=cfg.inference.startup_timeout_s)
    kind = "episodes" if isinstance(env, MultiTurnEnvironment) else "prompts"
    print(f"eval {label}: {count} held-out {kind} of {env.id} (from #{start}), greedy, on {server_url}", flush=True)
    with RolloutClient(server_url, banned_ids=banned_token_ids(processor.tokenizer),
                       max_concurrent=args.max_concurrent, timeout_s=args.request_timeout_s) as client:
        res = score_split(client, env, count=count, start=start, max_tokens=max(args.max_tokens, 1),
                          max_context=cfg.inference.args.max_model_len, name=label)
    print(f"eval {label}: mean reward {res.mean:.3f} (std {res.std:.3f}) on {res.n} {kind} in {res.seconds:.1f}s",
          flush=True)
    if output is not None:
        from backend.rundir import write_json_atomic

        write_json_atomic(output, res.to_json(), sort_keys=False)  # per-seed scores in split order
    return 0
