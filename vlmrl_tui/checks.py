"""A preflight check's verdict, shared by ``vlmrl doctor``, its vLLM checks and ``vlmrl run``,
and the checks of what the server exposes (its bind address, the image URLs it fetches)."""

from __future__ import annotations

import functools
import importlib.metadata as md
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from backend import net

if TYPE_CHECKING:
    from backend.config import VlmrlConfig

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


def check_bind_host(cfg: "VlmrlConfig") -> CheckResult:
    """A server bound beyond the loopback serves its admin routes to the network."""
    host = cfg.inference.host
    if net.is_loopback(host):
        return CheckResult("bind address", OK, f"the server listens on {host} (this machine only)")
    return CheckResult(
        "bind address", WARN,
        f"inference.host = {host!r} is not a loopback address: the server's admin routes (weight sync, pause, "
        "cache resets) are then reachable from the network and protected only by the run token, and its "
        "chat route by nothing",
        "keep inference.host = \"127.0.0.1\" unless the trainer runs on another machine; then firewall "
        f"port {cfg.inference.port} to the trainer's host",
    )


def check_remote_media(cfg: "VlmrlConfig") -> CheckResult:
    """Whether the server fetches the http(s) image URLs a request names."""
    inf = cfg.inference
    if not inf.allow_http_media:
        return CheckResult("image urls", OK, "data: URLs and files under allowed_local_media_path only")
    if inf.engine != "vllm":
        return CheckResult("image urls", OK, "the hf engine never fetches http(s) URLs (allow_http_media is vLLM's)")
    domains = (inf.args.model_extra or {}).get("allowed_media_domains")
    if domains:
        return CheckResult("image urls", OK, f"vLLM fetches http(s) images from {domains} only")
    return CheckResult(
        "image urls", WARN,
        "inference.allow_http_media = true: vLLM fetches any http(s) image URL a request names, from any host the "
        "server can reach",
        "name the hosts in [inference.args] allowed_media_domains, or set allow_http_media = false",
    )
