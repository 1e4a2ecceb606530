#!/usr/bin/env bash
# Create a virtual environment (default .venv, or $VENV) and install apt_hf with its test and training extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: a CPU build where one is provided locally, the PyPI build elsewhere.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev,train]" ${TRANSFORMERS_VERSION:+"transformers==$TRANSFORMERS_VERSION"}
"$VENV/bin/python" -c "import apt_hf, torch, transformers; print('apt_hf ready: torch', torch.__version__, '| transformers', transformers.__version__)"
