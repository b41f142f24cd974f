"""Environments: tasks with images and rewards, found by registry id."""

from __future__ import annotations

from typing import Any, Callable

from environments.base import Environment, Example, Score

_REGISTRY: dict[str, Callable[..., Environment]] = {}


def register(env_id: str) -> Callable[[Callable[..., Environment]], Callable[..., Environment]]:
    """Register an environment factory under ``env_id``."""

    def deco(factory: Callable[..., Environment]) -> Callable[..., Environment]:
        _REGISTRY[env_id] = factory
        return factory

    return deco


def available() -> list[str]:
    """Registered environment ids."""
    _load_builtin()
    return sorted(_REGISTRY)


def make_env(env_id: str, args: dict[str, Any] | None = None) -> Environment:
    """Build environment ``env_id`` with ``args`` (the ``[env.args]`` table).

    Raises ``KeyError`` for an unknown id and ``TypeError``/``ValueError`` for bad args.
    """
    _load_builtin()
    if env_id not in _REGISTRY:
        raise KeyError(env_id)
    return _REGISTRY[env_id](**(args or {}))


def _load_builtin() -> None:
    # Deferred so `import environments` stays cheap (the built-ins import numpy and PIL).
    if "colors" not in _REGISTRY:
        from environments import colors

        _REGISTRY["colors"] = colors.make_colors


__all__ = ["Environment", "Example", "Score", "register", "available", "make_env"]
