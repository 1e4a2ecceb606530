"""Experiments and runners around the apt_hf library (not part of it, not in its wheel): the benchmark suites behind
scripts/benchmark.py and scripts/gpu_check.sh, and the paper's Table 7 in miniature (scripts/reproduce_mini.py).

They import apt_hf like any user; scripts and tests import them from the repository root.
"""
