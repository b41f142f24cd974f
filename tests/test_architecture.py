"""The shape of the code: who imports whom, no import cycles, one owner per record.

The import-linter contracts live in pyproject.toml (``[tool.importlinter]``): layers
vlmrl_tui -> backend -> environments, the dashboard views above the launcher above the
supervisor, the headless path free of Textual, the code that runs inside vLLM free of the
trainer, and no cycles between sibling packages. The other checks here read the import
graph and the sources directly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backend import records

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vlmrl_tui", "backend", "environments")
#: source files allowed over MAX_LINES, and why
LONG_FILES: dict[str, str] = {
    "vlmrl_tui/supervisor.py": "the run's state machine: every transition (start, health, exit, restart, stop) "
                               "in one class, so its rules read together; process mechanics live in child.py and "
                               "proctree.py, the run.json schema in backend/records.py",
    "backend/records.py": "the whole run-directory schema (file names, run.json, metric, rollout, eval and "
                          "checkpoint records) in the one module that owns it",
    "backend/config.py": "the whole config schema (every table and key with its validation, the loader and "
                         "overrides) in the one module that owns it",
}
MAX_LINES = 500


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_import_linter_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "broken" not in out.stdout.split("Contracts:")[-1].lower().replace("0 broken", "")


def test_no_module_imports_itself_back() -> None:
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert cycles == []


def test_source_files_stay_small() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_FILES), f"over {MAX_LINES} lines without a reason in LONG_FILES: {long}"


@pytest.mark.parametrize("literal", [
    records.RUN_FILE, records.METRICS_FILE, records.ROLLOUTS_FILE, records.EVAL_FILE, records.CONFIG_FILE,
    records.EVAL_SCORES_FILE, records.SBATCH_FILE, records.SLURM_OUTPUT,
    records.CHECKPOINT_MARKER, records.TRAINER_STATE, records.CONTROL_SOCKET, *records.METRIC_KEYS,
])
def test_record_names_are_spelled_only_in_records(literal: str) -> None:
    """A run-directory file name or a metric key used as a key (``x["k"]``, ``.get("k"``,
    ``{"k": ...}``) or as a whole string appears in backend/records.py and nowhere else."""
    pattern = re.compile(
        rf"""\[\s*["']{re.escape(literal)}["']\s*\]|\.get\(\s*["']{re.escape(literal)}["']|"""
        rf"""["']{re.escape(literal)}["']\s*:"""
        + (rf"""|["']{re.escape(literal)}["']""" if not literal.isidentifier() or literal.isupper() else "")
    )
    hits = [f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
            for p in _sources() if p.name != "records.py"
            for text in [p.read_text()] for m in pattern.finditer(text)]
    assert hits == []
