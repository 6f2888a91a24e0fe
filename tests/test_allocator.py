"""The CPU allocator policy the entry points apply at start-up (mim_jax/allocator.py)."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest

from mim_jax import allocator

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="the policy is glibc's")

# Page faults of allocating, touching and freeing a 256 MiB block, twice.
FAULTS = """
import json, resource, numpy as np
from mim_jax.allocator import apply_cpu_policy

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 << 20, np.float32)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = apply_cpu_policy()
print(json.dumps({"applied": applied, "faults": [faults(), faults()]}))
"""


def _run(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != allocator.OPT_OUT}
    env.update({"JAX_PLATFORMS": "cpu", **extra})
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_freed_memory_is_reused_without_faulting_pages_in_again():
    with_policy, without = _run(), _run(MIM_JAX_ALLOCATOR="default")
    assert with_policy["applied"] and not without["applied"]
    first, again = without["faults"]
    assert again > first / 2  # glibc's defaults: the block's pages are fresh every time
    assert with_policy["faults"][1] < again / 20


@pytest.mark.parametrize("env", [dict(MALLOC_ARENA_MAX="4"), dict(MIM_JAX_ALLOCATOR="default"),
                                 dict(JAX_PLATFORMS="cuda")])
def test_the_users_choice_or_an_accelerator_leaves_glibc_alone(env):
    result = _run(**env)
    assert not result["applied"]
    first, again = result["faults"]
    assert again > first / 2


def test_the_suite_itself_runs_with_the_policy():
    if not allocator.wanted():
        pytest.skip("the policy is off for this run (opted out or MALLOC_* set by the user)")
    assert allocator.apply_cpu_policy()  # applied by conftest.py; a second call is a no-op
    for _ in range(2):  # this thread's faults: the suite's other threads may be working
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = np.ones(64 << 20, np.float32)
        del block
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    # glibc's defaults fault the block in again: 65536 pages of 4 KiB (or 128 of 2 MiB).
    assert faults < 64
