"""Timing and memory helpers shared by the benchmark scripts (wall and CPU time, peak memory)."""
from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["peak_mib", "reset_peak", "sync", "timed"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set since `reset_peak` (CPU, Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float, object]:
    """(wall s, CPU s of this process, peak MiB, result); CPU time is the fairer figure on a shared machine.

    On CUDA the wall time comes from CUDA events around `fn` (the GPU's own clock).
    """
    reset_peak(device)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c = time.process_time()
        start.record()
        out = fn()
        end.record()
        sync(device)
        return start.elapsed_time(end) / 1000, time.process_time() - c, peak_mib(device), out
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, peak_mib(device), out
