"""Benchmark suites behind scripts/benchmark.py; each module exposes main(argv)."""
