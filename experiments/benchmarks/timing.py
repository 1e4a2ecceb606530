"""Timing and memory helpers shared by the benchmarks (one clock, CUDA-synchronised)."""

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch


def timed(fn: Callable[[], Any], device: str, clock: str = "wall") -> float:
    """Seconds one call of `fn` takes under no_grad: wall time, or this process's CPU time (`clock="cpu"`)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = now()
    with torch.no_grad():
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return now() - start


def peak_memory(fn: Callable[[], Any], device: str) -> float | None:
    """Peak CUDA memory (GiB) of one call of `fn`; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def machine(device: str) -> str:
    """Where a benchmark ran, for its header: the GPU's name, or the CPUs, torch's threads and the load average."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return (f"{platform.machine()} x{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average "
            f"{os.getloadavg()[0]:.1f}")


def add_clock_arguments(parser: argparse.ArgumentParser, threads: int | None = None) -> None:
    """--clock (wall or this process's CPU time) and --threads, as every suite takes them."""
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time, or this process's CPU time (robust on a busy machine; CPU only)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch intra-op threads on CPU (default: {threads or 'all'})")


def apply_clock_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse --clock cpu off the CPU; set --threads."""
    if args.clock == "cpu" and getattr(args, "device", "cpu") != "cpu":
        parser.error("--clock cpu: only meaningful with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
