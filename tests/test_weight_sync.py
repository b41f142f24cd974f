"""Weight sync through the real sequence (HTTP + gloo) into a real server subprocess."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

from backend import contract
from backend.sampling import banned_token_ids, logit_bias_for
from backend.weight_sync import (
    BucketSpec,
    WeightSyncClient,
    WeightSyncError,
    contiguous_view,
    flatten_parameters,
    pack_bucket,
    plan_buckets,
    spec_of,
    unpack_bucket,
)
from environments.colors import ColorsEnv
from serverproc import ServerProc, encode, forward_logprobs, free_port, load_trainer_side, serving, wire_messages, write_config

TOKEN = "sync-token"
AUTH = {contract.TOKEN_HEADER: f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    with serving(tmp_path_factory.mktemp("sync-server"), TOKEN) as proc:
        yield proc


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_trainer_side(tiny_model_dir)


def greedy(server: ServerProc, messages: list[dict[str, Any]], bias: dict[str, float]) -> tuple[list[int], list[float]]:
    body = {"messages": wire_messages(messages), "temperature": 0.0, "max_tokens": 6, "logprobs": True,
            "return_token_ids": True, "logit_bias": bias}
    r = httpx.post(server.url + contract.ROUTE_CHAT, json=body, timeout=60)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["token_ids"], [e["logprob"] for e in c["logprobs"]["content"]]


def assert_server_follows(model: Any, processor: Any, server: ServerProc, examples: list[Any],
                          bias: dict[str, float]) -> list[list[int]]:
    """The server's greedy ids are the model's argmax and its logprobs the model's, exactly (fp32)."""
    outs = []
    for ex in examples:
        ids, lps = greedy(server, ex.messages, bias)
        ref = forward_logprobs(model, encode(processor, ex.messages), ids, 0.0, bias)
        assert ids == ref.argmax(-1).tolist()
        # fp32 agreement as torch.testing defines it for float32 (a cached, batched generate and a
        # full forward add in different orders; 1.03e-5 seen on a logprob of -0.93 after a scramble)
        torch.testing.assert_close(torch.tensor(lps), ref.gather(1, torch.tensor(ids)[:, None]).squeeze(1),
                                   atol=1e-5, rtol=1.3e-6)
        outs.append(ids)
    return outs


def test_bucket_packing_roundtrip() -> None:
    named = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)),
             ("c", torch.randn(4, dtype=torch.float64).to(torch.bfloat16)), ("d", torch.randn(100))]
    buckets = plan_buckets(named, bucket_bytes=80)
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b", "c"], ["d"]]  # d alone: larger than a bucket
    for items in buckets:
        spec = spec_of(items)
        assert BucketSpec.from_update_info(spec.update_info()).nbytes == spec.nbytes
        flat = pack_bucket(items, torch.empty(spec.nbytes + 16, dtype=torch.uint8))
        assert flat.numel() == spec.nbytes
        for (n1, t1), (n2, t2) in zip(items, unpack_bucket(flat.clone(), spec)):
            assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)
    for bad, msg in [({"names": ["x"], "dtype_names": ["float32"], "shapes": [[2]], "packed": False}, "packed"),
                     ({"names": ["x"], "dtype_names": ["complex"], "shapes": [[2]]}, "dtype"),
                     ({"names": ["x", "y"], "dtype_names": ["float32"], "shapes": [[2]]}, "differ"),
                     ({"names": ["x"], "dtype_names": ["float32"], "shapes": [[-1]]}, "shape")]:
        with pytest.raises(ValueError, match=msg):
            BucketSpec.from_update_info(bad)


def test_flat_parameters_go_out_without_packing_and_land_in_place() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    net[2].bias.data = net[2].bias.data.to(torch.float64)  # mixed dtypes get aligned offsets
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    layout = flatten_parameters(net)
    named = [(n, p.detach()) for n, p in net.named_parameters()]
    for n, p in named:
        assert torch.equal(p, before[n]) and p.dtype == before[n].dtype and p.requires_grad is False
    assert all(p.requires_grad for p in net.parameters())
    buckets = plan_buckets(named, bucket_bytes=100)
    for items in buckets:
        view = contiguous_view(items, torch.device("cpu"))
        spec = spec_of(items)
        if items[0][1].dtype == torch.float64:
            continue
        assert view is not None and view.numel() == spec.nbytes
        assert torch.equal(view, pack_bucket(items, torch.empty(spec.nbytes, dtype=torch.uint8)))
        region = layout.region(spec)
        assert region is not None and region.data_ptr() == view.data_ptr()
    # separate tensors, or names out of order, take the copying path
    assert contiguous_view([("a", torch.zeros(3)), ("b", torch.zeros(3))], torch.device("cpu")) is None
    assert layout.region(spec_of(list(reversed(named[:2])))) is None
    # writing into the layout changes the module
    layout.buffer.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in net.parameters())


def test_sync_makes_the_server_follow_the_trainer(server: ServerProc, trainer_side: tuple[Any, Any]) -> None:
    model, processor = trainer_side
    bias = logit_bias_for(banned_token_ids(processor.tokenizer))
    examples = ColorsEnv().eval_examples(4)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = assert_server_follows(model, processor, server, examples, bias)

    # the trainer changes its weights: the language model's head is scrambled
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "language_model" in name or "lm_head" in name else 0.05))
    with WeightSyncClient(server.url, TOKEN, backend="gloo", bucket_bytes=512 << 10, timeout_s=60) as client:
        stats = client.sync(model.named_parameters(), version=1)
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert stats.bytes == n_bytes and stats.buckets >= 3 and stats.tensors == len(list(model.parameters()))
        health = httpx.get(server.url + contract.ROUTE_HEALTH).json()
        assert health["status"] == "ok" and health["weight_version"] == 1
        after = assert_server_follows(model, processor, server, examples, bias)
        assert after != before, "new weights should change some greedy completion"
        assert not torch.distributed.is_initialized(), "the private group must leave the default group alone"

        # and back: the original weights give the original answers again; this time one
        # bucket at a time, as the client drives vLLM (which does not order concurrent calls)
        assert client.pipelined is True
        client.pipelined = False
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(original[name])
        client.sync(model.named_parameters(), version=2)
        assert assert_server_follows(model, processor, server, examples, bias) == before
        info = httpx.get(server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
        assert info["weight_version"] == 2 and info["group"]["joined"] is True


def test_load_error_is_reported_and_a_full_sync_recovers(server: ServerProc, trainer_side: tuple[Any, Any]) -> None:
    model, processor = trainer_side
    named = list(model.named_parameters())
    with WeightSyncClient(server.url, TOKEN, bucket_bytes=256 << 10, timeout_s=30) as client:
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="unknown parameter 'no.such.weight'"):
            client.sync(named[:5] + [("no.such.weight", torch.zeros(10))] + named[5:], version=3)
        with pytest.raises(WeightSyncError, match="has shape"):
            client.sync([(named[0][0], torch.zeros(3))], version=3)
        assert time.monotonic() - t0 < 10, "a load error must not hang the trainer"
        # the server took part in every broadcast, reported the error, and refuses to serve mixed weights
        h = httpx.get(server.url + contract.ROUTE_HEALTH)
        assert h.status_code == 503 and "inconsistent" in h.json()["reason"]
        r = httpx.post(server.url + contract.ROUTE_CHAT, json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "weights_inconsistent"
        client.sync(named, version=4)
    h = httpx.get(server.url + contract.ROUTE_HEALTH)
    assert h.status_code == 200 and h.json()["weight_version"] == 4


def test_an_unsupported_dtype_is_refused_before_the_wire_and_sync_goes_on(server: ServerProc,
                                                                          trainer_side: tuple[Any, Any]) -> None:
    model, _ = trainer_side
    with WeightSyncClient(server.url, TOKEN, timeout_s=60) as client:
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="x: unsupported dtype name 'complex64'"):
            client.sync([("x", torch.zeros(4, dtype=torch.complex64))], version=20)
        assert time.monotonic() - t0 < 10, "the trainer must not wait on a tensor the wire cannot carry"
        assert httpx.get(server.url + contract.ROUTE_HEALTH).json()["paused"] is False
        flat_model = copy.deepcopy(model)
        flatten_parameters(flat_model)  # and this time the buckets go out without packing
        stats = client.sync(flat_model.named_parameters(), version=21)  # a fresh group on the same store
        assert stats.tensors == len(list(model.parameters()))
    assert httpx.get(server.url + contract.ROUTE_HEALTH).json()["weight_version"] == 21


def test_bad_token_fails_fast(server: ServerProc) -> None:
    client = WeightSyncClient(server.url, "wrong", timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="401"):
        client.init()
    assert time.monotonic() - t0 < 5
    client.close()


DYING_TRAINER = textwrap.dedent("""
    import os, sys, threading, time, httpx, torch
    from backend.weight_sync import host_store, open_group, broadcast
    url, token = sys.argv[1], sys.argv[2]
    h = {"Authorization": f"Bearer {token}"}
    store = host_store("127.0.0.1", 0, 2, 10)
    init = {"master_address": "127.0.0.1", "master_port": store.port, "rank_offset": 1, "world_size": 2,
            "timeout_s": 4, "probe": True}
    t = threading.Thread(target=lambda: httpx.post(url + "/init_weight_transfer_engine", json={"init_info": init},
                                                   headers=h, timeout=30))
    t.start()
    pg = open_group("gloo", store, 0, 2, 10)
    broadcast(pg, torch.zeros(1, dtype=torch.int64)).wait()
    t.join()
    assert httpx.post(url + "/start_weight_update", headers=h, timeout=30).status_code == 200
    info = {"names": ["model.language_model.embed_tokens.weight"], "dtype_names": ["float32"],
            "shapes": [[4, 4]], "packed": True}
    threading.Thread(target=lambda: httpx.post(url + "/update_weights", json={"update_info": info}, headers=h,
                                               timeout=30), daemon=True).start()
    time.sleep(1.0)
    print("dying mid-update", flush=True)
    os._exit(3)
""")


def test_a_trainer_dying_mid_update_never_hangs_the_server(server: ServerProc, trainer_side: tuple[Any, Any],
                                                          tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", DYING_TRAINER, server.url, TOKEN], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    # the server's receive fails (peer gone or timeout), it resumes: nothing was loaded
    deadline = time.monotonic() + 20
    while True:
        info = httpx.get(server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
        if not info["updating"]:
            break
        assert time.monotonic() < deadline, "server still stuck in the update"
        time.sleep(0.2)
    assert info["group"]["joined"] is False
    assert time.monotonic() - t0 < 30
    assert httpx.get(server.url + contract.ROUTE_HEALTH).status_code == 200
    r = httpx.post(server.url + contract.ROUTE_CHAT, json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    # a new trainer can join and sync
    model, _ = trainer_side
    with WeightSyncClient(server.url, TOKEN, timeout_s=30) as client:
        client.sync(model.named_parameters(), version=10)
    assert httpx.get(server.url + contract.ROUTE_HEALTH).json()["weight_version"] == 10


def test_a_server_dying_mid_sync_never_hangs_the_trainer(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    srv = ServerProc(write_config(tmp_path / "cfg.toml", port=port), port, tmp_path / "server.log", TOKEN)
    srv.wait_healthy()
    big = [(f"w{i}", torch.zeros(1 << 20)) for i in range(64)]  # 256 MB of unknown names: slow to push
    client = WeightSyncClient(srv.url, TOKEN, bucket_bytes=4 << 20, timeout_s=20)
    try:
        client.init()
        import threading

        killer = threading.Timer(0.5, srv.proc.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            client.sync(big, version=1)
        print(f"trainer noticed the dead server after {time.monotonic() - t0:.2f}s: {err.value}")
        assert time.monotonic() - t0 < 20
        killer.join()
    finally:
        client.close()
        srv.stop()
