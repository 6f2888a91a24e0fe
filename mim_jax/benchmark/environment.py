"""The host the benchmark runs on: thread pinning, CPU model, versions and peak memory."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
from typing import Optional

import flax
import jax
import jaxlib
import optax


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def pin_threads(threads: Optional[int]) -> int:
    """Restricts the process to `threads` cores before any runtime builds its thread pool.

    XLA's CPU client sizes its pool from PJRT_NPROC (else the schedulable cores), tf.data and
    PyTorch from the schedulable cores, so pinning makes all three use the same count.
    """
    if threads is None:
        threads = usable_cores()
    elif threads <= 0:
        raise ValueError(f"--threads={threads} must be > 0.")
    elif hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if threads > len(cpus):
            raise ValueError(f"--threads={threads} exceeds the {len(cpus)} usable cores.")
        os.sched_setaffinity(0, cpus[:threads])
    os.environ["PJRT_NPROC"] = str(threads)
    return threads


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict:
    device = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(), "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "backend": device.platform, "device_kind": device.device_kind,
        "device_count": jax.device_count(), "process_count": jax.process_count(),
        "cpu_model": cpu_model(), "cpu_cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(), "threads": threads,
    }


def peak_memory(device) -> dict:
    """Peak device memory, or the process's max RSS as a labelled host fallback."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without allocator stats raise instead of returning None
        stats = {}
    if "peak_bytes_in_use" in stats:
        return {"bytes": int(stats["peak_bytes_in_use"]),
                "source": "device.memory_stats()['peak_bytes_in_use']"}
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale),
            "source": "host process max RSS (no device allocator stats)"}
