"""Run under torchrun: ``backend.distributed.full_tensors`` equals ``DTensor.full_tensor`` for
tensors FSDP2-style sharded on dim 0 (uneven rows, ranks with none, no rows at all, several
dtypes), and for plain tensors, whatever the group size in bytes. Prints ``ok`` on rank 0."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

from backend import distributed as D  # noqa: E402


def main() -> int:
    info = D.init_from_env("cpu", 60)
    assert info is not None, "run under torchrun with 2 or more ranks"
    mesh = init_device_mesh("cpu", (info.world,))
    torch.manual_seed(0)
    shapes = [(7,), (1,), (5, 3), (2, 4, 3), (560, 128), (3, 1), (0, 3)]
    full = [torch.randn(s) for s in shapes] + [torch.randn(4, 4).to(torch.bfloat16)]
    mixed = [distribute_tensor(t, mesh, [Shard(0)]) for t in full] + [torch.randn(2)]
    ref = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in mixed]
    for max_bytes in (1, 64, 1 << 20):  # one tensor per gather, a few, all at once
        got = D.full_tensors(mixed, max_bytes=max_bytes)
        bad = [i for i, (a, b) in enumerate(zip(got, ref)) if a.shape != b.shape or not torch.equal(a, b)]
        assert not bad and len(got) == len(ref), (max_bytes, bad)
    if info.is_main:
        print("ok", flush=True)
    D.close(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
