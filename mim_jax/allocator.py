"""CPU runs keep freed memory in the process, without the user setting anything.

XLA:CPU allocates a step's scratch buffers anew at every step and glibc's default policy hands
large freed blocks back to the OS at once, so every step pays for fresh pages again: ~1M
minor page faults and ~20-30% of a ViT-B step on CPU (BENCHMARKS.md). glibc reads its policy
from MALLOC_* variables only at process start, so the entry points (`python -m mim_jax.main`,
`python -m mim_jax.evaluate`, `python -m mim_jax.benchmark`, the test suite) call
`reexec_with_cpu_allocator()` first: it re-executes the same command line once with the variables set. Importing mim_jax as a library
never re-executes anything.

It does nothing when a MALLOC_* variable is already set (the user's choice wins), when
MIM_JAX_ALLOCATOR=default, off glibc Linux, or when the process will compute on a GPU or TPU
(there the host allocator is not on the step's critical path).
"""
from __future__ import annotations

import os
import platform
import sys

# Never hand freed memory back (trim threshold 64 GiB), never serve blocks by mmap (so freed
# blocks are reused), one arena (XLA's worker threads would otherwise each grow their own).
SETTINGS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_ARENA_MAX": "1",
            "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
# =default: leave glibc's defaults alone; the re-executed process sees =applied.
OPT_OUT = "MIM_JAX_ALLOCATOR"


def _accelerator_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return not set(platforms.split(",")) <= {"cpu"}
    # No explicit platform: JAX picks a GPU / TPU if one is present.
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0"))


def wanted() -> bool:
    """True when this process should run with SETTINGS but does not have them yet."""
    if os.environ.get(OPT_OUT, "").lower() in ("default", "applied"):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False  # set by the user (or by our own re-exec): respected as is
    return not _accelerator_expected()


def reexec_with_cpu_allocator() -> None:
    """Replaces this process by the same command line with SETTINGS in its environment, when
    `wanted()`. Call it before anything heavy is imported; it returns only when not needed."""
    if not wanted():
        return
    argv = list(getattr(sys, "orig_argv", []))
    if len(argv) < 2:  # an embedded interpreter or a REPL: nothing to re-run
        return
    env = dict(os.environ, **SETTINGS)
    env[OPT_OUT] = "applied"  # says why the MALLOC_* variables are there (and stops a loop)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # cannot exec (sandbox, odd interpreter): run on with glibc's defaults
        return
