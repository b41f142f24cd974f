"""Session fixtures shared by every test module: offline hub, one torch thread, tiny models.

Tiny models are cached across test runs under ``~/.cache/vlmrl/test-models/<key>`` where the
key hashes the builder's source and the transformers version, so an edit to
``backend/tiny.py`` never reuses a stale model, and an unchanged tree builds nothing.
``VLMRL_CACHE_DIR`` points there for the whole session, so subprocesses (servers, trainers,
the CLI) that resolve ``builtin:tiny-qwen3-vl`` find the same warm model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

# huggingface_hub reads HF_HUB_OFFLINE once, at import: set it before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_FAMILIES: tuple[str, ...] = ("qwen3-vl", "qwen2.5-vl", "qwen2-vl", "llava")


def _cache_key() -> str:
    import transformers

    import backend.tiny as tiny

    h = hashlib.sha256(Path(tiny.__file__).read_bytes())
    h.update(transformers.__version__.encode())
    return h.hexdigest()[:12]


@pytest.fixture(autouse=True)
def _one_thread_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests share 2 cores with other work: one torch thread; and never touch the hub."""
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tiny_cache_dir() -> Iterator[Path]:
    """The session-wide (and cross-run) tiny model cache; ``VLMRL_CACHE_DIR`` points here."""
    override = os.environ.get("VLMRL_TEST_CACHE_DIR")
    root = Path(override) if override else Path.home() / ".cache" / "vlmrl" / "test-models"
    path = root / _cache_key()
    path.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("VLMRL_CACHE_DIR")
    os.environ["VLMRL_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VLMRL_CACHE_DIR", None)
    else:
        os.environ["VLMRL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache_dir: Path) -> Path:
    """The warm tiny Qwen3-VL (what ``builtin:tiny-qwen3-vl`` resolves to), built once."""
    import torch

    from backend.models import resolve_model

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Path(resolve_model("builtin:tiny-qwen3-vl"))
    finally:
        torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_cache_dir: Path) -> Callable[..., Path]:
    """``factory(family, warmup=False, seed=0) -> Path``: a cached tiny model of any family."""
    import torch

    from backend.tiny import build_tiny

    def factory(family: str, warmup: bool = False, seed: int = 0) -> Path:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            name = f"fixture-{family}-{'warm' if warmup else 'cold'}-s{seed}"
            # build_tiny reuses a directory that already holds the same build.
            return build_tiny(family, tiny_cache_dir / name, seed=seed, warmup=warmup)
        finally:
            torch.set_num_threads(prev)

    return factory


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_model_factory: Callable[..., Path]) -> dict[str, Path]:
    """One tiny model per family (no warm-up): ``{"qwen3-vl": Path, ..., "llava": Path}``."""
    return {family: tiny_model_factory(family) for family in TINY_FAMILIES}
