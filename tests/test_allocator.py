"""The CPU allocator policy that entry points apply by re-executing themselves once."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mim_jax import allocator

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
PRINT_ENV = ("from mim_jax.allocator import reexec_with_cpu_allocator; "
             "reexec_with_cpu_allocator(); import os; "
             "print([os.environ.get(k) for k in ('MALLOC_MMAP_MAX_', 'MALLOC_ARENA_MAX', "
             "'MALLOC_TRIM_THRESHOLD_', 'MIM_JAX_ALLOCATOR')])")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != allocator.OPT_OUT}
    env.update({"JAX_PLATFORMS": "cpu", **extra})
    return env


def _run(env):
    out = subprocess.run([sys.executable, "-c", PRINT_ENV], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC_LINUX, reason="the MALLOC_* policy is glibc's")
def test_entry_point_reexecutes_once_with_the_settings():
    assert _run(_clean_env()) == str(["0", "1", str(64 << 30), "applied"])


@pytest.mark.skipif(not GLIBC_LINUX, reason="the MALLOC_* policy is glibc's")
def test_user_choices_win():
    # Opt-out, a variable the user set, and a process that will compute on a GPU: untouched.
    assert _run(_clean_env(MIM_JAX_ALLOCATOR="default")) == str([None, None, None, "default"])
    assert _run(_clean_env(MALLOC_ARENA_MAX="4")) == str([None, "4", None, None])
    assert _run(_clean_env(JAX_PLATFORMS="cuda")) == str([None, None, None, None])


def test_the_suite_itself_runs_with_the_settings():
    if os.environ.get(allocator.OPT_OUT) != "applied":
        pytest.skip("the allocator policy was not applied to this run (opted out, set by the "
                    "user, or not glibc Linux)")
    for name, value in allocator.SETTINGS.items():
        assert os.environ[name] == value
