"""Per-run token on vLLM's admin and development routes.

Loaded by vLLM with ``--middleware backend.vllm_ext.auth.AdminTokenMiddleware``.

With ``VLLM_SERVER_DEV_MODE=1`` vLLM serves its weight-transfer routes and more:
``/collective_rpc`` (call any worker method), ``/sleep``, ``/reset_*``, ... None of them
check a token. This ASGI middleware lets through, without a token, only the routes a
rollout client and a health probe need (:data:`PUBLIC_ROUTES`); every other route,
among them all of :data:`backend.contract.ADMIN_ROUTES`, needs ``Authorization: Bearer
$VLMRL_RUN_TOKEN`` and is refused with 401 otherwise, like the hf engine does. A server
started without a token refuses them all.

Imports only the standard library and :mod:`backend.contract`; the token is read from the
environment once, when vLLM builds the app (vLLM instantiates middleware classes with no
arguments).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from typing import Any, Awaitable, Callable

from backend import contract

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


def token_ok(header_value: str | None, token: str) -> bool:
    """``header_value`` is ``Bearer <token>`` (constant-time comparison)."""
    if not header_value:
        return False
    scheme, _, value = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


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
        if not self.token:
            problem = error_body(
                f"admin routes are disabled: the server was started without {contract.ENV_RUN_TOKEN}",
                code="no_token_configured",
            )
        elif not token_ok(header, self.token):
            problem = error_body(
                f"missing or wrong run token ({contract.TOKEN_HEADER}: Bearer ${contract.ENV_RUN_TOKEN})",
                code="bad_token",
            )
        else:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_json(send, 401, problem, [(b"www-authenticate", b"Bearer")])
