"""Training step time and peak memory, full fine-tuning against LoRA, on the same rollouts.

Each mode runs in its own subprocess (so peak RSS is its own): the model is loaded, the
trainer built from the shipped colour configs' ``[trainer.args]`` (``configs/colors-tiny.toml``
and ``configs/colors-tiny-lora.toml``), one step's rollouts sampled once in-process, then
``--steps`` optimizer steps timed on them (``train_step``: batch build, forward, backward,
optimizer). Modes alternate over ``--rounds``; prints the median and spread of the step
time, the peak RSS, trainable parameters and the ratio LoRA/full, with the load average
before and after.

    python benchmarks/lora_step.py                        # the tiny Qwen3-VL, 3 rounds x 10 steps
    python benchmarks/lora_step.py --model /path/to/model --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"full": ROOT / "configs" / "colors-tiny.toml", "lora": ROOT / "configs" / "colors-tiny-lora.toml"}


def child(mode: str, model: str, steps: int) -> None:
    """One mode in this process: print a JSON line of its figures."""
    import torch

    from backend.adapters import adapter_for
    from backend.config import load_config
    from backend.evaluate import InProcessRolloutSource
    from backend.models import load_model_and_processor
    from backend.trainer import MultimodalGRPOTrainer
    from environments import make_env

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(CONFIGS[mode], [f"model={model}"])
    args = cfg.trainer.args
    m, processor = load_model_and_processor(cfg.model)
    adapter = adapter_for(m.config, processor=processor, max_length=cfg.inference.args.max_model_len)
    env = make_env(cfg.env.id, cfg.env.args)
    tr = MultimodalGRPOTrainer(m, processor, adapter, args, env=env, log=lambda s: None)
    source = InProcessRolloutSource(tr.model, processor)
    rollouts = source.collect(env, env.train_examples(1, args.prompts_per_step), args.rollouts_per_step,
                              temperature=args.temperature, max_tokens=args.max_tokens, step=1, seed=0)
    for r in rollouts[::2]:  # a batch with both signs of advantage, so every step trains
        r.reward = 1.0 - r.reward
    tr.train_step(rollouts)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.train_step(rollouts)
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in tr.params)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "step_s": statistics.median(times), "peak_rss_mb": peak_mb,
                      "trainable": trainable, "sequences": len(rollouts)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny-qwen3-vl")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model, a.steps)
        return 0
    load_before = os.getloadavg()
    res: dict[str, list[dict]] = {m: [] for m in CONFIGS}
    for r in range(a.rounds):
        for mode in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", a.model, "--steps",
                                  str(a.steps)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            d = json.loads(out.stdout.strip().splitlines()[-1])
            res[mode].append(d)
            print(f"round {r + 1} {mode}: {d['step_s'] * 1000:.1f} ms/step, peak RSS {d['peak_rss_mb']:.0f} MB",
                  flush=True)
    load_after = os.getloadavg()

    def fig(xs: list[float], fmt: str) -> str:
        return f"{format(statistics.median(xs), fmt)} (min {format(min(xs), fmt)}, max {format(max(xs), fmt)})"

    print(f"\n{res['full'][0]['sequences']} sequences per step, {a.steps} steps x {a.rounds} rounds, 1 thread")
    for mode in CONFIGS:
        rows = res[mode]
        print(f"{mode:5s}: {fig([d['step_s'] * 1000 for d in rows], '.1f')} ms/step, peak RSS "
              f"{fig([d['peak_rss_mb'] for d in rows], '.0f')} MB, {rows[0]['trainable']:,} trainable parameters")
    ratio = [lo["step_s"] / fu["step_s"] for lo, fu in zip(res["lora"], res["full"])]
    print(f"lora/full step time: {fig(ratio, '.2f')}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
