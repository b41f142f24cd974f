"""Environments from importable modules: the ``[env] id`` that is not built in.

The id names a module (dashes become underscores, as in ``vf.load_environment``) exposing
``load_environment(**env.args)``. It may return a vlmrl environment, or an environment of
verifiers' classic API, which the adapters in :mod:`environments.verifiers_env` (single-turn)
and :mod:`environments.verifiers_multiturn` (multi-turn) wrap.
"""

from __future__ import annotations

import importlib
from typing import Any

from environments.base import Environment, MultiTurnEnvironment
from environments.verifiers_env import INSTALL_HINT, MAX_TURNS_ARG, VerifiersEnvironment, _check_classic
from environments.verifiers_multiturn import VerifiersMultiTurnEnvironment


def module_name(env_id: str) -> str:
    """The module an environment id names (verifiers' convention: ``a-b`` -> ``a_b``)."""
    return env_id.replace("-", "_").split("/")[-1]


def load_module_env(env_id: str, args: dict[str, Any], builtins: list[str]) -> Environment | MultiTurnEnvironment:
    """Import ``env_id`` as a module and build its environment with ``load_environment(**args)``.

    ``KeyError`` when there is no such module, ``ValueError`` when it has no
    ``load_environment`` or gives something vlmrl cannot run, ``ImportError`` (naming the pip
    extra) when it needs ``verifiers`` and that is not installed. ``args`` may hold
    :data:`MAX_TURNS_ARG` for a multi-turn verifiers environment.
    """
    name = module_name(env_id)
    if not name.replace(".", "_").isidentifier():
        raise KeyError(f"{env_id!r} is neither a built-in environment ({', '.join(builtins)}) nor a module name")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if name == missing or name.startswith(missing + "."):
            raise KeyError(f"{env_id!r} is neither a built-in environment ({', '.join(builtins)}) "
                           f"nor an importable module {name!r}") from None
        if missing.split(".")[0] == "verifiers":
            raise ImportError(f"environment module {name!r} needs verifiers: {INSTALL_HINT}") from None
        raise ImportError(f"environment module {name!r} needs {missing!r}, which is not installed") from None
    load = getattr(module, "load_environment", None)
    if not callable(load):
        raise ValueError(f"module {name!r} has no load_environment(); an [env] id that is not built in must name "
                         "a module exposing load_environment(**args)")
    args = dict(args)
    cap = args.pop(MAX_TURNS_ARG, None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"{MAX_TURNS_ARG} must be an integer >= 1, got {cap!r}")
    env = load(**args)
    if isinstance(env, (Environment, MultiTurnEnvironment)):
        multi_turn = False
    else:
        multi_turn = _check_classic(env, env_id)
    if multi_turn:
        return VerifiersMultiTurnEnvironment(env, env_id=env_id, max_turns=cap)
    if cap is not None:
        raise ValueError(f"{MAX_TURNS_ARG} applies to multi-turn verifiers environments only; {env_id!r} "
                         f"built a single-turn {type(env).__name__}")
    return env if isinstance(env, (Environment, MultiTurnEnvironment)) else VerifiersEnvironment(env, env_id=env_id)
