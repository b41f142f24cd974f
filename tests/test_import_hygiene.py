"""The headless path never imports Textual (rich is fine: headless output uses it).

Each check runs in a fresh interpreter, so nothing this test process imported counts:
importing a headless module must leave ``textual`` out of ``sys.modules``, and
``vlmrl run --dry-run`` / ``vlmrl doctor`` run with Textual blocked outright (any attempt
to import it is recorded and fails). The full headless run (supervisor, server and
trainer under the same block) is checked in tests/test_tui_real.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HEADLESS_MODULES = [
    "backend.config",
    "backend.contract",
    "backend.rundir",
    "vlmrl_tui.cli",
    "vlmrl_tui.plan",
    "vlmrl_tui.supervisor",
    "vlmrl_tui.control",
    "vlmrl_tui.headless",
    "vlmrl_tui.doctor",
    "vlmrl_tui.gpu",
    "vlmrl_tui.watch",
    "vlmrl_tui.launch",
    "vlmrl_tui.proctree",
    "vlmrl_tui.child",
    "backend.records",
    "backend.net",
]

GUARD = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class _NoTextual(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "textual" or name.startswith("textual."):
                with open(os.environ["VLMRL_TEXTUAL_GUARD"], "a") as f:
                    f.write(f"pid {os.getpid()} {sys.argv!r} imported {name}\\n")
                raise ImportError(f"{name} is blocked: the headless path must not import Textual")
            return None

    sys.meta_path.insert(0, _NoTextual())
    """
)


def guarded_env(tmp: Path) -> tuple[dict[str, str], Path]:
    """Environment whose Python processes record and refuse any import of Textual."""
    guard_dir = tmp / "no-textual"
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD, encoding="utf-8")
    record = tmp / "textual-imports.txt"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["VLMRL_TEXTUAL_GUARD"] = str(record)
    return env, record


@pytest.mark.parametrize("module", HEADLESS_MODULES)
def test_headless_module_does_not_import_textual(module: str) -> None:
    code = f"import sys, {module}; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'textual'); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} pulled in {out.stdout.strip()}"


def test_the_guard_catches_textual(tmp_path: Path) -> None:
    env, record = guarded_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", "import vlmrl_tui.app"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "is blocked" in out.stderr
    assert "imported textual" in record.read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--dry-run", "--output-dir", "{tmp}", "configs/colors-tiny.toml"],
        ["doctor"],
        ["doctor", "configs/colors-tiny.toml"],
    ],
    ids=["run-dry-run", "doctor", "doctor-config"],
)
def test_headless_commands_never_import_textual(tmp_path: Path, argv: list[str]) -> None:
    env, record = guarded_env(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path / "runs")) for a in argv]
    out = subprocess.run([sys.executable, "-m", "vlmrl_tui.cli", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert not record.exists(), record.read_text()
    assert "Traceback" not in out.stderr, out.stderr
    if argv[0] == "run":
        assert out.returncode == 0, out.stdout + out.stderr
