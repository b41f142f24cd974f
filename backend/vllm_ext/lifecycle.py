"""The hf engine's weight-sync semantics on vLLM's own routes.

Loaded by vLLM with ``--middleware backend.vllm_ext.lifecycle.WeightSyncLifecycleMiddleware``.

vLLM's weight-transfer routes move weights and nothing else. The trainer's
:class:`~backend.weight_sync.WeightSyncClient` expects what the hf engine does around
them, so this ASGI middleware adds it, calling vLLM's own engine client
(``app.state.engine_client``) in-process:

``POST /init_weight_transfer_engine``
    A new trainer connection first closes an update a vanished trainer left open (worker
    extension ``vlmrl_abort_weight_update``) and resumes generation.
``POST /start_weight_update``
    Pause generation (``pause_generation``), then start the update. ``[inference]
    update_pause`` (environment ``VLMRL_UPDATE_PAUSE``) says how: ``wait`` (default) lets
    running requests finish first; ``keep`` freezes them between two engine steps, and at
    the finish they are preempted with the prefix cache reset, so they go on with their
    KV recomputed under the new weights: each token's logprob is that of the weights that
    sampled it (what the trainer's per-token importance ratio needs), and the answer
    carries the version the request started on. Why ``wait`` is the default: vLLM's worker
    runs the model and the weight receive on one thread, so a frozen generation waits out
    the transfer anyway and then pays the recompute; ``keep`` gives fresher tokens, not
    speed. Chat requests that arrive from then on wait here until generation resumes, and
    then run on the new weights.
    vLLM 0.32 queued them itself; vLLM 0.33 answers them 503 ``engine_paused`` while
    paused, which would fail rollouts that overlap a weight sync (``async_level = 1``).
``POST /update_weights``
    When vLLM refuses or breaks off a bucket (bad ``update_info``, failed collective),
    the update is over: resume generation; if earlier buckets changed weights, the server
    is inconsistent (see below) until a complete update.
``POST /finish_weight_update {"weight_version": N}``
    Finish the update; collect the load errors the engine recorded while it kept receiving
    (``vlmrl_weight_sync_report``). No errors: set the version (an int, as the hf engine
    keeps it; vLLM stores it as a string), reset the prefix and encoder caches (stale
    vision embeddings otherwise survive), resume, answer ``{"ok": true, "weight_version":
    N, ...}``. Errors: answer 500 ``load_failed`` with the list, keep the old version; if
    some weights did change, the weights are inconsistent until a complete update:
    ``/health`` answers 503 and chat requests 503, as with the hf engine.
``GET /weight_info``
    vLLM's answer with vlmrl's version (an int; 0 = the weights the server started with),
    plus ``updating``, ``dirty`` and ``group``.
``POST /v1/chat/completions``
    Held while an update is in progress (see ``/start_weight_update``). Non-streaming JSON
    answers carry ``weight_version`` (the version the request started on; a request frozen
    by an update finishes on the new weights), as the hf engine's do.

Imports only the standard library and :mod:`backend.contract`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from backend import contract
from backend.vllm_ext.auth import ASGIApp, Receive, Scope, Send, error_body, send_json

log = logging.getLogger("vllm.vlmrl.lifecycle")  # vLLM's handler and format apply

RPC_REPORT = "vlmrl_weight_sync_report"
RPC_ABORT = "vlmrl_abort_weight_update"
PAUSE_MODES = ("wait", "keep")  # see /start_weight_update


class _Captured:
    """A response produced by the inner app, held back to be inspected or rewritten."""

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None

    async def replay(self, send: Send, body: bytes | None = None) -> None:
        data = self.body if body is None else body
        headers = [(k, v) for k, v in self.headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        parts.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(parts)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one (disconnects)."""
    sent = False

    async def inner() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return ""


class WeightSyncLifecycleMiddleware:
    """Pause/finish/report/version/cache/resume around vLLM's weight-transfer routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # 0 = the weights the server started with (as the hf engine counts); vLLM itself
        # calls that version "default".
        self.version: Any = 0
        self.updating = False
        self.paused = False
        self.dirty: str | None = None
        self._lock = asyncio.Lock()
        # Set while generation runs; cleared from just before our pause until the resume.
        # Chat requests wait on it (vLLM >= 0.33 would refuse them while paused).
        self._generating = asyncio.Event()
        self._generating.set()
        mode = os.environ.get(contract.ENV_UPDATE_PAUSE) or "wait"
        if mode not in PAUSE_MODES:
            raise ValueError(f"{contract.ENV_UPDATE_PAUSE}={mode!r}: expected one of {', '.join(PAUSE_MODES)}")
        self.pause_mode = mode

    # ------------------------------------------------------------------ dispatch
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        key = (scope.get("method", "GET"), scope.get("path", ""))
        handler = {
            ("POST", contract.ROUTE_INIT_WEIGHT_TRANSFER): self._init,
            ("POST", contract.ROUTE_START_WEIGHT_UPDATE): self._start,
            ("POST", contract.ROUTE_UPDATE_WEIGHTS): self._update,
            ("POST", contract.ROUTE_FINISH_WEIGHT_UPDATE): self._finish,
            ("GET", contract.ROUTE_WEIGHT_INFO): self._weight_info,
            ("POST", contract.ROUTE_CHAT): self._chat,
            ("GET", contract.ROUTE_HEALTH): self._health,
        }.get(key)
        if handler is None:
            await self.app(scope, receive, send)
        else:
            await handler(scope, receive, send)

    # ------------------------------------------------------------------ engine helpers
    @staticmethod
    def _engine(scope: Scope) -> Any:
        app = scope.get("app")
        state = getattr(app, "state", None)
        engine = getattr(state, "engine_client", None)
        if engine is None:
            raise RuntimeError("vLLM's engine client is not on app.state (is this a vLLM OpenAI server?)")
        return engine

    async def _rpc(self, engine: Any, method: str) -> list[Any]:
        """A worker-extension call on every worker of every engine; ``[]`` when the extension
        is missing.

        With data parallelism ``AsyncLLM.collective_rpc`` reaches every engine but returns the
        first engine's answers only, so the call goes to each engine core for all of them."""
        every = getattr(getattr(engine, "engine_core", None), "call_utility_all_async", None)
        try:
            if every is not None:
                per_engine = await every("collective_rpc", method, None, (), None)
                return [w for ws in per_engine for w in (ws if isinstance(ws, (list, tuple)) else [ws])]
            res = await engine.collective_rpc(method)
        except Exception as e:  # noqa: BLE001 - the extension is optional for the routes themselves
            log.warning("collective_rpc(%s) failed: %s", method, e)
            return []
        return list(res) if isinstance(res, (list, tuple)) else [res]

    async def _resume(self, engine: Any) -> None:
        try:
            if self.paused:
                await engine.resume_generation()
                self.paused = False
        finally:
            self._generating.set()  # held chat requests go on (to vLLM's error if resume failed)

    async def _reset_caches(self, engine: Any) -> None:
        """Drop every KV block computed with the old weights, also those of requests frozen
        by the pause (preempted: they are recomputed on resume)."""
        try:
            ok = await engine.reset_prefix_cache(reset_running_requests=True)
        except TypeError:  # a vLLM without the argument
            ok = await engine.reset_prefix_cache()
        except Exception as e:  # noqa: BLE001 - vLLM raises when blocks stay held
            log.warning("resetting the prefix cache failed: %s", e)
            ok = None
        if ok is False:
            log.warning("resetting the prefix cache failed (blocks still held)")
        await engine.reset_encoder_cache()

    # ------------------------------------------------------------------ weight sync
    async def _init(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self._engine(scope)
        async with self._lock:
            reports = await self._rpc(engine, RPC_REPORT)
            if any(isinstance(r, dict) and r.get("active") for r in reports):
                changed = any(isinstance(r, dict) and r.get("buckets") for r in reports)
                aborted = await self._rpc(engine, RPC_ABORT)
                log.warning("a new weight-transfer group replaced an unfinished update (closed on %d workers)",
                            sum(bool(a) for a in aborted))
                if changed:
                    self.dirty = "a new weight-transfer group replaced an unfinished update"
                    await self._reset_caches(engine)
            self.updating = False
            await self._resume(engine)
        await self.app(scope, receive, send)

    async def _start(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self._engine(scope)
        async with self._lock:
            if not self.paused:
                self._generating.clear()  # before the pause: vLLM 0.33 refuses requests from its start
                try:
                    await engine.pause_generation(mode=self.pause_mode, clear_cache=False)
                except BaseException:
                    self._generating.set()
                    raise
                self.paused = True
            out = _Captured()
            try:
                await self.app(scope, receive, out.send)
            except BaseException:
                await self._resume(engine)
                raise  # vLLM's outer error handler answers
            if out.status == 200:
                self.updating = True
            else:
                await self._resume(engine)
        await out.replay(send)

    async def _update(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = _Captured()
        try:
            await self.app(scope, receive, out.send)
        except BaseException:
            await self._broke_off(scope)
            raise  # vLLM's outer error handler answers
        if out.status != 200:
            await self._broke_off(scope)
        await out.replay(send)

    async def _broke_off(self, scope: Scope) -> None:
        """vLLM ended the update (a bad update_info or a failed collective): resume, and if
        weights already changed they are inconsistent until a complete update."""
        engine = self._engine(scope)
        async with self._lock:
            reports = [r for r in await self._rpc(engine, RPC_REPORT) if isinstance(r, dict)]
            if self.updating and any(r.get("buckets") for r in reports):
                self.dirty = "a weight update broke off after some weights had changed"
                await self._reset_caches(engine)
            self.updating = False
            await self._resume(engine)

    async def _finish(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self._engine(scope)
        raw = await _read_body(receive)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        version = body.get("weight_version") if isinstance(body, dict) else None
        if not isinstance(body, dict) or isinstance(version, bool) or not isinstance(version, (int, str, type(None))):
            await send_json(send, 400, error_body('body must be {"weight_version": <int>}', code="invalid_version",
                                                  etype="invalid_request_error"))
            return
        async with self._lock:
            # The version is set below, only once the load is known to be complete.
            out = _Captured()
            try:
                await self.app(scope, _replaying(b"{}", receive), out.send)
            except BaseException:
                self.updating = False
                await self._resume(engine)
                raise  # vLLM's outer error handler answers
            self.updating = False
            if out.status != 200:
                await self._resume(engine)
                await out.replay(send)
                return
            reports = [r for r in await self._rpc(engine, RPC_REPORT) if isinstance(r, dict)]
            errors = [str(e) for r in reports for e in r.get("errors", [])]
            stats = {k: max((r.get(k, 0) for r in reports), default=0)
                     for k in ("buckets", "tensors", "bytes", "receive_s", "load_s")}
            if errors:
                if stats["buckets"]:
                    self.dirty = f"the last update failed ({errors[0]})"
                await self._reset_caches(engine)
                await self._resume(engine)
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                log.error("weight update %s failed: %s", version, "; ".join(errors[:5]))
                err = error_body(f"weight update failed: {errors[0]}{more}", code="load_failed", etype="server_error")
                err["error"]["errors"] = errors[:50]
                await send_json(send, 500, err)
                return
            if version is not None:
                await engine.update_weight_version(str(version))
                self.version = version
            self.dirty = None
            await self._reset_caches(engine)
            await self._resume(engine)
        await send_json(send, 200, {"ok": True, "weight_version": self.version, **stats})

    async def _weight_info(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self._engine(scope)
        out = _Captured()
        await self.app(scope, receive, out.send)
        data = out.json()
        if out.status != 200 or not isinstance(data, dict):
            await out.replay(send)
            return
        reports = [r for r in await self._rpc(engine, RPC_REPORT) if isinstance(r, dict)]
        first = reports[0] if reports else {}
        data["vllm_weight_version"] = data.get("weight_version")  # vLLM's own string ("default", "3")
        data["weight_version"] = self.version
        data.update(
            engine="vllm",
            init_probe=True,  # the engine joins the trainer's warm-up broadcast (init_info "probe")
            ordered_updates=False,  # one /update_weights call at a time (no bucket_index pipelining)
            updating=self.updating,
            paused=self.paused,
            dirty=self.dirty,
            group={
                "joined": bool(first.get("connected")),
                "rank": first.get("rank", -1),
                "world_size": first.get("world_size", 0),
                "backend": first.get("transport"),
                "server_ranks": len(reports),
            },
        )
        await out.replay(send, json.dumps(data).encode())

    # ------------------------------------------------------------------ serving
    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.dirty:
            await send_json(send, 503, {"status": "unavailable", "engine": "vllm",
                                        "reason": f"weights inconsistent: {self.dirty}; a complete weight update "
                                                  "is needed", "weight_version": self.version})
            return
        await self.app(scope, receive, send)

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generating.wait()  # an update is in progress: run on its weights
        if self.dirty:
            await send_json(send, 503, error_body(f"weights inconsistent: {self.dirty}; a complete weight update "
                                                  "is needed", code="weights_inconsistent", etype="server_error"))
            return
        version = self.version
        state: dict[str, Any] = {"buffer": None}

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                ctype = _header(list(message.get("headers", [])), b"content-type")
                if message.get("status") == 200 and ctype.startswith("application/json"):
                    state["buffer"] = _Captured()  # a whole JSON answer: add the version
                    await state["buffer"].send(message)
                    return
                await send(message)
                return
            buf = state["buffer"]
            if buf is None or message["type"] != "http.response.body":
                await send(message)
                return
            await buf.send(message)
            if message.get("more_body", False):
                return
            data = buf.json()
            if isinstance(data, dict) and "choices" in data:
                data.setdefault("weight_version", version)
                await buf.replay(send, json.dumps(data).encode())
            else:
                await buf.replay(send)

        await self.app(scope, receive, wrapped)
