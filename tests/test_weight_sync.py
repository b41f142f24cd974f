"""Weight sync through the real sequence (HTTP + gloo) into a real server subprocess."""

from __future__ import annotations

import concurrent.futures as cf
import copy
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

from backend import contract
from backend.sampling import banned_token_ids, end_of_turn_ids, logit_bias_for
from backend.weight_sync import (
    BucketSpec,
    WeightReceiver,
    WeightSyncClient,
    WeightSyncError,
    close_group,
    contiguous_view,
    flatten_parameters,
    host_store,
    open_group,
    pack_bucket,
    plan_buckets,
    spec_of,
    unpack_bucket,
)
from backend.weight_sync import groups
from environments.colors import ColorsEnv
from tests.serverproc import (ServerProc, assert_server_follows, encode, forward_logprobs, free_port, greedy,
                              load_trainer_side, serving, wire_messages, write_config)

TOKEN = "sync-token"
AUTH = {contract.TOKEN_HEADER: f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    with serving(tmp_path_factory.mktemp("sync-server"), TOKEN) as proc:
        yield proc


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_trainer_side(tiny_model_dir)


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


def test_floating_tensors_are_cast_bucket_by_bucket_and_planned_at_their_cast_size() -> None:
    a, c, d = torch.randn(10), torch.randn(10), torch.randn(3, 2)
    b, z = torch.arange(3, dtype=torch.int64), torch.tensor([7], dtype=torch.int8)
    named = [("a", a), ("b", b), ("c", c), ("z", z), ("d", d)]
    # fp32: a=40, b=24, c=40, z=1, d=24 bytes; as bf16 the floats take half
    assert [[n for n, _ in bk] for bk in plan_buckets(named, 44)] == [["a"], ["b"], ["c", "z"], ["d"]]
    buckets = plan_buckets(named, 44, torch.bfloat16)
    assert [[n for n, _ in bk] for bk in buckets] == [["a", "b"], ["c", "z", "d"]]
    want = {"a": a.to(torch.bfloat16), "b": b, "c": c.to(torch.bfloat16), "z": z, "d": d.to(torch.bfloat16)}
    for items in buckets:
        spec = spec_of(items, torch.bfloat16)
        assert spec.dtypes == [want[n].dtype for n, _ in items]
        assert spec.nbytes == sum(want[n].numel() * want[n].element_size() for n, _ in items)
        info = BucketSpec.from_update_info(spec.update_info())
        assert info.dtypes == spec.dtypes and spec.update_info()["packed_buffer_size_bytes"] == spec.nbytes
        flat = pack_bucket(items, torch.empty(spec.nbytes + 8, dtype=torch.uint8), torch.bfloat16)
        assert flat.numel() == spec.nbytes
        # "d" lies at byte 21 of its bucket: packed and unpacked through a copy, not a view
        for name, t in unpack_bucket(flat.clone(), spec):
            assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
    # without a cast the bytes are the tensors' own
    assert torch.equal(pack_bucket([("a", a)], torch.empty(40, dtype=torch.uint8)), a.view(torch.uint8))


class SlowGpuWork:
    """Stand-in for a torch Work with GPU (NCCL) semantics, a boundary we do not own: its
    future completes at once (the work was enqueued), is_completed() only once the kernel
    ran, here ``after_s`` from now."""

    def __init__(self, after_s: float, error: Exception | None = None) -> None:
        self.done_at = time.monotonic() + after_s
        self.error = error
        self.waited = False
        self._future: torch.futures.Future[None] = torch.futures.Future()
        self._future.set_result(None)

    def get_future(self) -> torch.futures.Future[None]:
        return self._future

    def is_completed(self) -> bool:
        return time.monotonic() >= self.done_at

    def wait(self) -> bool:
        self.waited = True
        if self.error is not None:
            raise self.error
        return True


class RecordingGroup:
    """Stand-in for a torch process group that records the teardown calls made on it."""

    def __init__(self, work: Any = None, shutdown_error: Exception | None = None) -> None:
        self.calls: list[str] = []
        self.work = work
        self.shutdown_error = shutdown_error

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        self.calls.append("broadcast")
        return self.work

    def abort(self) -> None:
        self.calls.append("abort")

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        if self.shutdown_error is not None:
            raise self.shutdown_error


def test_waiting_for_a_gpu_work_sleeps_until_it_ran_instead_of_spinning() -> None:
    client = WeightSyncClient("http://127.0.0.1:9", None, timeout_s=10)
    try:
        work = SlowGpuWork(1.0)
        cpu0 = time.thread_time()
        client._wait("broadcasting bucket 1/1", work, None)
        cpu = time.thread_time() - cpu0
        late = time.monotonic() - work.done_at
    finally:
        client.close()
    print(f"waited 1 s for a GPU work: {cpu * 1000:.1f} ms of CPU, returned {late * 1000:.1f} ms after it ran")
    assert work.waited, "wait() must still be called: it raises the collective's error"
    assert 0 <= late < 0.5  # woken by the work, not by a coarse poll (a loaded machine adds its delay)
    assert cpu < 0.1, f"{cpu:.2f}s of CPU in a 1 s wait: spinning"


def test_a_wait_ends_when_the_server_call_fails_or_at_the_timeout_and_aborts_the_group() -> None:
    client = WeightSyncClient("http://127.0.0.1:9", None, timeout_s=0.5)
    try:
        client.pg = pg = RecordingGroup()
        http: cf.Future[Any] = cf.Future()
        threading.Timer(0.2, http.set_exception, (RuntimeError("answered 500: load failed"),)).start()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="server side failed: answered 500"):
            client._wait("broadcasting bucket 1/3", SlowGpuWork(60), http)
        assert 0.15 < time.monotonic() - t0 < 5.0  # at the failure, far before the work's 60 s
        assert pg.calls == ["abort"] and client.pg is None

        client.pg = pg = RecordingGroup()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="not done within 0.5s"):
            client._wait("broadcasting bucket 2/3", SlowGpuWork(60), None)
        assert 0.45 < time.monotonic() - t0 < 5.0  # at the 0.5 s timeout, far before the work's 60 s
        assert pg.calls == ["abort"]

        client.pg = pg = RecordingGroup()
        with pytest.raises(WeightSyncError, match="failed: Connection closed by peer"):
            client._wait("broadcasting bucket 3/3", SlowGpuWork(0, RuntimeError("Connection closed by peer")), None)
        assert pg.calls == ["abort"]
    finally:
        client.close()


def test_failures_abort_the_group_and_only_a_normal_close_shuts_it_down() -> None:
    client = WeightSyncClient("http://127.0.0.1:9", None, timeout_s=5)
    client.pg = broken = RecordingGroup()
    client._break()
    client.pg = healthy = RecordingGroup()
    client.close()
    assert broken.calls == ["abort"] and healthy.calls == ["shutdown"]
    # a shutdown that fails falls back to abort; abort is never followed by anything
    pg = RecordingGroup(shutdown_error=RuntimeError("shutdown not supported"))
    close_group(pg)
    assert pg.calls == ["shutdown", "abort"]

    # the server side: a receive whose collective fails aborts the group
    loaded: list[Any] = []
    receiver = WeightReceiver(loaded.extend)
    receiver.pg = pg = RecordingGroup(work=SlowGpuWork(0, RuntimeError("NCCL communicator was aborted")))
    receiver._pool = groups_buffer_pool()
    receiver.timeout_s = 5
    info = {"names": ["w"], "dtype_names": ["float32"], "shapes": [[4]], "packed": True}
    with pytest.raises(WeightSyncError, match="NCCL communicator was aborted"):
        receiver.receive(info)
    assert pg.calls == ["broadcast", "abort"] and not receiver.ready and loaded == []
    with pytest.raises(WeightSyncError, match="no weight-transfer group"):
        receiver.receive(info)
    # leaving the group on the server side (a new trainer replaces it, the server stops) aborts too
    receiver.pg = pg = RecordingGroup()
    receiver.shutdown()
    assert pg.calls == ["abort"]


def groups_buffer_pool() -> Any:
    from backend.weight_sync import BufferPool

    return BufferPool("cpu")


def test_our_nccl_settings_apply_only_while_our_group_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # values and names checked against torch 2.14.1's ProcessGroupNCCL.hpp (see groups.py)
    assert groups.NCCL_GROUP_ENV == {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
                                     "TORCH_NCCL_ENABLE_MONITORING": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # the process's own choice, e.g. for FSDP
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    with groups.nccl_group_env():
        assert {k: os.environ.get(k) for k in groups.NCCL_GROUP_ENV} == groups.NCCL_GROUP_ENV
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ
    with pytest.raises(RuntimeError, match="boom"), groups.nccl_group_env():
        raise RuntimeError("boom")
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ
    if hasattr(torch.distributed, "ProcessGroupNCCL"):  # the CUDA build: options work without a GPU
        opts = groups._group_options("nccl", 12.0, "127.0.0.1")
        assert opts.config.blocking == 0 and opts._timeout.total_seconds() == 12.0


def test_a_peer_that_never_joins_gives_a_weight_sync_error_within_the_timeout() -> None:
    store = host_store("127.0.0.1", 0, 2, 2.0)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="joining the gloo group as rank 0/2 failed"):
        open_group("gloo", store, 0, 2, 2.0, prefix="nobody-comes")
    assert time.monotonic() - t0 < 6


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


IDLE_PEER = textwrap.dedent("""
    import sys, time, torch
    from backend.weight_sync import broadcast, join_store, open_group, wait_work
    pg = open_group("gloo", join_store("127.0.0.1", int(sys.argv[1]), 2, 30), 1, 2, 30, prefix="idle-peer")
    wait_work(broadcast(pg, torch.zeros(1, dtype=torch.int64)), 30, "probe")
    print("joined", flush=True)
    time.sleep(600)  # never posts the receive of the next broadcast
""")


def test_aborting_a_group_with_work_pending_returns_at_once() -> None:
    store = host_store("127.0.0.1", 0, 2, 30)
    proc = subprocess.Popen([sys.executable, "-c", IDLE_PEER, str(store.port)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pg = open_group("gloo", store, 0, 2, 5.0, prefix="idle-peer")
        groups.wait_work(groups.broadcast(pg, torch.zeros(1, dtype=torch.int64)), 30, "probe")
        assert proc.stdout is not None and proc.stdout.readline().strip() == "joined"
        work = groups.broadcast(pg, torch.zeros(64 << 20, dtype=torch.uint8))  # more than the socket buffers
        time.sleep(0.3)
        assert not work.is_completed()
        t0 = time.monotonic()
        groups.abort_group(pg)
        del pg  # the caller's last reference: the group's destructor would wait for the send (5 s)
        assert time.monotonic() - t0 < 3.0  # not the destructor's 5 s wait for the send
        with pytest.raises(WeightSyncError):
            groups.wait_work(work, 10, "the pending broadcast")  # it still ends, at gloo's timeout
    finally:
        proc.kill()
        proc.wait()


def test_fp32_weights_sent_as_bf16_land_bf16_rounded(server: ServerProc, trainer_side: tuple[Any, Any]) -> None:
    model, processor = trainer_side
    bias = logit_bias_for(banned_token_ids(processor.tokenizer))
    examples = ColorsEnv().eval_examples(3)
    fp32 = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in fp32.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    rounded = copy.deepcopy(fp32)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    n_params = sum(p.numel() for p in fp32.parameters())
    with WeightSyncClient(server.url, TOKEN, bucket_bytes=256 << 10, timeout_s=60) as client:
        stats = client.sync(fp32.named_parameters(), version=30, dtype=torch.bfloat16)
        assert stats.bytes == 2 * n_params  # every parameter is floating point: half the fp32 bytes
        assert all(p.dtype == torch.float32 for p in fp32.parameters()), "the trainer's weights stay fp32"
        assert_server_follows(rounded, processor, server, examples, bias)
        # ... and not the fp32 values themselves (the rounding is visible in the logprobs)
        ids, lps = greedy(server, examples[0].messages, bias)
        ref = forward_logprobs(fp32, encode(processor, examples[0].messages), ids, 0.0, bias)
        assert (torch.tensor(lps) - ref.gather(1, torch.tensor(ids)[:, None]).squeeze(1)).abs().max() > 1e-4
        # parameters lying back to back must still be cast, not sent as their fp32 bytes
        client.sync(model.named_parameters(), version=31)
        flatten_parameters(fp32)
        with pytest.raises(WeightSyncError, match="floating-point dtype"):
            client.sync(fp32.named_parameters(), version=32, dtype=torch.int8)
        stats = client.sync(fp32.named_parameters(), version=32, dtype=torch.bfloat16)
        assert stats.bytes == 2 * n_params
        assert_server_follows(rounded, processor, server, examples, bias)
    assert httpx.get(server.url + contract.ROUTE_HEALTH).json()["weight_version"] == 32


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
    deadline = time.monotonic() + 30
    while httpx.get(url + "/weight_info", headers=h, timeout=10).json()["group"]["buckets_posted"] < 1:
        assert time.monotonic() < deadline, "the server never posted the bucket's receive"
        time.sleep(0.05)  # die only once the server waits for the bytes: a death mid-update
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
    # it died mid-receive, as meant, and the server's error names the peer that went away
    assert re.search(r"receiving a bucket of 64 bytes from the trainer \(rank 0 of the group at 127\.0\.0\.1:\d+\) "
                     r"failed", server.log())
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
        killer = threading.Timer(0.15, srv.proc.kill)  # the whole sync takes ~0.4 s here
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="bucket") as err:  # killed mid-sync, not after it
            client.sync(big, version=1)
        print(f"trainer noticed the dead server after {time.monotonic() - t0:.2f}s: {err.value}")
        assert f"(peer: the server at {srv.url})" in str(err.value)
        assert time.monotonic() - t0 < 20
        killer.join()
        assert client.pg is None, "the broken group was aborted and forgotten"
        t1 = time.monotonic()
        client.close()
        assert time.monotonic() - t1 < 2, "closing after a failure must not wait for the dead peer"
    finally:
        client.close()
        srv.stop()


KILLED_TRAINER = textwrap.dedent("""
    import sys, time, torch
    from backend.weight_sync import broadcast, host_store, open_group, wait_work
    store = host_store("127.0.0.1", 0, 2, 30)
    print(store.port, flush=True)
    pg = open_group("gloo", store, 0, 2, 30, prefix="killed-trainer")
    wait_work(broadcast(pg, torch.zeros(1, dtype=torch.int64)), 30, "probe")
    wait_work(broadcast(pg, torch.arange(16, dtype=torch.float32)), 30, "bucket 1")
    print("sent bucket 1", flush=True)
    time.sleep(600)  # never sends bucket 2: killed while the receiver waits for it
""")


def test_a_peer_killed_mid_bucket_gives_the_receiver_an_error_and_close_does_not_hang() -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    received: list[tuple[str, torch.Tensor]] = []
    receiver = WeightReceiver(lambda named: received.extend((n, t.clone()) for n, t in named))
    pool = cf.ThreadPoolExecutor(1)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        receiver.init({"master_address": "127.0.0.1", "master_port": port, "world_size": 2, "rank_offset": 1,
                       "timeout_s": 20, "group_name": "killed-trainer", "probe": True})
        receiver.start()
        info = {"names": ["w"], "dtype_names": ["float32"], "shapes": [[16]], "packed": True}
        receiver.receive(info)
        receiver.wait_loaded()
        assert received[0][0] == "w" and torch.equal(received[0][1], torch.arange(16, dtype=torch.float32))
        assert proc.stdout.readline().strip() == "sent bucket 1"
        second = pool.submit(receiver.receive, info)
        time.sleep(0.3)
        assert not second.done(), "bucket 2 must be in flight when the peer dies"
        t0 = time.monotonic()
        proc.kill()  # SIGKILL
        with pytest.raises(WeightSyncError, match=rf"receiving a bucket of 64 bytes from the trainer \(rank 0 of the "
                                                  rf"group at 127\.0\.0\.1:{port}\) failed"):
            second.result(timeout=25)
        took = time.monotonic() - t0
        print(f"receiver noticed the killed trainer after {took:.2f}s")
        assert took < 20 and not receiver.ready
        t1 = time.monotonic()
        receiver.shutdown()
        assert time.monotonic() - t1 < 2
    finally:
        proc.kill()
        proc.wait()
        pool.shutdown()
        receiver.shutdown()


def test_a_sync_during_a_generation_is_received_meanwhile_and_swapped_in_after_it(
        server: ServerProc, trainer_side: tuple[Any, Any]) -> None:
    """The server keeps generating while the weights arrive (staged), swaps them in as the
    running batch ends, and that batch's answer is the old weights' own, all of it."""
    model, processor = trainer_side
    # the end-of-turn tokens banned too: every completion is max_tokens long
    bias = logit_bias_for([*banned_token_ids(processor.tokenizer),
                           *end_of_turn_ids(processor.tokenizer, model.generation_config)])
    ex = ColorsEnv().eval_examples(1)[0]
    old = copy.deepcopy(model)
    new = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    body = {"messages": wire_messages(ex.messages), "temperature": 0.0, "max_tokens": 900,
            "n": 8, "logprobs": True, "return_token_ids": True, "logit_bias": bias}
    with WeightSyncClient(server.url, TOKEN, backend="gloo", timeout_s=60) as client:
        client.sync(old.named_parameters(), version=10)
        with cf.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, server.url + contract.ROUTE_CHAT, json=body, timeout=120)
            deadline = time.monotonic() + 30
            while not httpx.get(server.url + contract.ROUTE_HEALTH).json().get("generating"):
                assert time.monotonic() < deadline and not long.done(), "the long generation never started"
                time.sleep(0.01)
            t0 = time.monotonic()
            stats = client.sync(new.named_parameters(), version=11)
            took = time.monotonic() - t0
            info = httpx.get(server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
            assert not long.done(), f"the generation should outlast the sync ({took:.2f}s)"
            assert info["swap_pending"] is True and info["weight_version"] == 10
            r = long.result()
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["weight_version"] == 10
        c = answer["choices"][0]
        ref = forward_logprobs(old, encode(processor, ex.messages), c["token_ids"], 0.0, bias)
        assert c["token_ids"] == ref.argmax(-1).tolist(), "the running batch must keep the old weights to its end"
        info = httpx.get(server.url + contract.ROUTE_WEIGHT_INFO, headers=AUTH).json()
        assert info["weight_version"] == 11 and info["swap_pending"] is False and stats.version == 11
        assert len(c["token_ids"]) == 900
        print(f"hf sync under a running batch: {took * 1000:.0f} ms (staged; swapped in as the batch ended)")
        assert_server_follows(new, processor, server, [ex], logit_bias_for(banned_token_ids(processor.tokenizer)))
        client.sync(model.named_parameters(), version=12)  # the module's other tests expect the model's weights
