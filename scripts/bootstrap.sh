#!/usr/bin/env bash
# Idempotent install of the ibert_plugin stack into <repo>/.venv: Python 3.11, torch 2.13 CPU, fairseq-fixed 0.12.3.1
# (fairseq 0.12.2 needs patches to build and import on Python 3.11; fairseq-fixed is upstream main plus a Python 3.11
# dataclass fix, built from source against the installed torch) and the pinned requirements.
#
#   scripts/bootstrap.sh            # first run: minutes (fairseq-fixed builds from source); later runs: ~1 s
#   IBERT_BOOTSTRAP_FORCE=1 scripts/bootstrap.sh   # ignore the stamp and re-check everything
#
# Steps, each skipped when already satisfied:
#   1. create .venv with python3.11 (override: PYTHON=/path/to/python3.11)
#   2. torch==2.13.0 first when it is missing (IBERT_TORCH_INDEX_URL adds an extra package index)
#   3. pip install -r requirements.txt            (only when the stamp differs)
#   4. fairseq-fixed==0.12.3.1 --no-build-isolation --no-deps   (only when `import fairseq` fails)
#   5. pip install --no-deps -e .                 (pyproject.toml: ibert_plugin, no dependencies)
# The stamp (.venv/.ibert_bootstrap_stamp) holds the sha256 of requirements.txt + pyproject.toml + setup.py + the
# fairseq pin.
# Works with or without a pip constraints file capping torch (e.g. /etc/xdg/pip/constraints.txt): the pins
# here sit inside such caps and no step asks pip to upgrade torch. torchaudio and xformers are never installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FAIRSEQ_PIN="fairseq-fixed==0.12.3.1"
TORCH_PIN="torch==2.13.0"
VENV="$ROOT/.venv"
STAMP="$VENV/.ibert_bootstrap_stamp"
PYTHON="${PYTHON:-python3.11}"

log() { echo "[bootstrap] $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || { echo "error: $PYTHON not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

want_stamp="$(cat requirements.txt pyproject.toml setup.py | sha256sum | cut -d' ' -f1) $FAIRSEQ_PIN $("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

fast_ok() {
    # Cheap check (no heavy imports): the stamp matches and the key packages are still importable.
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] || return 1
    "$VPY" - <<'PY' || return 1
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in ("torch", "fairseq", "fairseq_cli", "ibert_plugin")) else 1)
PY
}

if [[ -z "${IBERT_BOOTSTRAP_FORCE:-}" ]] && fast_ok; then
    log "up to date ($VENV)"
    exit 0
fi

PIP=("$VPY" -m pip --disable-pip-version-check)

# 2. torch first, so that requirements.txt never makes pip pick a CUDA build on a CPU-only machine.
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" else 1)' 2>/dev/null; then
    # pip's configured sources decide which build arrives (on the project's machines: the local CPU wheel).
    # IBERT_TORCH_INDEX_URL adds an extra index, e.g. a CPU-only wheel index on other machines.
    extra=()
    if [[ -n "${IBERT_TORCH_INDEX_URL:-}" ]]; then
        extra=(--extra-index-url "$IBERT_TORCH_INDEX_URL")
    fi
    log "installing $TORCH_PIN ${extra[*]:-}"
    "${PIP[@]}" install "$TORCH_PIN" "${extra[@]}"
fi

# 3. the pinned runtime requirements (no-op in seconds when satisfied).
log "installing requirements.txt"
"${PIP[@]}" install -q -r requirements.txt

# 4. fairseq-fixed: sdist built against the torch/numpy/Cython already in the venv.
if ! "$VPY" -c 'import fairseq' >/dev/null 2>&1; then
    log "installing $FAIRSEQ_PIN (--no-build-isolation --no-deps; builds from source the first time)"
    "${PIP[@]}" install --no-build-isolation --no-deps "$FAIRSEQ_PIN"
fi

# 5. the plugin itself, editable.
log "installing ibert_plugin (editable, --no-deps)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .

echo "$want_stamp" > "$STAMP"
log "done ($VENV)"
