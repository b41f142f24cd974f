"""Weight sync from a sharded trainer (2 ranks, FSDP2 over gloo) against one rank, same bytes.

``vlmrl serve`` (hf engine, the tiny Qwen3-VL) runs in a subprocess; in alternating rounds
``tests/dist_trainer.py`` trains one step on one rank, or on two under torchrun, then pushes
its weights ``--repeats`` times (WeightSyncClient.sync: on two ranks every bucket's full
tensors are gathered from both shards while rank 0 sends them). Prints the median and
spread of the sync time for each and the ratio two/one, with the load average around it.

    python benchmarks/sharded_sync.py --rounds 3 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.models import resolve_model  # noqa: E402
from backend.net import free_port  # noqa: E402
from tests.serverproc import ServerProc, write_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="syncs per round")
    a = ap.parse_args()
    model = resolve_model("builtin:tiny-qwen3-vl")
    load_before = os.getloadavg()
    times: dict[int, list[float]] = {1: [], 2: []}
    n_bytes = 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        server = ServerProc(write_config(tmp / "cfg.toml", port=port, model=model), port, tmp / "server.log", "tok")
        server.wait_healthy()
        try:
            for r in range(a.rounds):
                for ranks in (1, 2):
                    out = tmp / f"r{r}-{ranks}"
                    script = [str(ROOT / "tests" / "dist_trainer.py"), model, str(out), "--sync", server.url, "tok",
                              str(free_port()), "--sync-repeats", str(a.repeats)]
                    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                              if ranks > 1 else [sys.executable])
                    subprocess.run([*launch, *script], check=True, capture_output=True, cwd=ROOT)
                    res = torch.load(out / "result.pt", weights_only=True)
                    got = res["sync_s"][1:]  # the first one also joins the group
                    n_bytes = sum(t.numel() * t.element_size() for t in res["weights"].values())
                    times[ranks].extend(got)
                    print(f"round {r + 1}, {ranks} rank(s): " + " ".join(f"{t * 1000:.0f}" for t in got) + " ms",
                          flush=True)
        finally:
            server.stop()
    load_after = os.getloadavg()

    def fig(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:.1f} ms (min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f})"

    print(f"\n{n_bytes / 1e6:.1f} MB of weights, 256 KiB buckets, gloo, {a.rounds} rounds x {a.repeats - 1} syncs")
    print(f"1 rank:  {fig(times[1])}")
    print(f"2 ranks: {fig(times[2])}")
    print(f"2 ranks / 1 rank (medians): {statistics.median(times[2]) / statistics.median(times[1]):.2f}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
