#!/usr/bin/env bash
# Create a virtual environment (default .venv, or $VENV) and install apt_hf with its test and training extras.
# TRANSFORMERS_VERSION=X installs transformers X instead of the newest supported one. An X outside pyproject.toml's
# range is installed with --no-deps over the usual install: every other package stays as the supported range
# resolves it, and whatever X itself requires beyond that is listed (pip check) with what to do about it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: a CPU build where one is provided locally, the PyPI build elsewhere.
"$VENV/bin/python" -m pip install -q "torch==2.13.0" packaging
if [ -z "${TRANSFORMERS_VERSION:-}" ] || "$VENV/bin/python" scripts/supported_transformers.py contains "$TRANSFORMERS_VERSION"; then
    "$VENV/bin/python" -m pip install -q -e ".[dev,train]" ${TRANSFORMERS_VERSION:+"transformers==$TRANSFORMERS_VERSION"}
else
    echo "WARNING: transformers $TRANSFORMERS_VERSION is outside the range apt_hf is tested with" \
         "(transformers$(python3 scripts/supported_transformers.py spec), pyproject.toml). Installing apt_hf as usual," \
         "then transformers==$TRANSFORMERS_VERSION over it with --no-deps." >&2
    "$VENV/bin/python" -m pip install -q -e ".[dev,train]"
    "$VENV/bin/python" -m pip install -q --no-deps "transformers==$TRANSFORMERS_VERSION"
    unmet="$("$VENV/bin/python" -m pip check 2>/dev/null | grep "^transformers " || true)"
    [ -z "$unmet" ] || echo "WARNING: left unmet: $unmet" >&2
    if grep -q " kernels" <<<"$unmet"; then
        echo "WARNING: without kernels, transformers >= 5.25 fails every from_pretrained ('Kernels are not available')" \
             "unless hub kernels are off: export USE_HUB_KERNELS=0 (or pass use_kernels=False to from_pretrained)." >&2
    fi
fi
"$VENV/bin/python" -c "import apt_hf, torch, transformers; print('apt_hf ready: torch', torch.__version__, '| transformers', transformers.__version__)"
