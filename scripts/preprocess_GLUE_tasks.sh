#!/usr/bin/env bash
# Offline replacement for fairseq's examples/roberta/preprocess_GLUE_tasks.sh.
#
# usage: scripts/preprocess_GLUE_tasks.sh GLUE_DIR TASK|ALL [--bpe gpt2|wordpiece] [--bpe-dir DIR] [--out DIR]
#                                         [--data-dir D] [--workers N]
#
# Thin wrapper: all parsing, validation, BPE and fairseq-preprocess calls live in
# ibert_plugin/assets/glue.py (python -m ibert_plugin.assets.glue --help). Defaults: --bpe gpt2,
# --bpe-dir <data>/gpt2_bpe (gpt2) or <data>/minilm (wordpiece), --out <data>/glue-bin/<bpe>,
# <data> = $IBERT_DATA_DIR or <repo>/data. Prepare the BPE files first: python -m ibert_plugin.assets build
# Errors print one "error: ..." line and exit non-zero.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"

if [[ $# -lt 2 ]]; then
  echo "usage: $(basename "$0") GLUE_DIR TASK|ALL [--bpe gpt2|wordpiece] [--bpe-dir DIR] [--out DIR]" >&2
  exit 2
fi

# The running venv's python (so its fairseq is used): $PYTHON, else an activated venv, else <repo>/.venv.
if [[ -n "${PYTHON:-}" ]]; then
  PY="${PYTHON}"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="${VIRTUAL_ENV}/bin/python"
elif [[ -x "${REPO_DIR}/.venv/bin/python" ]]; then
  PY="${REPO_DIR}/.venv/bin/python"
else
  PY="python3"
fi

export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PY}" -m ibert_plugin.assets.glue "$@"
