"""The install that README promises resolves, inside pyproject's own pins.

``pyproject.toml`` pins torch/torchvision to ranges one patch release wide: the CPU
environment gets 2.14.1/0.29.1 from local wheels, and ``pip install -e ".[vllm]"``
resolves to the exact torch/torchvision that vLLM pins. Nothing but this file notices
when a new vLLM (or a narrowed range) makes the two disagree, so:

* the fast test checks that the installed torch/torchvision lie inside pyproject's ranges
  (an environment built from something else is caught at once);
* the slow test asks pip to resolve ``<repo>[vllm]`` (``--dry-run --report``, nothing is
  installed; it needs the package index) and checks, against pyproject's own requirement
  specifiers rather than versions written here, that vLLM, torch, torchvision and
  transformers all land inside them, with one torch and one NCCL for trainer and vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PIP_TIMEOUT_S = 600


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    """pyproject's requirements (the base list, or one extra's), by canonical name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if r.marker is None or r.marker.evaluate()}


def _satisfies(req: Requirement, version: str) -> bool:
    # prereleases=True: a pin that deliberately names an rc must still be accepted.
    return req.specifier.contains(Version(version), prereleases=True)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_installed_torch_pair_inside_pyproject_ranges(name: str) -> None:
    req = _requirements()[name]
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed; pip install -e . installs {req}")
    assert _satisfies(req, installed), (
        f"installed {name} {installed} is outside pyproject's {req}: this environment was not "
        f"built from pyproject.toml (pip install -e \".[dev]\" fixes it)")


def test_pyproject_pins_are_narrow_ranges() -> None:
    """torch/torchvision get an upper bound (an open range pulls a new multi-GB CUDA build)."""
    reqs = _requirements()
    for name in ("torch", "torchvision"):
        ops = {s.operator for s in reqs[name].specifier}
        assert ops & {"<", "<=", "==", "~=", "==="}, f"{reqs[name]} has no upper bound"
    assert "vllm" in _requirements("vllm")


@pytest.mark.slow
def test_vllm_extra_resolves_inside_the_pins(tmp_path: Path) -> None:
    """``pip install -e ".[vllm]"`` resolves, and lands inside pyproject's own ranges."""
    report_path = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report_path), "-e", f"{REPO}[vllm]"]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"pip took more than {PIP_TIMEOUT_S}s to resolve .[vllm]; stderr tail:\n{_tail(err)}")
    assert proc.returncode == 0 and report_path.exists(), (
        f"pip could not resolve {REPO}[vllm] (exit {proc.returncode}); the torch/torchvision ranges in "
        f"pyproject.toml and the vllm extra disagree, or the index is unreachable. pip stderr tail:\n"
        f"{_tail(proc.stderr or proc.stdout)}")

    report = json.loads(report_path.read_text())
    installs: dict[str, list[str]] = {}
    for item in report.get("install", []):
        md = item["metadata"]
        installs.setdefault(canonicalize_name(md["name"]), []).append(md["version"])
    summary = ", ".join(f"{n} {'/'.join(v)}" for n, v in sorted(installs.items())
                        if n in ("vllm", "torch", "torchvision", "transformers") or n.startswith("nvidia-nccl"))

    assert len(installs.get("torch", [])) == 1, f"expected exactly one torch in the resolution: {summary}"
    nccl = [n for n in installs if n.startswith("nvidia-nccl")]
    assert len(nccl) <= 1, f"trainer and vLLM must share one NCCL, the resolution has {nccl}: {summary}"

    wanted = {"vllm": _requirements("vllm")["vllm"]}
    wanted.update({n: _requirements()[n] for n in ("torch", "torchvision", "transformers")})
    for name, req in wanted.items():
        got = installs.get(name)
        assert got, f"{name} is missing from the resolution of .[vllm]: {summary}"
        assert _satisfies(req, got[0]), f"{name} {got[0]} resolved outside pyproject's {req}: {summary}"
