"""The trainer on one rank or several, for tests/test_distributed.py (run under torchrun or alone).

    python tests/dist_trainer.py MODEL_DIR OUT_DIR [--steps N] [--micro N] [--uniform-first-group]
                                 [--save] [--resume CKPT] [--sync URL TOKEN PORT] [--sync-repeats N]

Trains ``--steps`` optimizer steps on fixed rollouts of the colour task (the same on every
run, so one rank and two ranks see the same batch), then: with ``--save`` writes a
checkpoint into OUT_DIR/run, with ``--sync`` pushes the weights to a running server
(``--sync-repeats`` times, each timed). Rank 0 writes OUT_DIR/result.pt: the full weights,
the metrics of every step and the sync times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend import distributed as D  # noqa: E402
from backend.adapters import adapter_for  # noqa: E402
from backend.models import load_model_and_processor  # noqa: E402
from backend.rollout_types import Rollout  # noqa: E402
from backend.trainer import MultimodalGRPOTrainer  # noqa: E402
from environments import make_env  # noqa: E402
from tests.tinytrainer import tiny_cfg  # noqa: E402

WORDS = ["red", "green", "blue", "yellow", "purple", "orange"]


def fixed_rollouts(processor: Any, step: int, n_prompts: int = 3, group: int = 4,
                   uniform_first: bool = False) -> list[Rollout]:
    """``n_prompts`` colour prompts x ``group`` completions, rewards 1 for the right colour
    (``uniform_first``: the first group all right, so it has no gradient)."""
    env = make_env("colors", {"num_colors": 5, "image_size": 32})
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out: list[Rollout] = []
    for g, ex in enumerate(env.train_examples(step, n_prompts)):
        for j in range(group):
            word = WORDS[(g + j + step) % len(WORDS)] if j % 2 and not (uniform_first and g == 0) else ex.answer
            ids = tok(word, add_special_tokens=False)["input_ids"] + [end]
            lps = [-0.5 - 0.1 * k for k in range(len(ids))]  # behaviour logprobs: fixed, off-policy
            out.append(Rollout(example_id=ex.id, group=g, messages=ex.messages, images=ex.images, completion=word,
                               completion_ids=ids, behavior_logprobs=lps, reward=float(word == ex.answer),
                               answer=ex.answer, step=step, index=g * group + j))
    return out


class FixedSource:
    """The step's rollouts are :func:`fixed_rollouts` (a remote-like source: it does not sample
    with the trainer's model, which a sharded trainer cannot do on rank 0 alone)."""

    shares_model = False

    def __init__(self, processor: Any, uniform_first: bool) -> None:
        self.processor = processor
        self.uniform_first = uniform_first

    def collect(self, env: Any, examples: Any, n: int, **kw: Any) -> list[Rollout]:
        return fixed_rollouts(self.processor, kw["step"], uniform_first=self.uniform_first)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--resume", type=Path, default=None)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--uniform-first-group", action="store_true")
    ap.add_argument("--sync", nargs=3, default=None, metavar=("URL", "TOKEN", "PORT"))
    ap.add_argument("--sync-repeats", type=int, default=1, help="push the weights this many times (timed)")
    ap.add_argument("--server-ranks", type=int, default=1, help="the server's ranks (vLLM TP x DP)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = D.init_from_env("cpu", 120)
    model, processor = load_model_and_processor(a.model)
    cfg = tiny_cfg(batch_size=12, micro_batch_size=a.micro, rollouts_per_step=4, max_steps=a.steps + 10,
                   learning_rate=1e-3, mask_ratio_low=0.01, mask_ratio_high=100.0)
    sync = None
    if a.sync is not None and (info is None or info.is_main):
        from backend.weight_sync import WeightSyncClient

        url, token, port = a.sync
        sync = WeightSyncClient(url, token, backend="gloo", host="127.0.0.1", port=int(port), bucket_bytes=1 << 18,
                                server_ranks=a.server_ranks)
    source = FixedSource(processor, a.uniform_first_group)
    tr = MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor), cfg,
                               env=make_env("colors", {}), run_dir=a.out / "run", log=lambda s: None, dist=info,
                               weight_sync=sync, rollout_source=source)
    if a.resume is not None:
        tr.load_checkpoint(a.resume)
    history = []
    sync_s: list[float] = []
    if info is None or info.is_main:
        if sync is not None:
            sync.init()
        first = tr.step + 1
        for step in range(first, first + a.steps):
            history.append(tr.train_step(source.collect(tr.env, [], 0, step=step)))
        if a.save:
            tr.save_checkpoint()
        sync_s = [tr.sync_weights() for _ in range(a.sync_repeats)] if sync is not None else []
        tr.stop_followers()
    else:
        tr.follow()
    full = {n: D.full_tensor(p.detach()).clone() for n, p in tr.model.named_parameters()}
    if info is None or info.is_main:
        a.out.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": full, "history": history, "step": tr.step, "sync_s": sync_s}, a.out / "result.pt")
    if sync is not None:
        sync.close()
    D.close(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
