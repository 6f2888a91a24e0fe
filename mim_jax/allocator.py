"""CPU runs keep freed memory in the process, without the user setting anything.

XLA:CPU allocates a step's scratch buffers anew at every step, and glibc's default policy serves
large blocks with mmap and hands them back to the OS when they are freed, so every step pays
for fresh pages again: the float32 MAE ViT-B/16 step at batch 16 took 889k minor page faults
and 58% more time without the policy, none with it (docs/performance.md). The entry points
(`python -m mim_jax.main`, `mim_jax.evaluate`, `mim_jax.aot`, `mim_jax.benchmark`, the test
suite) call `apply_cpu_policy()` once at start-up: glibc's mallopt takes the settings that the
MALLOC_* variables would give at process start. Importing mim_jax as a library changes nothing.

It does nothing when a MALLOC_* variable is set (the user's choice wins), when
MIM_JAX_ALLOCATOR=default, off glibc Linux, or when the process will compute on a GPU or TPU
(there the host allocator is not on the step's critical path).
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h). Setting any of them also turns off glibc's dynamic
# mmap threshold, as the MALLOC_* variables do.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# Never serve blocks by mmap (so freed blocks are reused), one arena (XLA's worker threads
# would otherwise each grow their own), never hand freed memory back (-1: trimming off).
SETTINGS = ((M_MMAP_MAX, 0), (M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, -1))
OPT_OUT = "MIM_JAX_ALLOCATOR"  # =default: leave glibc's defaults alone

_applied = False


def _accelerator_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return not set(platforms.split(",")) <= {"cpu"}
    # No explicit platform: JAX picks a GPU / TPU if one is present.
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0"))


def wanted() -> bool:
    """True when this process should run with SETTINGS."""
    if os.environ.get(OPT_OUT, "").lower() == "default":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False  # set by the user: respected as is
    return not _accelerator_expected()


def apply_cpu_policy() -> bool:
    """Sets SETTINGS with glibc's mallopt when `wanted()`; -> whether they are in force. Call it
    before anything heavy is imported (threads started later share the one arena); a second
    call does nothing."""
    global _applied
    if not _applied and wanted():
        mallopt = ctypes.CDLL(None).mallopt  # glibc's, found through the process's symbols
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        _applied = all([mallopt(param, value) == 1 for param, value in SETTINGS])
    return _applied
