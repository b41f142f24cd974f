"""In-process generation: held-out greedy evaluation, and sampled rollouts without a server.

``vlmrl eval`` scores a model (or a checkpoint) greedily on the environment's held-out
split. :class:`InProcessRolloutSource` samples rollouts with ``model.generate`` from the
same processed distribution as the server (backend/sampling.py) and has the rollout
client's ``collect`` signature, so tests and benchmarks can drive the trainer without an
inference server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from backend.rollout_types import Rollout
from backend.sampling import banned_token_ids, bias_vector, end_of_turn_ids, logit_bias_for, processed_logprobs
from environments.base import Environment, Example


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
                    banned_ids=self.banned_ids,
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


def greedy_accuracy(
    model: Any, processor: Any, env: Environment, n: int, *, max_tokens: int = 8, batch_size: int = 32,
    banned_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Mean reward of greedy completions on ``n`` held-out examples, and a few samples."""
    examples = env.eval_examples(n)
    rewards: list[float] = []
    samples: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            outs = generate(model, processor, [(e.messages, e.images) for e in chunk], max_tokens=max_tokens,
                            greedy=True, banned_ids=banned_ids)
            for ex, (ids, _, _) in zip(chunk, outs):
                text = processor.tokenizer.decode(ids, skip_special_tokens=True)
                rewards.append(env.score(ex, text).reward)
                if len(samples) < 8:
                    samples.append({"id": ex.id, "answer": ex.answer, "completion": text})
    finally:
        model.train(was_training)
    return {"n": len(rewards), "accuracy": sum(rewards) / max(len(rewards), 1), "samples": samples}


def eval_main(cfg: Any, checkpoint: Path | None = None, n: int = 64) -> int:
    """``vlmrl eval``: greedy held-out accuracy of the config's model or of a checkpoint."""
    from backend.models import load_model_and_processor
    from environments import make_env

    args = cfg.trainer.args
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    source = str(checkpoint) if checkpoint is not None else cfg.model
    if checkpoint is not None and not (Path(checkpoint) / "config.json").is_file():
        from backend.errors import ModelError

        raise ModelError(f"checkpoint {checkpoint}: no config.json (pass a checkpoints/<step> directory)")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    model, processor = load_model_and_processor(source, dtype=args.dtype, device=device)
    env = make_env(cfg.env.id, cfg.env.args)
    t0 = time.perf_counter()
    res = greedy_accuracy(model, processor, env, n, max_tokens=max(args.max_tokens, 1))
    dt = time.perf_counter() - t0
    for s in res["samples"]:
        print(f"  {s['id']}: answer={s['answer']!r} completion={s['completion']!r}")
    print(f"eval {cfg.env.id}: accuracy {res['accuracy']:.3f} on {res['n']} held-out prompts "
          f"(greedy, {source}, {dt:.1f}s)", flush=True)
    print(json.dumps({"accuracy": res["accuracy"], "n": res["n"], "model": source}), flush=True)
    return 0
