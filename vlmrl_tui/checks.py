"""A preflight check's verdict, shared by ``vlmrl doctor``, its vLLM checks and ``vlmrl run``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, verdict (ok/warn/fail), what was found, and how to fix it."""

    name: str
    status: str
    message: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def format_check(r: CheckResult, color: bool = False) -> str:
    tag = {OK: "ok  ", WARN: "warn", FAIL: "fail"}.get(r.status, r.status)
    if color:
        code = {OK: "32", WARN: "33", FAIL: "31"}.get(r.status, "0")
        tag = f"\x1b[{code}m{tag}\x1b[0m"
    line = f"{tag}  {r.name:<13} {r.message}"
    if r.fix and r.status != OK:
        line += f"\n{'':6}{'':<13} fix: {r.fix}"
    return line
