"""Environments: tasks with images and rewards, found by registry id."""

from __future__ import annotations

from typing import Any, Callable

from environments.base import Environment, Episode, Example, MultiTurnEnvironment, Score, Transition

AnyEnvironment = Environment | MultiTurnEnvironment
Factory = Callable[..., AnyEnvironment]

_REGISTRY: dict[str, Factory] = {}


def register(env_id: str) -> Callable[[Factory], Factory]:
    """Register an environment factory under ``env_id``."""

    def deco(factory: Factory) -> Factory:
        _REGISTRY[env_id] = factory
        return factory

    return deco


def available() -> list[str]:
    """Registered environment ids."""
    _load_builtin()
    return sorted(_REGISTRY)


def make_env(env_id: str, args: dict[str, Any] | None = None) -> AnyEnvironment:
    """Build environment ``env_id`` with ``args`` (the ``[env.args]`` table).

    Single-turn ids give an :class:`Environment`, games a :class:`MultiTurnEnvironment`.
    An id that is not registered is imported as a module exposing ``load_environment(**args)``
    (dashes -> underscores, the ``verifiers`` convention); a verifiers environment it returns
    is wrapped (:mod:`environments.verifiers_env`). Raises ``KeyError`` for an unknown id (no
    such module either), ``TypeError``/``ValueError`` for bad args or a module without
    ``load_environment`` and ``ImportError`` (naming the pip extra) when an optional package
    is missing.
    """
    _load_builtin()
    if env_id not in _REGISTRY:
        from environments.modules import load_module_env

        return load_module_env(env_id, args or {}, builtins=sorted(_REGISTRY))
    return _REGISTRY[env_id](**(args or {}))


def _load_builtin() -> None:
    # Deferred so `import environments` stays cheap (the built-ins import numpy and PIL).
    if "colors" not in _REGISTRY:
        from environments import colors

        _REGISTRY["colors"] = colors.make_colors
    if "crafter" not in _REGISTRY:
        # environments.crafter imports the optional `crafter` package only when an env is made.
        from environments import crafter

        _REGISTRY["crafter"] = crafter.make_crafter


__all__ = [
    "AnyEnvironment", "Environment", "Episode", "Example", "MultiTurnEnvironment", "Score", "Transition",
    "register", "available", "make_env",
]
