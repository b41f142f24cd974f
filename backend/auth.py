"""The per-run Bearer token on admin routes: one check and one wording for both engines.

The hf engine's app and vLLM's token middleware both call :func:`admin_refusal`. Imports
only the standard library and :mod:`backend.contract`: it runs inside vLLM's venv too.
"""

from __future__ import annotations

import hmac

from backend import contract

#: (error code, message) when the server has no token to check against
NO_TOKEN: tuple[str, str] = (
    "no_token_configured",
    f"admin routes are disabled: the server was started without {contract.ENV_RUN_TOKEN}",
)
#: (error code, message) when the request's token is missing or wrong
BAD_TOKEN: tuple[str, str] = (
    "bad_token",
    f"missing or wrong run token ({contract.TOKEN_HEADER}: Bearer ${contract.ENV_RUN_TOKEN})",
)


def token_ok(header_value: str | None, token: str) -> bool:
    """``header_value`` is ``Bearer <token>`` (constant-time comparison)."""
    if not header_value:
        return False
    scheme, _, value = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def admin_refusal(header_value: str | None, token: str | None) -> tuple[str, str] | None:
    """Why a request to an admin route is refused, as ``(code, message)``; None lets it in.

    ``header_value`` is the request's ``Authorization`` header, ``token`` the server's
    run token (a server without one refuses every admin request).
    """
    if not token:
        return NO_TOKEN
    if not token_ok(header_value, token):
        return BAD_TOKEN
    return None
