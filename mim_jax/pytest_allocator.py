"""pytest plugin, loaded by pytest.ini (`-p mim_jax.pytest_allocator`): the test suite runs with
the CPU allocator policy of the entry points (see mim_jax/allocator.py). Loaded with -p, it is
imported before pytest starts capturing output, so the re-executed run prints normally; the
subprocesses that tests start inherit the settings."""
from mim_jax.allocator import reexec_with_cpu_allocator

reexec_with_cpu_allocator()
