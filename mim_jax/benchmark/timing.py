"""Timing primitives: wall / CPU time of calls, interleaved rounds, summaries and rates."""
from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Callable, Optional, Sequence


def mfu(images_per_sec: float, flops_per_image: float, peak_per_device: Optional[float],
        num_devices: int) -> Optional[float]:
    if not peak_per_device:
        return None
    return images_per_sec * flops_per_image / (peak_per_device * num_devices)


def per_core(images_per_sec: float, cores: int) -> float:
    """Images/s per CPU core of the pool that did the work."""
    if cores <= 0:
        raise ValueError(f"cores={cores} must be > 0.")
    return images_per_sec / cores


def summarize(times: Sequence[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "all_s": [round(t, 6) for t in times]}


def measure_call(fn) -> dict:
    """Wall time, process CPU time (user / kernel) and minor page faults of one call.

    CPU time is less sensitive than wall time to other work on shared cores; kernel time and
    page faults show allocator churn (memory handed back to the OS and faulted in again).
    """
    cpu0, faults0 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    cpu1, faults1 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return {"wall_s": wall, "user_s": cpu1.user - cpu0.user, "sys_s": cpu1.system - cpu0.system,
            "minor_faults": faults1 - faults0}


def measure_each(fn: Callable[[], object], steps: int, warmup: int) -> list:
    """measure_call of each of `steps` calls after `warmup` calls; fn must block on its result."""
    for _ in range(warmup):
        fn()
    return [measure_call(fn) for _ in range(steps)]


def interleaved_calls(fns: dict, steps: int, warmup: int) -> dict:
    """Measures each callable once per round, round after round (A, B, A, B, ...), so that slow
    drift of a shared machine hits both alike. -> {name: [measure_call dicts]}. A callable that
    runs in another process measures itself there: its `measured_call()` returns the same
    figures."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    calls = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            measured = getattr(fn, "measured_call", None)
            calls[name].append(measured() if measured else measure_call(fn))
    return calls


def call_summary(calls: Sequence[dict]) -> dict:
    med = lambda key: statistics.median(c[key] for c in calls)
    cpu = [c["user_s"] + c["sys_s"] for c in calls]
    return dict(summarize([c["wall_s"] for c in calls]), cpu_median_s=statistics.median(cpu),
                cpu_min_s=min(cpu), user_median_s=med("user_s"), sys_median_s=med("sys_s"),
                minor_faults_median=med("minor_faults"))


def paired_ratios(numerator: Sequence[dict], denominator: Sequence[dict], key: str) -> dict:
    """Per-round ratios (adjacent calls share the machine's load), summarised."""
    ratios = [a[key] / b[key] for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

