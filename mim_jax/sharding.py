"""Device mesh, shardings, and host-local -> global array assembly (jit + NamedSharding)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over every device of every process."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch, mesh: Mesh):
    """Per-process numpy batch -> a global jax.Array sharded over the data axis.

    Each process passes its own slice of the global batch; the result has
    process_count x the local leading dimension and lives on every device of the mesh.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def check_batch_divisible(global_batch_size: int, accum_steps: int, mesh: Mesh) -> None:
    """Every micro-batch must split evenly over the devices and processes."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1.")
    if global_batch_size % accum_steps:
        raise ValueError(f"batch_size={global_batch_size} is not divisible by "
                         f"accum_steps={accum_steps}.")
    micro = global_batch_size // accum_steps
    if micro % n_dev or global_batch_size % n_proc:
        raise ValueError(
            f"batch_size={global_batch_size} (micro-batch {micro} with accum_steps={accum_steps}) "
            f"is not divisible by the device count {n_dev} ({n_proc} processes); use a multiple "
            f"of {n_dev * accum_steps}.")
