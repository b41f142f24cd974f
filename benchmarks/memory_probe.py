"""Peak GPU memory of one trainer step, stage by stage, against backend/memory.py's estimate.

A model is built from its config with random weights (no download: the default is the
Qwen3-VL-8B-Instruct config kept in backend/memory.py), then one step runs as the trainer
runs it, with the trainer's own pieces: precision (backend/precision.py), optimizer
(backend/optim.py), gradient checkpointing (backend/models.py) and the streamed
checkpoint writer (backend/checkpoint.py). Inputs are random text tokens, so the estimate
printed beside each peak is the one for the same text-only shape.

    python benchmarks/memory_probe.py                              # 8B, settings of configs/qwen3-vl-8b-colors.toml
    python benchmarks/memory_probe.py --seq-len 8192 --micro-batch 1
    python benchmarks/memory_probe.py --model builtin:tiny-qwen3-vl --device cpu   # exercises the code on CPU

Prints one line per stage (``weights``, ``forward``, ``backward``, ``optimizer``,
``checkpoint``) and exits 1 if the measured peak exceeds the estimate by more than 10%.
On CPU there is no peak to read: the stages run and the estimate is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.config import load_config  # noqa: E402
from backend.memory import GiB, estimate_trainer_memory, hf_config, model_shape, qwen3_vl_8b_config  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "qwen3-vl-8b-colors.toml"
TOLERANCE = 1.10  # measured peak may exceed the estimate by this factor before the probe fails


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.1f} GiB"


class TooSmall(Exception):
    """The GPU has less memory than the estimate: nothing to measure."""


def probe(model_name: str | None, config_path: Path, device_name: str, *, seq_len: int | None,
          micro_batch: int | None, save: bool, skip_if_small: bool = False,
          out: Callable[[str], None] = print) -> bool:
    """Run the stages; returns False when a measured peak is over the estimate's tolerance."""
    from transformers import AutoModelForImageTextToText

    from backend.checkpoint import save_weights
    from backend.models import enable_gradient_checkpointing, layers_training
    from backend.optim import make_optimizer
    from backend.precision import precision_of

    cfg = load_config(config_path)
    args = cfg.trainer.args
    hf_cfg = qwen3_vl_8b_config() if model_name is None else hf_config(model_name)
    shape = model_shape(hf_cfg)
    B = micro_batch or args.micro_batch_size
    L = seq_len or cfg.inference.args.max_model_len
    T = args.max_tokens + 1  # logits kept: the completion, as backend/logprobs.py asks for
    est = estimate_trainer_memory(
        shape, dtype=args.dtype, low_precision_update=args.low_precision_update, micro_batch_size=B, seq_len=L,
        logit_positions=T, image_tokens=0, gradient_checkpointing=args.gradient_checkpointing,
    )
    device = torch.device(device_name)
    prec = precision_of(args.dtype, args.low_precision_update)
    count = f"{shape.params / 1e9:.2f} B" if shape.params >= 1e9 else f"{shape.params / 1e6:.2f} M"
    out(f"model {model_name or 'Qwen3-VL-8B-Instruct (config)'}: {count} params; "
        f"{prec.describe()}; micro-batch {B} x {L} tokens; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; device {device}")
    out(f"estimate: {est.describe()}")
    if skip_if_small and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if total < est.total:
            raise TooSmall(f"{torch.cuda.get_device_name(device)} has {_gib(total)}, the estimate is {_gib(est.total)}")
    ok = True

    def stage(name: str, t0: float, estimate: int) -> None:
        nonlocal ok
        peak = _peak(device)
        verdict = ""
        if peak is not None:
            over = peak > TOLERANCE * estimate
            ok = ok and not over
            verdict = "  OVER the estimate" if over else "  within the estimate"
        out(f"{name:<11} peak {_gib(peak):>10}   estimate {_gib(estimate):>10}   {time.perf_counter() - t0:6.1f}s"
            f"{verdict}")

    _reset(device)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(hf_cfg, dtype=prec.param_dtype)
    model.eval()
    layers = enable_gradient_checkpointing(model) if args.gradient_checkpointing else []
    static_weights = est.static - est.grads - est.optimizer_state
    stage("weights", t0, static_weights + est.overhead)

    optimizer, _ = make_optimizer([p for p in model.parameters() if p.requires_grad], args, prec)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, min(shape.vocab, 150_000), (B, L), generator=gen).to(device)
    def forward() -> torch.Tensor:
        with prec.forward_context(device), layers_training(layers):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=T,
                           use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, L - T + 1:].unsqueeze(-1)).squeeze(-1)
        return -logp.mean()

    # a first step creates the optimizer state; the stages measure the second, as every later step runs
    t0 = time.perf_counter()
    forward().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out(f"warm-up step (creates the AdamW state) in {time.perf_counter() - t0:.1f}s")
    _reset(device)
    t0 = time.perf_counter()
    loss = forward()
    stage("forward", t0, est.static - est.grads + est.overhead + est.activations)
    _reset(device)
    t0 = time.perf_counter()
    loss.backward()
    del loss
    stage("backward", t0, est.total)
    _reset(device)
    t0 = time.perf_counter()
    optimizer.step()
    stage("optimizer", t0, est.static + est.overhead + est.optimizer_step)
    optimizer.zero_grad(set_to_none=True)
    if save:
        _reset(device)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="vlmrl-probe-") as d:
            files = save_weights(model, Path(d))
            size = sum(f.stat().st_size for f in files)
        stage("checkpoint", t0, est.static - est.grads + est.overhead)
        out(f"checkpoint: {len(files)} file(s), {size / GiB:.1f} GiB written one tensor at a time")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="vlmrl config whose [trainer.args] to use")
    ap.add_argument("--model", help="a model name/path/builtin instead of the 8B config")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: inference.args.max_model_len)")
    ap.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: the config's)")
    ap.add_argument("--no-save", action="store_true", help="skip the checkpoint stage")
    ap.add_argument("--skip-if-small", action="store_true",
                    help="exit 3 without measuring when the GPU has less memory than the estimate")
    a = ap.parse_args(argv)
    try:
        ok = probe(a.model, a.config, a.device, seq_len=a.seq_len, micro_batch=a.micro_batch, save=not a.no_save,
                   skip_if_small=a.skip_if_small)
    except TooSmall as e:
        print(f"SKIP: {e}")
        return 3
    except torch.cuda.OutOfMemoryError as e:
        print(f"FAIL: out of GPU memory: {str(e).splitlines()[0]}")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
