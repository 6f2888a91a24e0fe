"""Device mesh, partition rules and host-local -> global array assembly (jit + NamedSharding).

The mesh has three axes, sized by `config.mesh`:
- `data`: pure data parallelism; parameters are replicated along it.
- `fsdp`: data parallelism that also shards the parameters, optimizer state and EMA (ZeRO-3 /
  FSDP): each large tensor is split along one dimension divisible by the axis size; XLA
  gathers it where it is used and reduce-scatters its gradient.
- `model`: room for tensor parallelism. Nothing is split along it unless a partition rule
  names it; the batch is not split along it.
The batch is split over `data` x `fsdp`. Partition rules (`config.partition_rules`, regex ->
axis per dimension) take precedence over the automatic FSDP choice.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over both
# Tensors smaller than this stay replicated under FSDP: gathering them costs more latency than
# their memory is worth (biases, norms, the CLS token).
DEFAULT_FSDP_MIN_SIZE = 2 ** 14


def mesh_shape(mesh_cfg, device_count: int) -> tuple:
    """(data, fsdp, model) sizes from {'data': -1, 'fsdp': 1, 'model': 1}; one axis may be -1
    (the rest of the devices). Raises ValueError naming the field."""
    mesh_cfg = dict(mesh_cfg or {})
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.{unknown[0]} is not a mesh axis; the axes are {list(MESH_AXES)}.")
    sizes = {axis: mesh_cfg.get(axis, -1 if axis == DATA_AXIS else 1) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r} must be a positive integer or -1 (the "
                             "devices left over by the other axes).")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh.{free[1]}=-1: only one mesh axis may be -1.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise ValueError(
                f"mesh.{free[0]}=-1 cannot fill {device_count} devices: the other axes "
                f"({', '.join(f'{a}={s}' for a, s in sizes.items() if s != -1)}) multiply to "
                f"{fixed}, which does not divide {device_count}.")
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        axes = ", ".join(f"{a}={s}" for a, s in sizes.items())
        raise ValueError(f"mesh ({axes}) has {fixed} devices but there are {device_count}; "
                         "make the sizes multiply to the device count or set one to -1.")
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
    """A (data, fsdp, model) mesh over every device of every process (default: all data).

    Devices are laid out process-major, so the inner axes (fsdp, model) stay within a host
    where they fit: their collectives are the frequent ones. On TPU the physical topology
    decides the order (mesh_utils), which keeps neighbouring chips on the inner axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    if devices[0].platform == "tpu" and jax.process_count() == 1:
        from jax.experimental import mesh_utils
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_axis_size(mesh: Mesh) -> int:
    """Over how many shards the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def _batch_spec(mesh: Mesh):
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return axes if len(axes) > 1 else axes[0]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes; other axes whole."""
    return NamedSharding(mesh, P(_batch_spec(mesh)))


def micro_batch_sharded(mesh: Mesh) -> NamedSharding:
    """[accum, micro-batch, ...]: the second axis is the one split over the devices."""
    return NamedSharding(mesh, P(None, _batch_spec(mesh)))


def path_name(path) -> str:
    """'params/encoder/blocks_0/attn/qkv/kernel': the name partition rules match and
    checkpoints are checked by (attributes, dict keys and sequence indices alike)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
    """Shard the largest dimension divisible by the fsdp size (replicate if none or small)."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, neg_index = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_index] = FSDP_AXIS
    return P(*spec)


def _rule_spec(spec: Iterable, shape, name: str, mesh: Mesh) -> P:
    spec = tuple(spec)
    if len(spec) > len(shape):
        raise ValueError(f"partition rule {spec!r} for {name} has more entries than the "
                         f"tensor's {len(shape)} dimensions {tuple(shape)}.")
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"partition rule {spec!r} names {unknown[0]!r}, not a mesh axis "
                             f"{list(MESH_AXES)}.")
        n = math.prod(mesh.shape[a] for a in axes)
        if dim % n:
            raise ValueError(f"partition rule {spec!r} splits dimension {dim} of {name} "
                             f"{tuple(shape)} into {n} parts, which does not divide it.")
    return P(*spec)


def partition_spec(name: str, shape, mesh: Mesh, rules=(),
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """The PartitionSpec of one state leaf: the first rule whose regex matches `name`
    (re.search), else the automatic FSDP choice."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            return _rule_spec(spec, shape, name, mesh)
    return _fsdp_spec(tuple(shape), mesh.shape.get(FSDP_AXIS, 1), fsdp_min_size)


def state_shardings(abstract_state, mesh: Mesh, rules=(),
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """A tree of NamedShardings for a (train) state: parameters, optimizer moments and EMA of
    the same tensor get the same layout, scalars are replicated."""
    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(path_name(path), shape, mesh, rules,
                                                  fsdp_min_size))
    return jax.tree_util.tree_map_with_path(one, abstract_state)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying `shardings` (what a restore or an AOT lowering needs)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_tree, shardings)


def global_batch(local_batch, mesh: Mesh):
    """Per-process numpy batch -> a global jax.Array sharded over the batch axes.

    Each process passes its own slice of the global batch; the result has
    process_count x the local leading dimension and lives on every device of the mesh.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def per_device_bytes(tree) -> int:
    """Bytes of `tree` held by one device (the first addressable one): what FSDP saves."""
    device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total


def check_batch_divisible(global_batch_size: int, accum_steps: int, mesh: Mesh,
                          streams: Optional[Mapping[str, int]] = None) -> None:
    """Every micro-batch must split evenly over the batch shards and processes; so must each
    input stream's part of it (`streams`: stream -> examples per step, Objective.stream_sizes),
    which is sharded on its own."""
    n_shards, n_proc = batch_axis_size(mesh), jax.process_count()
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1.")
    parts = [("", global_batch_size)] + [(f" ({n} {stream} examples of it per step)", n)
                                         for stream, n in (streams or {}).items() if n]
    for what, size in parts:
        if size % accum_steps:
            raise ValueError(f"batch_size={global_batch_size}{what} is not divisible by "
                             f"accum_steps={accum_steps}.")
        micro = size // accum_steps
        if micro % n_shards or size % n_proc:
            raise ValueError(
                f"batch_size={global_batch_size}{what} (micro-batch {micro} with accum_steps="
                f"{accum_steps}) is not divisible by the {n_shards} batch shards of the mesh "
                f"(data x fsdp; device count {mesh.devices.size}, {n_proc} processes); use a "
                f"multiple of {n_shards * accum_steps}{' for each stream' if what else ''}.")


def rules_from_config(config) -> tuple:
    """config.partition_rules as ((regex, spec), ...); validated when the state is built."""
    rules = config.get("partition_rules", ()) or ()
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"partition_rules[{i}]={rule!r} must be a (regex, spec) pair, e.g. "
                             "('encoder/.*/kernel', (None, 'fsdp')).")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"partition_rules[{i}] regex {rule[0]!r} is invalid: {e}.") from e
        out.append((rule[0], tuple(rule[1])))
    return tuple(out)


def fsdp_min_size(config) -> int:
    value = config.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"fsdp_min_size={value!r} must be an integer >= 0 (elements).")
    return value
