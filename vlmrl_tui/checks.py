"""A preflight check's verdict, shared by ``vlmrl doctor``, its vLLM checks and ``vlmrl run``."""

from __future__ import annotations

import functools
import importlib.metadata as md
import re
from dataclasses import asdict, dataclass
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
#: the check could not be decided here (no GPU to compare with, no model config); the message says why
SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, verdict (ok/warn/fail/skip), what was found, and how to fix it."""

    name: str
    status: str
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def torch_requirements() -> str:
    """``'torch>=A,<B' 'torchvision>=C,<D'`` as vlmrl's installed metadata (pyproject.toml) pins them,
    for fixes that say what to install: one source for the pins, right on CPU and on GPU
    (where ``.[vllm]`` picks vLLM's torch inside the same ranges)."""
    try:
        reqs = md.requires("vlmrl") or []
    except md.PackageNotFoundError:
        reqs = []
    picked = []
    for name in ("torch", "torchvision"):
        spec = next((r.split(";")[0].strip() for r in reqs if re.match(rf"{name}\s*[<>=!~]", r)), name)
        picked.append(f"'{spec.replace(' ', '')}'")
    return " ".join(picked)


def format_check(r: CheckResult, color: bool = False) -> str:
    tag = {OK: "ok  ", WARN: "warn", FAIL: "fail", SKIP: "skip"}.get(r.status, r.status)
    if color:
        code = {OK: "32", WARN: "33", FAIL: "31", SKIP: "2"}.get(r.status, "0")
        tag = f"\x1b[{code}m{tag}\x1b[0m"
    line = f"{tag}  {r.name:<13} {r.message}"
    if r.fix and r.status in (WARN, FAIL):
        line += f"\n{'':6}{'':<13} fix: {r.fix}"
    return line
