"""Benchmarks: stock vs APT in one run, ratios beside the ideal (FLOP-ratio) speedup.

    python scripts/benchmark.py correctness [--help]   # not a timing: every backend against per-image sdpa
    python scripts/benchmark.py processor [--help]
    python scripts/benchmark.py vision [--help]
    python scripts/benchmark.py dense [--help]
    python scripts/benchmark.py llava [--help]
    python scripts/benchmark.py train [--help]
    python scripts/benchmark.py train_vit [--help]

scripts/gpu_check.sh runs the GPU settings of these (and the GPU-only tests) in one command, one table.
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: experiments/ lives there

SUITES = ("correctness", "processor", "vision", "dense", "llava", "train", "train_vit")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in SUITES:
        sys.exit(f"usage: python scripts/benchmark.py {{{','.join(SUITES)}}} [options]")
    importlib.import_module(f"experiments.benchmarks.{sys.argv[1]}").main(sys.argv[2:])
