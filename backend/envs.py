"""The environment of a config, as the trainer and ``vlmrl eval`` take it."""

from __future__ import annotations

from typing import Any

from backend.errors import ConfigError
from environments import Environment, MultiTurnEnvironment, make_env


def build_env(env_id: str, args: dict[str, Any] | None) -> Environment | MultiTurnEnvironment:
    """The environment ``[env] id`` names (single-turn or multi-turn), built with ``[env.args]``.

    Every failure is a :class:`ConfigError` on ``env``: an unknown id, bad arguments, a
    missing optional package (the message names its pip extra).
    """
    try:
        env = make_env(env_id, args)
    except KeyError as e:  # the registry says what it tried (built-ins, then a module of that name)
        detail = e.args[0] if e.args and isinstance(e.args[0], str) and e.args[0] != env_id else None
        raise ConfigError(None, "env.id", detail or f"unknown environment {env_id!r}") from None
    except (TypeError, ValueError, ImportError) as e:
        raise ConfigError(None, "env", f"cannot build environment {env_id!r}: {e}") from None
    if not isinstance(env, (Environment, MultiTurnEnvironment)):
        raise ConfigError(None, "env.id", f"{env_id!r} built a {type(env).__name__}, not an environment")
    return env
