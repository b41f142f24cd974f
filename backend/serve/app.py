"""The HTTP face of the hf engine: OpenAI-compatible chat plus vLLM's weight-transfer routes.

Routes come from :mod:`backend.contract`. Errors are JSON in OpenAI's shape
``{"error": {"message", "type", "code"}}``; a bad request never disturbs the engine.
Admin routes (weight transfer, pause, caches) need ``Authorization: Bearer <token>``
with the per-run token (``VLMRL_RUN_TOKEN``); a server started without one refuses them
all with 401.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import contract
from backend.auth import admin_refusal
from backend.errors import RequestError, WeightSyncError
from backend.serve.hf_engine import Completion, HFEngine
from backend.serve.protocol import MediaLimits, parse_chat_request

log = logging.getLogger("vlmrl.serve")


def error_response(status: int, message: str, *, etype: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-style JSON error."""
    if etype is None:
        etype = "invalid_request_error" if status < 500 else "server_error"
        if status == 401:
            etype = "authentication_error"
    return JSONResponse({"error": {"message": message, "type": etype, "code": code}}, status_code=status)


def _choice(i: int, c: Completion, engine: HFEngine, want_lp: bool, want_ids: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": i,
        "message": {"role": "assistant", "content": c.text},
        "finish_reason": c.finish_reason,
        "logprobs": None,
    }
    if want_lp:
        content = []
        for k, (tid, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            top = []
            if c.top_logprobs is not None:
                top = [{"token": engine.token_text(t), "logprob": v, "bytes": None} for t, v in c.top_logprobs[k]]
            content.append({"token": engine.token_text(tid), "logprob": lp, "bytes": None, "top_logprobs": top})
        choice["logprobs"] = {"content": content}
    if want_ids:
        choice["token_ids"] = list(c.token_ids)
    return choice


def create_app(engine: HFEngine, *, token: str | None, limits: MediaLimits) -> FastAPI:
    """The FastAPI app serving ``engine``."""
    app = FastAPI(title="vlmrl hf engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, e.status, e.code, e.message)
        return error_response(e.status, e.message, code=e.code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"{type(e).__name__}: {e}", code="internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.middleware("http")
    async def _admin_guard(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        if request.url.path in contract.ADMIN_ROUTES:
            refused = admin_refusal(request.headers.get(contract.TOKEN_HEADER), token)
            if refused is not None:
                code, message = refused
                return error_response(401, message, code=code)
        return await call_next(request)

    async def _json(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return {}
        import json

        try:
            return json.loads(raw)
        except ValueError as e:
            raise RequestError(f"request body is not valid JSON: {e}", code="invalid_json") from None

    # ---------------------------------------------------------------- public

    @app.get(contract.ROUTE_HEALTH)
    async def health() -> JSONResponse:
        ok, info = engine.health()
        return JSONResponse(info, status_code=200 if ok else 503)

    @app.get(contract.ROUTE_MODELS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": 0, "owned_by": "vlmrl",
            "max_model_len": engine.max_model_len,
        }]}

    @app.post(contract.ROUTE_CHAT)
    async def chat(request: Request) -> JSONResponse:
        body = await _json(request)
        if engine.dirty_reason:
            return error_response(503, f"weights inconsistent: {engine.dirty_reason}; waiting for a complete "
                                       "weight update", code="weights_inconsistent")

        def prepare() -> tuple[Any, Any]:
            req = parse_chat_request(body, limits, engine.vocab_size)
            if req.model is not None and req.model != engine.model_name:
                raise RequestError(f"the model `{req.model}` does not exist; this server serves "
                                   f"`{engine.model_name}`", status=404, code="model_not_found")
            prompt = engine.prepare(req.messages, req.images)
            fut = engine.submit(prompt, req.params)
            return req, (prompt, fut)

        with engine.incoming():  # from here until submitted, the batch being gathered waits for it
            req, (prompt, fut) = await run_in_threadpool(prepare)
        try:
            comps, version = await asyncio.wrap_future(fut)
        except Exception as e:  # noqa: BLE001 - the engine failed this batch; it keeps serving
            return error_response(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")
        p = req.params
        resp: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.model_name,
            "choices": [_choice(i, c, engine, p.logprobs, p.return_token_ids) for i, c in enumerate(comps)],
            "usage": {
                "prompt_tokens": len(prompt.prompt_ids),
                "completion_tokens": sum(len(c.token_ids) for c in comps),
                "total_tokens": len(prompt.prompt_ids) + sum(len(c.token_ids) for c in comps),
            },
            "weight_version": version,
        }
        if p.return_token_ids:
            resp["prompt_token_ids"] = list(prompt.prompt_ids)
        return JSONResponse(resp)

    # ---------------------------------------------------------------- admin

    @app.post(contract.ROUTE_INIT_WEIGHT_TRANSFER)
    async def init_transfer(request: Request) -> dict[str, Any]:
        body = await _json(request)
        info = body.get("init_info") if isinstance(body, dict) else None
        if info is None:
            raise RequestError("body must be {\"init_info\": {master_address, master_port, rank_offset, "
                               "world_size}}", code="invalid_init_info")

        def run() -> dict[str, Any]:
            if engine.updating:
                engine.abort_update("a new weight-transfer group replaced an unfinished update")
            try:
                return engine.receiver.init(info)
            except ValueError as e:
                raise RequestError(str(e), code="invalid_init_info") from None

        try:
            return {"ok": True, **(await run_in_threadpool(run))}
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - rendezvous failed (peer gone, timeout)
            log.error("joining the weight-transfer group failed: %s", e)
            return error_response(500, f"joining the weight-transfer group failed: {e}", code="init_failed")

    @app.post(contract.ROUTE_START_WEIGHT_UPDATE)
    async def start_update() -> dict[str, Any]:
        await run_in_threadpool(engine.begin_update)
        return {"ok": True, "weight_version": engine.weight_version}

    @app.post(contract.ROUTE_UPDATE_WEIGHTS)
    async def update_weights(request: Request) -> Any:
        body = await _json(request)
        info = body.get("update_info") if isinstance(body, dict) else None
        if not engine.updating:
            raise RequestError("no weight update in progress: call /start_weight_update first",
                               status=409, code="no_update")

        def run() -> dict[str, Any]:
            try:
                return engine.receiver.receive(info, known=engine.check_weight, layout=engine.layout)
            except ValueError as e:
                # Nothing was received; the trainer gives up on this update (and its group).
                engine.abort_update(f"an update was rejected: {e}")
                raise RequestError(f"invalid update_info: {e}", code="invalid_update_info") from None

        try:
            return {"ok": True, **(await run_in_threadpool(run))}
        except RequestError:
            raise
        except WeightSyncError as e:
            engine.abort_update(str(e))
            log.error("%s", e)
            return error_response(500, str(e), code="transfer_failed")

    @app.post(contract.ROUTE_FINISH_WEIGHT_UPDATE)
    async def finish_update(request: Request) -> Any:
        body = await _json(request)
        version = body.get("weight_version") if isinstance(body, dict) else None
        if isinstance(version, bool) or not isinstance(version, int):
            raise RequestError("body must be {\"weight_version\": <int>}", code="invalid_version")
        if not engine.updating:
            raise RequestError("no weight update in progress: call /start_weight_update first",
                               status=409, code="no_update")
        errors = await run_in_threadpool(engine.end_update, version)
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            log.error("weight update %d failed: %s", version, "; ".join(errors[:5]))
            return JSONResponse({"error": {"message": f"weight update failed: {errors[0]}{more}",
                                           "type": "server_error", "code": "load_failed", "errors": errors[:50]}},
                                status_code=500)
        # Staged while a batch ran: the new weights go in as it ends, before any other batch.
        return {"ok": True, "weight_version": version, "swap_pending": engine.swap_pending}

    @app.get(contract.ROUTE_WEIGHT_INFO)
    async def weight_info() -> dict[str, Any]:
        return engine.weight_info()

    @app.post(contract.ROUTE_PAUSE)
    async def pause(mode: str = "wait") -> dict[str, Any]:
        await run_in_threadpool(engine.pause, "admin", mode)
        return {"ok": True, "paused": True}

    @app.post(contract.ROUTE_RESUME)
    async def resume() -> dict[str, Any]:
        engine.resume("admin")
        return {"ok": True, "paused": engine.paused}

    @app.post(contract.ROUTE_RESET_PREFIX_CACHE)
    async def reset_prefix_cache() -> dict[str, Any]:
        # generate() keeps no cache between requests: nothing can go stale.
        return {"ok": True}

    @app.post(contract.ROUTE_RESET_ENCODER_CACHE)
    async def reset_encoder_cache() -> dict[str, Any]:
        return {"ok": True}

    return app
