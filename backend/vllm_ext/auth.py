"""Per-run token on vLLM's admin and development routes.

Loaded by vLLM with ``--middleware backend.vllm_ext.auth.AdminTokenMiddleware``.

With ``VLLM_SERVER_DEV_MODE=1`` vLLM serves its weight-transfer routes and more:
``/collective_rpc`` (call any worker method), ``/sleep``, ``/reset_*``, ... None of them
check a token. This ASGI middleware lets through, without a token, only the routes a
rollout client and a health probe need (:data:`PUBLIC_ROUTES`); every other route,
among them all of :data:`backend.contract.ADMIN_ROUTES`, needs ``Authorization: Bearer
$VLMRL_RUN_TOKEN`` and is refused with 401 otherwise, like the hf engine does. A server
started without a token refuses them all.

The check and the wording of the refusals are :mod:`backend.auth`'s, shared with the hf
engine. Imports only the standard library, :mod:`backend.contract` and
:mod:`backend.auth`; the token is read from the environment once, when vLLM builds the
app (vLLM instantiates middleware classes with no arguments).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Awaitable, Callable

from backend import contract
from backend.auth import admin_refusal, token_ok

__all__ = ["ASGIApp", "AdminTokenMiddleware", "PUBLIC_ROUTES", "Receive", "Scope", "Send", "error_body",
           "needs_token", "send_json", "token_ok"]

log = logging.getLogger("vllm.vlmrl.auth")  # vLLM's handler and format apply

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: reachable without the token: inference, health and read-only server facts
PUBLIC_ROUTES: frozenset[str] = frozenset(
    {
        contract.ROUTE_HEALTH,
        contract.ROUTE_MODELS,
        contract.ROUTE_CHAT,
        "/v1/completions",
        "/ping",
        "/version",
        "/load",
        "/metrics",
        "/tokenize",
        "/detokenize",
    }
)


def needs_token(path: str) -> bool:
    """Whether ``path`` is guarded (everything that is not exactly a public route)."""
    if path in contract.ADMIN_ROUTES:
        return True
    return path not in PUBLIC_ROUTES


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer an HTTP request with a JSON body."""
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs.extend(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def error_body(message: str, *, code: str, etype: str = "authentication_error") -> dict[str, Any]:
    """OpenAI's error shape (what the hf engine answers too)."""
    return {"error": {"message": message, "type": etype, "code": code}}


class AdminTokenMiddleware:
    """Refuse guarded routes without the run token (401), pass everything else through."""

    def __init__(self, app: ASGIApp, token: str | None = None) -> None:
        self.app = app
        self.token = token if token is not None else (os.environ.get(contract.ENV_RUN_TOKEN) or None)
        if not self.token:
            log.warning("%s is not set: admin routes are refused", contract.ENV_RUN_TOKEN)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket") or not needs_token(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        header = None
        wanted = contract.TOKEN_HEADER.lower().encode()
        for k, v in scope.get("headers", []):
            if k.lower() == wanted:
                header = v.decode("latin-1")
                break
        refused = admin_refusal(header, self.token)
        if refused is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        code, message = refused
        await send_json(send, 401, error_body(message, code=code), [(b"www-authenticate", b"Bearer")])
