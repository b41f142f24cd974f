"""Checkpoints: ``checkpoints/<step>/`` holds everything a run needs to resume.

Weights and processor (Hugging Face format, so a checkpoint is also a model directory;
the weights are streamed to disk one tensor at a time by :func:`save_weights`; with LoRA
the peft adapter instead, :mod:`backend.lora`),
optimizer and scheduler (``optimizer.pt``), random generators (``rng.pt``; both hold only
tensors and plain Python values, read back with ``torch.load(weights_only=True)``) and
``trainer_state.json`` (step, config, run identity). A checkpoint is written into a
temporary folder and renamed into place with its ``COMPLETE`` marker inside, so a crash
mid-write never leaves a checkpoint that looks whole. Names: :mod:`backend.records`.

With several trainer ranks (FSDP2) every rank takes part: the weights are gathered one
tensor at a time and rank 0 writes them in the same Hugging Face layout (a consolidated
export, loadable anywhere and resumable on any number of ranks), and the optimizer state
is saved sharded with ``torch.distributed.checkpoint`` (``optimizer/``, each rank its
shard; loads on another number of ranks, or on one).
"""

from __future__ import annotations

import json
import os
import pickle  # its exception only: every load below is torch.load(weights_only=True)
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from backend import distributed as D
from backend import lora, records
from backend.rundir import RunDirectory, checkpoint_complete, write_json_atomic


def _numpy_rng_state() -> dict[str, Any] | None:
    """numpy's global generator state in types ``torch.load(weights_only=True)`` accepts (its key
    array as a tensor), so that loading ``rng.pt`` never unpickles arbitrary objects."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_rng_state(state: Any) -> None:
    import numpy as np

    if isinstance(state, dict):
        state = (state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["gauss"])
    np.random.set_state(state)  # a tuple: rng.pt of the earlier format (numpy's own state)


def _load_rng(file: Path) -> dict[str, Any]:
    """``rng.pt``, by the safe loader. The earlier format held numpy's state as an ndarray: that
    file loads with numpy's array types (and nothing else) allowed besides tensors."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError:
        import numpy as np

        core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
        legacy = [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]
        try:
            with torch.serialization.safe_globals(legacy):
                return torch.load(file, weights_only=True)
        except pickle.UnpicklingError as e:
            raise RuntimeError(f"{file} holds objects other than tensors and numpy's generator state; "
                               "it is not loaded (resume from another checkpoint)") from e


def _is_tied(model: Any, key: str) -> bool:
    """Whether ``key`` is a weight tied to another one (saved once, so missing on load).

    transformers keeps the tied names in the private ``_tied_weights_keys`` (a list in 4.x,
    a dict in 5.x); there is no public way to ask. Checked with transformers 5.19-5.24.
    """
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied and bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def save_checkpoint(run_dir: RunDirectory, model: Any, processor: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: records.TrainerState, dist: D.DistInfo | None = None) -> Path:
    """Write ``checkpoints/<state.step>/`` (``state`` becomes its trainer_state.json); with
    ``dist``, every rank calls it (see the module docstring)."""
    step = state.step
    final = run_dir.checkpoint(step)
    path = final.with_name(f".{final.name}.tmp")  # written whole, then renamed into place
    main = dist is None or dist.is_main
    if main:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    if dist is not None:
        import torch.distributed as tdist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        tdist.barrier()  # the folder exists before any rank writes into it
        save_weights(model, path, write=main)
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path / records.SHARDED_OPTIMIZER))
        tdist.barrier()  # every shard is on disk before rank 0 marks the checkpoint whole
        if not main:
            return final
        torch.save({"scheduler": scheduler.state_dict()}, path / records.OPTIMIZER_STATE)
    elif lora.is_lora(model):
        lora.save_adapter(model, path)  # the base weights never change: the adapter is the whole update
    else:
        save_weights(model, path)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(path)
    if dist is None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   path / records.OPTIMIZER_STATE)
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # stochastic rounding draws on the GPU's generator
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / records.RNG_STATE)
    write_json_atomic(path / records.TRAINER_STATE, state.to_json())
    (path / records.CHECKPOINT_MARKER).write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(path, final)
    return final


#: safetensors' dtype codes
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 << 30


def save_weights(model: Any, path: Path, *, shard_bytes: int = DEFAULT_SHARD_BYTES, write: bool = True) -> list[Path]:
    """Write ``model``'s weights into ``path`` as Hugging Face safetensors, plus its config.

    The files are what ``save_pretrained`` writes (``model.safetensors``, or numbered shards
    with ``model.safetensors.index.json``; tied weights stored once), but tensors are
    written one at a time, each copied to host memory just before it is written: no clone
    of the model on the GPU (``save_pretrained`` clones parameters that share a buffer, as
    the flattened ones do: +16 GiB for an 8B model) and no whole-model copy in host memory
    (``safetensors.torch.save_file`` serialises every tensor before writing).

    A sharded (FSDP2) model's tensors are gathered one at a time: every rank calls this, in
    the same order, and only the one with ``write`` writes.
    """
    state = {k: v for k, v in model.state_dict().items() if not _is_tied(model, k)}
    if not write:
        for t in state.values():
            D.full_tensor(t)
        return []
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    names = [SAFE_WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = [_write_safetensors(path / fname, items) for fname, items in zip(names, shards)]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {n: fname for fname, items in zip(names, shards) for n, _ in items}}
        write_json_atomic(path / SAFE_INDEX, index)
    model.config.save_pretrained(path)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(path)
    return files


def _write_safetensors(file: Path, items: list[tuple[str, torch.Tensor]]) -> Path:
    """One safetensors file: 8-byte header length, JSON header, then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, t in items:
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be saved as safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, t in items:
            host = D.full_tensor(t.detach()).to("cpu").contiguous()
            if host.numel():
                fh.write(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
            del host
        fh.flush()
        os.fsync(fh.fileno())
    return file


def load_checkpoint(path: str | Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: torch.device | str) -> int:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns its step."""
    path = Path(path)
    if not checkpoint_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {records.CHECKPOINT_MARKER})")
    if lora.is_lora(model):
        lora.load_adapter(model, path, device)
    else:
        _load_weights(model, path, device)
    opt = torch.load(path / records.OPTIMIZER_STATE, map_location=device, weights_only=True)
    if (path / records.SHARDED_OPTIMIZER).is_dir():  # written by several ranks: resharded to this run's
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        osd = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(osd, checkpoint_id=str(path / records.SHARDED_OPTIMIZER))
        set_optimizer_state_dict(model, optimizer, osd["optimizer"])
    elif D.is_sharded(model):
        raise RuntimeError(f"checkpoint {path} was written by one trainer rank; resume it with trainer.processes = 1")
    else:
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = _load_rng(path / records.RNG_STATE)
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    if rng.get("numpy") is not None:
        _set_numpy_rng_state(rng["numpy"])
    return read_trainer_state(path).step


def _load_weights(model: Any, path: Path, device: torch.device | str) -> None:
    """Load the full weights saved by :func:`save_weights` into ``model``."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f), device=str(device)))
    if D.is_sharded(model):  # every rank reads the full weights and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        res = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path}: missing {missing[:5]} unexpected {unexpected[:5]}")


def read_trainer_state(path: str | Path) -> records.TrainerState:
    """The ``trainer_state.json`` of a checkpoint."""
    file = Path(path) / records.TRAINER_STATE
    return records.TrainerState.from_json(json.loads(file.read_text()), source=str(file))
