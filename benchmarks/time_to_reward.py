"""Time to reward: how long the default job takes to learn, from a healthy server on.

Runs ``vlmrl run CONFIG`` (the real supervisor, server and trainer) ``--rounds`` times with
seeds 0, 1, ..., reads each run's ``run.json`` (when the server became healthy) and
``metrics.jsonl`` (each step's reward and wall time), and prints per round: the first step
whose trailing ``--window``-step mean reward reaches ``--target``, the wall seconds from
the server's health to that step, and the median s/step. Then the median and spread over
rounds. The issue's target: reward >= 0.9 (10-step mean) within 30 s.

    python benchmarks/time_to_reward.py                      # configs/colors-tiny.toml, 3 rounds
    python benchmarks/time_to_reward.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend import records as rec  # noqa: E402
from backend.rundir import RunDirectory, read_jsonl  # noqa: E402


def first_reaching(metrics: list[dict[str, Any]], target: float, window: int) -> dict[str, Any] | None:
    """The first metrics line whose trailing ``window``-step mean reward is >= ``target``."""
    rewards: list[float] = []
    for m in metrics:
        rewards.append(float(m.get(rec.REWARD_MEAN) or 0.0))
        if len(rewards) >= window and sum(rewards[-window:]) / window >= target:
            return m
    return None


def one_round(config: Path, seed: int, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    name = f"ttr-{seed}"
    cmd = [sys.executable, "-m", "vlmrl_tui.cli", "run", str(config), "--name", name, "--output-dir", str(workdir),
           f"trainer.args.seed={seed}", f"trainer.args.max_steps={a.max_steps}",
           f"trainer.args.save_every={a.max_steps}", f"inference.port={a.port + seed}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run_dir = RunDirectory(workdir / name)
    if proc.returncode != 0:
        raise SystemExit(f"round {seed}: vlmrl run exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run = rec.RunInfo.read(run_dir.run_json)
    server = run.processes.get(rec.PROC_SERVER) if run is not None else None
    healthy = server.healthy_at if server is not None else None
    if healthy is None:
        raise SystemExit(f"round {seed}: {rec.RUN_FILE} has no time at which the server became healthy")
    metrics = list(read_jsonl(run_dir.metrics))
    hit = first_reaching(metrics, a.target, a.window)
    step_s = statistics.median(float(m[rec.STEP_S]) for m in metrics[3:])
    phases = {k: statistics.median(float(m.get(k) or 0.0) for m in metrics[3:]) for k in (*rec.PHASES, *rec.TRAIN_PHASES)}
    out: dict[str, Any] = {"seed": seed, "steps_run": len(metrics), "s_per_step": step_s, "phases": phases,
                           "server_healthy_after_s": healthy - t0, "reached": hit is not None,
                           "first_step_s": float(metrics[0][rec.TIME]) - healthy}
    if hit is not None:
        out.update(step=int(hit[rec.STEP]), seconds=float(hit[rec.TIME]) - healthy)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "colors-tiny.toml")
    ap.add_argument("--rounds", type=int, default=3, help="runs, with seeds 0 .. rounds-1")
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--port", type=int, default=18400, help="server port of round 0 (+ seed for the others)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    print(f"{a.config.name}: {a.rounds} rounds, target {a.window}-step mean reward >= {a.target}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="vlmrl-ttr-") as tmp:
        for seed in range(a.rounds):
            r = one_round(a.config, seed, a, Path(tmp))
            results.append(r)
            where = (f"step {r['step']} after {r['seconds']:.1f} s" if r["reached"]
                     else f"not reached in {r['steps_run']} steps")
            print(f"seed {seed}: {where} of a healthy server (first step done after {r['first_step_s']:.1f} s); "
                  f"{r['s_per_step']:.3f} s/step ({', '.join(f'{k} {v:.3f}' for k, v in r['phases'].items())}); "
                  f"server healthy {r['server_healthy_after_s']:.1f} s after launch", flush=True)
    reached = [r["seconds"] for r in results if r["reached"]]
    if reached:
        print(f"time to reward: median {statistics.median(reached):.1f} s, range {min(reached):.1f}-{max(reached):.1f} s "
              f"({len(reached)}/{len(results)} rounds reached it); median "
              f"{statistics.median(r['s_per_step'] for r in results):.3f} s/step")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0 if len(reached) == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
