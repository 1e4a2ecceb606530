#!/usr/bin/env bash
# The GPU checks in one command, one markdown table, at most 8 minutes on one H200, no downloads.
#
#   scripts/gpu_check.sh                    # on the GPU machine: tests + benchmarks -> $OUT/gpu_check.md (or outputs/)
#   scripts/gpu_check.sh --dry-run          # anywhere: every step on the CPU with tiny shapes (a rehearsal)
#   scripts/gpu_check.sh --download-wheels  # here, with PyPI: fetch what the GPU machine lacks into build/gpu_wheels
#
# It runs under the machine's own python3 ($PYTHON to choose another). When that python's transformers is outside
# the range pyproject.toml supports (a GPU image may ship an older one), the wheels in $GPU_CHECK_WHEELS (default
# build/gpu_wheels: transformers at the supported floor, from --download-wheels) are installed into a temporary
# folder put first on PYTHONPATH, offline (pip --no-index); apt_hf itself runs from src/, the runners from
# experiments/. Other arguments go to `python -m experiments.benchmarks.gpu_check` (--steps, --output_dir,
# --budget_s; see its --help).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-build/gpu_wheels}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"  # the whole run, setup included
spec="$("$PYTHON" scripts/supported_transformers.py spec)" || exit 1
floor="$("$PYTHON" scripts/supported_transformers.py floor)" || exit 1

if [ "${1:-}" = "--download-wheels" ]; then
    # transformers' other requirements (huggingface-hub, tokenizers, safetensors, ...) are on the GPU image already;
    # name more packages as arguments if a future image lacks one.
    shift
    mkdir -p "$WHEELS"
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "transformers==$floor" "$@"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
supported() {
    "$PYTHON" - "$spec" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet

try:
    found = version("transformers")
except PackageNotFoundError:
    found = None
print(f"transformers here: {found}; apt_hf supports {sys.argv[1]}")
sys.exit(0 if found is not None and found in SpecifierSet(sys.argv[1]) else 1)
EOF
}
if ! supported; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu_check: no wheels in $WHEELS; run 'scripts/gpu_check.sh --download-wheels' where PyPI is reachable" \
             "and bring that folder along" >&2
        exit 1
    fi
    site="$(mktemp -d /tmp/gpu_check_site.XXXXXX)"
    echo "installing $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')into $site (offline)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    supported || { echo "gpu_check: still no supported transformers after installing $WHEELS" >&2; exit 1; }
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # apt_hf from src/, experiments/ from the root
budget=$((LIMIT_S - (SECONDS - started) - 20))  # 20 s for starting python and writing the table
exec "$PYTHON" -m experiments.benchmarks.gpu_check --budget_s "$budget" "$@"
