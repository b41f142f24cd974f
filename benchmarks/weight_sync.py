"""Weight-sync benchmark: a full sync through the server vs a raw broadcast of the same bytes.

For each parameter set (the tiny Qwen3-VL, and a synthetic ~1 GB Qwen3-VL built from the
tiny one's config with a larger language model), in one run:

* ``server``: ``vlmrl serve`` runs in a subprocess with that model; the trainer side (this
  process) times ``WeightSyncClient.sync`` -- the whole sequence: start, one HTTP call plus
  one gloo broadcast per flat bucket, the server putting every tensor into its model,
  finish. Twice: with the trainer's parameters as loaded (each bucket is packed into a
  buffer first) and with them flattened by ``flatten_parameters`` (buckets go on the
  wire straight from the parameters). The server always keeps its parameters flat, so
  buckets land in place.
* ``raw``: a bare peer subprocess joins a fresh gloo group and receives into one buffer
  of the parameter set's size; this process broadcasts the very same bucket bytes
  (pre-packed) back to back. Nothing else.

Server syncs and raw rounds alternate (after one warm-up of each) so both see the same
machine load. Prints both (median of ``--repeats``) and the ratio server/raw (median of
per-round ratios; target <= 1.2).

    python benchmarks/weight_sync.py                 # tiny + 1 GB, 64 MB buckets
    python benchmarks/weight_sync.py --sizes tiny --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend import contract  # noqa: E402
from backend.net import free_port  # noqa: E402
from backend.weight_sync import (  # noqa: E402
    WeightSyncClient,
    broadcast,
    flatten_parameters,
    host_store,
    open_group,
    pack_bucket,
    plan_buckets,
    spec_of,
)

TOKEN = "bench-token"

RAW_PEER = textwrap.dedent("""
    import json, sys, time, torch
    from backend.weight_sync import join_store, open_group, broadcast
    port, sizes, rounds = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    store = join_store("127.0.0.1", port, 2, 120)
    pg = open_group("gloo", store, 1, 2, 120)
    broadcast(pg, torch.zeros(1, dtype=torch.int64)).wait()
    dest = torch.empty(sum(sizes), dtype=torch.uint8)  # like a model: every bucket has its own place
    for _ in range(rounds):
        off = 0
        for n in sizes:
            broadcast(pg, dest[off:off + n]).wait()
            off += n
    broadcast(pg, torch.zeros(1, dtype=torch.int64)).wait()  # done marker
""")


def build_big_model(tiny_dir: Path, out: Path, layers: int, hidden: int, inter: int) -> Path:
    """A Qwen3-VL with the tiny model's tokenizer/processor and a large random language model."""
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(tiny_dir)
    tc = cfg.text_config
    tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers = hidden, inter, layers
    tc.num_attention_heads = hidden // tc.head_dim
    tc.num_key_value_heads = max(1, tc.num_attention_heads // 4)
    cfg.vision_config.out_hidden_size = hidden
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tiny_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, tmp / f.name)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def start_server(model: str, workdir: Path, threads: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    import tomli_w

    port = free_port()
    cfg = {
        "model": model,
        "env": {"id": "colors"},
        "inference": {"engine": "hf", "gpus": 0, "host": "127.0.0.1", "port": port,
                      "args": {"max_model_len": 512, "limit_mm_per_prompt": {"image": 1}, "dtype": "float32"}},
        "trainer": {"args": {"torch_threads": threads, "batch_size": 8, "micro_batch_size": 8}},
    }
    path = workdir / f"server-{port}.toml"
    path.write_text(tomli_w.dumps(cfg))
    log = workdir / f"server-{port}.log"
    env = {**os.environ, contract.ENV_RUN_TOKEN: TOKEN, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", "serve", str(path)], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    from backend.rollout import wait_for_health

    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, 600, proc=proc)
    except Exception:
        stop(proc)
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    return proc, url, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class RawPeer:
    """A bare gloo peer in a subprocess that receives ``rounds`` x the bucket sizes."""

    def __init__(self, sizes: list[int], rounds: int) -> None:
        self.store = host_store("127.0.0.1", 0, 2, 120)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RAW_PEER, str(self.store.port), json.dumps(sizes), str(rounds)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.pg = open_group("gloo", self.store, 0, 2, 120)
        broadcast(self.pg, torch.zeros(1, dtype=torch.int64)).wait()

    def run(self, flats: list[torch.Tensor]) -> float:
        t0 = time.perf_counter()
        for f in flats:
            broadcast(self.pg, f).wait()
        return time.perf_counter() - t0

    def close(self) -> None:
        broadcast(self.pg, torch.zeros(1, dtype=torch.int64)).wait()
        self.proc.wait(timeout=60)


def bench(label: str, model_str: str, model: torch.nn.Module, args: argparse.Namespace,
          workdir: Path) -> dict[str, Any]:
    """Alternate server syncs (trainer packing; trainer with flat parameters) and raw broadcasts."""
    packed = [(n, p.detach().clone()) for n, p in model.named_parameters()]  # separate storages: packed
    flatten_parameters(model)
    flat = [(n, p.detach()) for n, p in model.named_parameters()]  # one storage: sent without packing
    nbytes = sum(t.numel() * t.element_size() for _, t in flat)
    bucket_bytes = args.bucket_mb << 20
    flats = []
    for items in plan_buckets(packed, bucket_bytes):
        spec = spec_of(items)
        flats.append(pack_bucket(items, torch.empty(spec.nbytes, dtype=torch.uint8)))
    proc, url, _log = start_server(model_str, workdir, args.server_threads)
    runs: dict[str, list[float]] = {"packed": [], "flat": [], "raw": []}
    buckets = 0
    try:
        with WeightSyncClient(url, TOKEN, backend="gloo", bucket_bytes=bucket_bytes, timeout_s=600) as client:
            raw = RawPeer([f.numel() for f in flats], args.repeats + 1)
            try:
                steps = {
                    "packed": lambda v: client.sync(packed, version=v).seconds,
                    "flat": lambda v: client.sync(flat, version=v).seconds,
                    "raw": lambda v: raw.run(flats),
                }
                for key in steps:  # warm-up: buffers faulted in on every side
                    steps[key](0)
                buckets = len(flats)
                order = list(steps)
                for r in range(args.repeats):
                    for key in order[r % 3:] + order[: r % 3]:  # rotate who goes first
                        runs[key].append(steps[key](r + 1))
            finally:
                raw.close()
    finally:
        stop(proc)
    med = {k: statistics.median(v) for k, v in runs.items()}
    # Each round ran its three measurements back to back: the median of per-round ratios
    # cancels most of the drift in machine load between rounds.
    paired = {k: statistics.median(a / b for a, b in zip(runs[k], runs["raw"])) for k in ("packed", "flat")}
    res = {
        "set": label, "tensors": len(flat), "bytes": nbytes, "buckets": buckets, "bucket_mb": args.bucket_mb,
        "server_packed_s": med["packed"], "server_flat_s": med["flat"], "raw_s": med["raw"],
        "ratio_packed": paired["packed"], "ratio_flat": paired["flat"], "runs_s": runs,
    }
    gib = nbytes / 2**30
    print(f"{label:>5}: {nbytes / 1e6:8.1f} MB, {buckets:2d} bucket(s) of <= {args.bucket_mb} MB | raw broadcast "
          f"{med['raw']:.3f} s ({gib / med['raw']:.2f} GiB/s) | server sync: trainer packs {med['packed']:.3f} s "
          f"(ratio {res['ratio_packed']:.2f}), trainer flat {med['flat']:.3f} s (ratio {res['ratio_flat']:.2f})",
          flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,1g", help="comma list of: tiny, 1g")
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--big-layers", type=int, default=17, help="layers of the synthetic model (17 -> ~1.03 GB)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vlmrl-bench-weight-sync")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from backend.models import load_model_and_processor, resolve_model

    tiny = Path(resolve_model("builtin:tiny-qwen3-vl"))
    results = []
    print(f"weight sync, gloo over loopback, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if size == "tiny":
            model_str, path = "builtin:tiny-qwen3-vl", tiny
        elif size == "1g":
            t0 = time.monotonic()
            path = build_big_model(tiny, args.workdir / f"qwen3-vl-synthetic-{args.big_layers}l", args.big_layers,
                                   1024, 4096)
            model_str = str(path)
            print(f"synthetic model ready in {time.monotonic() - t0:.1f}s: {path}", flush=True)
        else:
            raise SystemExit(f"unknown size {size!r}")
        model, _ = load_model_and_processor(str(path), dtype="float32", device="cpu")
        results.append(bench(size, model_str, model, args, args.workdir))
        del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on these cores makes timings noisy)")
    for key in ("ratio_packed", "ratio_flat"):
        print(f"worst {key} (server/raw): {max(r[key] for r in results):.2f} (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
