"""A trainer over several ranks: torchrun's environment, FSDP2 sharding, rank 0 in charge.

``[trainer] processes = N`` (N > 1) starts the trainer under ``torch.distributed.run``. Every
rank loads the model and shards it with FSDP2 (``fully_shard`` on each decoder layer and
vision block, then the root); NCCL on GPU, gloo on CPU.

Rank 0 is the only rank that talks to the outside world: it collects the step's rollouts
from the server, writes the run directory and owns the weight-sync group. The other ranks
*follow*: rank 0 broadcasts each collective thing to do (:class:`Command`: train on these
rollouts, push the weights, save a checkpoint, stop) and every rank does it together, so
the ranks can never disagree on the order of collectives, even when rank 0 has to re-join a
restarted server in the middle of a step. Why rank 0 collects (rather than each rank its
share): one client keeps the server's batching and the restart handling in one place, and
shipping a step's rollouts (token ids and PNG-sized images) costs little next to sampling
them. Each rank then trains on every ``world``-th rollout; the loss is normalised by the
global token (or sequence) count and scaled by N (FSDP averages gradients over ranks), so
N ranks make the update one rank makes on the same batch.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

#: what rank 0 asks the others to do
CMD_STEP = "step"  # payload: the step's rollouts (every rank trains on its share)
CMD_PUSH = "push"  # payload: None (every rank gathers the full weights bucket by bucket)
CMD_SAVE = "save"  # payload: None (a sharded checkpoint, every rank writes its shard)
CMD_STOP = "stop"  # payload: None


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the trainer's ranks."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Command:
    """One collective thing to do, as rank 0 decided it."""

    kind: str
    payload: Any = None


def env_world() -> int:
    """The world size torchrun set (1 when not under torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def init_from_env(device_type: str, timeout_s: float) -> DistInfo | None:
    """Join the trainer's process group when torchrun started several ranks (None otherwise)."""
    world = env_world()
    if world <= 1:
        return None
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def shard_units(model: Any) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one, innermost first: transformers' checkpointable
    layers (decoder layers, vision blocks), whose parameters are then gathered one layer at
    a time, and the vision tower (its own parameters, e.g. the patch embedding)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from backend.lora import vision_tower

    units = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    tower = vision_tower(model)
    return units + ([tower] if tower is not None else [])


def shard_model(model: Any, info: DistInfo, *, param_dtype: torch.dtype | None = None,
                cpu_offload: bool = False) -> Any:
    """Shard ``model`` in place with FSDP2 over all ranks (gradients are averaged over ranks:
    the step scales each rank's loss by the world size, see :data:`loss_scale`).

    ``param_dtype``: the dtype FSDP gathers parameters in for compute (bf16 mixed precision
    on GPU; reductions stay float32). ``cpu_offload``: parameters, gradients and optimizer
    state live on the CPU between uses.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if info.backend == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (info.world,))
    kw: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for unit in shard_units(model):
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return model


def loss_scale(info: DistInfo | None) -> float:
    """What each rank's loss is multiplied by: its share of the global sum (global denominator)
    times the world size, so FSDP's gradient average is the gradient of the sum. (A divide
    factor of 1 would say it directly, but gloo cannot reduce with PREMUL_SUM.)"""
    return float(info.world) if info is not None else 1.0


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def broadcast_command(cmd: Command | None, info: DistInfo) -> Command:
    """Rank 0 sends ``cmd``; every rank returns it."""
    box = [cmd if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    out = box[0]
    assert isinstance(out, Command)
    return out


def share(items: Sequence[Any], info: DistInfo | None) -> list[Any]:
    """This rank's share of ``items``: every ``world``-th one, from its rank on."""
    return list(items) if info is None else list(items[info.rank :: info.world])


def all_sum(values: Sequence[float], info: DistInfo | None) -> list[float]:
    """Element-wise sums over ranks (``values`` itself with one rank)."""
    if info is None:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_max(value: int, info: DistInfo | None) -> int:
    if info is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_min_max(lo: float, hi: float, info: DistInfo | None) -> tuple[float, float]:
    """(min over ranks of ``lo``, max over ranks of ``hi``)."""
    if info is None:
        return lo, hi
    t = torch.tensor([-lo, hi], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(-t[0]), float(t[1])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded one; every rank must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_tensors(ts: Sequence[torch.Tensor], max_bytes: int = 16 << 20) -> list[torch.Tensor]:
    """The whole tensors of ``ts``, as :func:`full_tensor` gives them one by one, but gathered
    with one collective per group of about ``max_bytes`` (per rank) instead of one per tensor:
    a weight sync from two ranks was 3.5x slower than from one with a gather per tensor.
    Every rank must call it with the same tensors in the same order.

    FSDP2 shards dim 0 as ``torch.chunk`` does (ceil(n / world) rows per rank, the last ranks
    with fewer or none); each rank's shards are padded to that size, concatenated, gathered,
    and cut back. Tensors sharded any other way go through ``full_tensor``."""
    from torch.distributed.tensor import DTensor, Shard

    out = list(ts)
    runs: dict[tuple[Any, torch.dtype, torch.device], list[list[int]]] = {}  # per kind, groups of indices
    filled: dict[tuple[Any, torch.dtype, torch.device], int] = {}  # bytes in each kind's last group
    for i, t in enumerate(ts):
        if not isinstance(t, DTensor):
            continue
        if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or t.dim() == 0 or t.shape[0] == 0:
            out[i] = t.full_tensor()
            continue
        key = (t.device_mesh, t.dtype, t.device)
        nbytes = _padded_numel(t) * t.element_size()
        groups = runs.setdefault(key, [[]])
        if groups[-1] and filled[key] + nbytes > max_bytes:
            groups.append([])
            filled[key] = 0
        groups[-1].append(i)
        filled[key] = filled.get(key, 0) + nbytes
    # every rank built the same groups from the same tensors: the collectives line up
    for (mesh, dtype, device), groups in runs.items():
        for group in groups:
            for i, full in zip(group, _gather_run([ts[i] for i in group], mesh, dtype, device)):
                out[i] = full
    return out


def _padded_numel(t: torch.Tensor) -> int:
    """Elements of one rank's padded shard of ``t`` (ceil(rows / world) rows)."""
    world = t.device_mesh.size()  # type: ignore[attr-defined]
    return -(-t.shape[0] // world) * math.prod(t.shape[1:])


def _gather_run(ts: list[Any], mesh: Any, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    world = mesh.size()
    sizes = [_padded_numel(t) for t in ts]
    flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
    offset = 0
    for t, n in zip(ts, sizes):
        local = t.to_local().reshape(-1)
        flat[offset: offset + local.numel()].copy_(local)
        offset += n
    gathered = torch.empty(world * flat.numel(), dtype=dtype, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(gathered, flat, group=mesh.get_group())
    del flat
    per_rank = gathered.view(world, -1)
    fulls = []
    offset = 0
    for t, n in zip(ts, sizes):
        rows = t.shape[0]
        chunk = -(-rows // world)
        row_numel = math.prod(t.shape[1:])
        pieces = []
        for r in range(world):
            have = max(0, min(chunk, rows - r * chunk))  # torch.chunk: the last ranks may hold fewer rows
            if have:
                pieces.append(per_rank[r, offset: offset + have * row_numel])
        fulls.append(torch.cat(pieces).view(t.shape))
        offset += n
    return fulls


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def close(info: DistInfo | None, timeout_s: float = 60.0) -> None:
    """Leave the trainer's group, together.

    A rank that closes its gloo pairs while a peer still reads from them can abort the peer
    (``terminate called ... gloo::IoException``). So: a barrier over the group (every rank is
    done with collectives), then one over the rendezvous store, which does not ride on those
    pairs (every rank has also *left* the first barrier), and only then the teardown."""
    if info is None or not dist.is_initialized():
        return
    try:
        dist.barrier()
        _store_barrier("vlmrl/close", info.world, timeout_s)
    finally:
        dist.destroy_process_group()


def _store_barrier(key: str, world: int, timeout_s: float) -> None:
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    if store.add(key, 1) == world:
        store.set(key + "/all", b"1")
    store.wait([key + "/all"], datetime.timedelta(seconds=timeout_s))


__all__ = ["CMD_PUSH", "CMD_SAVE", "CMD_STEP", "CMD_STOP", "Command", "DistInfo", "all_max", "all_min_max",
           "all_sum", "broadcast_command", "close", "env_world", "full_tensor", "full_tensors", "init_from_env",
           "is_sharded", "local_tensor", "shard_model", "share", "shard_units"]
