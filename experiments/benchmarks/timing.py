"""Timing and memory helpers shared by the benchmarks (one clock, CUDA-synchronised)."""

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
