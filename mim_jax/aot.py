"""Ahead-of-time check of a TPU pod on a machine without TPUs.

  python -m mim_jax.aot --config configs/mae.py --topology v5e:4x4 [--per_chip_batch 64]
      [--find_max_batch] [--config.FIELD=VALUE ...]

Compiles the config's real train step (pretraining, or fine-tuning / linear probing with a
config.finetune block) for every chip of the named TPU topology, with the config's mesh,
partition rules, dtype, remat and accumulation, and prints what one chip holds: arguments
(the sharded train state and batch), temporaries, outputs, the total against the chip's HBM,
whether it fits, and the compiled FLOPs per step. --find_max_batch searches the largest
per-chip batch that fits, among the batches the objective can split (batch_unit). It needs
libtpu (`pip install -e ".[tpu]"`), which describes the pod's devices
(jax.experimental.topologies); nothing runs, so no TPU is needed, nor the data and weight
files the run would read. The cost model's time estimates are not reported: they are not
trustworthy without a chip.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Optional

if __name__ == "__main__":  # first: before anything starts threads (mim_jax/allocator.py)
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()

import os

# No TPU is used, only described: several checks may run at once (libtpu otherwise allows one
# process per machine), and there is no TPU VM metadata server to ask.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax.errors import ConfigError, RunError, one_line

# HBM of one chip, by a lower-case substring of device_kind; the first match wins.
HBM_BYTES_TABLE = (
    ("tpu v6 lite", 32 << 30),  # v6e
    ("tpu v6e", 32 << 30),
    ("tpu v5 lite", 16 << 30),  # v5e
    ("tpu v5e", 16 << 30),
    ("tpu v5p", 95 << 30),
    ("tpu v5", 95 << 30),  # v5p reports itself as "TPU v5"
    ("tpu v4", 32 << 30),
    ("tpu v3", 32 << 30),  # two cores of 16 GiB, each its own device
)


def hbm_bytes(device_kind: str) -> Optional[int]:
    kind = device_kind.lower()
    for key, value in HBM_BYTES_TABLE:
        if key in kind:
            return value
    return None


def hbm_per_device(devices) -> Optional[int]:
    """HBM of one device: the chip's, split between its cores when each core is a device."""
    chip = hbm_bytes(devices[0].device_kind)
    cores = 1 + max(getattr(d, "core_on_chip", 0) or 0 for d in devices)
    return None if chip is None else chip // cores


@dataclasses.dataclass
class CompiledStep:
    per_chip_batch: int
    global_batch: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    flops: Optional[float]  # per chip per step, from XLA's cost analysis
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        # Donated state buffers are reused for the outputs (aliases): count them once.
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.generated_code_bytes)


def topology_devices(topology: str):
    """The devices of a TPU topology such as 'v5e:4x4' or 'v5p:4x4x4', without TPUs."""
    # Cloud TPU v4 runs its two TensorCores per chip as one device (megacore); libtpu
    # describes them as two devices unless asked.
    options = {"chip_config_name": "megacore"} if topology.lower().startswith("v4") else {}
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        raise RunError(f"--topology={topology!r} cannot be described: {one_line(e)[:300]} "
                       "(needs libtpu: pip install -e \".[tpu]\"; names look like v4:2x2x2, "
                       "v5e:4x4, v5p:4x4x4, v6e:8x8).") from e
    return list(desc.devices)


def _objective(config, devices, global_batch: int):
    """(config at `global_batch`, its objective): every config check, for the pod."""
    from mim_jax import train

    config = train.without_text_data(config.copy_and_resolve_references())
    config.batch_size = global_batch
    n_processes = max(d.process_index for d in devices) + 1
    return config, train.validate_config(config, device_count=len(devices),
                                         process_count=n_processes, check_data_dir=False)


def batch_unit(config, devices) -> int:
    """The per-chip batches the step takes are the multiples of this: the objective's batch
    multiple (BEiT-3: images, texts and pairs in objective.mix's shares) times accum_steps,
    so that every stream's micro-batch splits evenly over the batch shards."""
    config, objective = _objective(config, devices, config.batch_size)
    return objective.batch_multiple * config.get("accum_steps", 1)


def compile_train_step(config, devices, per_chip_batch: int) -> CompiledStep:
    """Lowers and compiles the train step of `config` for `devices` at `per_chip_batch`."""
    import jax
    import jax.numpy as jnp

    from mim_jax import optim, sharding, train

    mesh = sharding.make_mesh(config.get("mesh"), devices)
    global_batch = per_chip_batch * sharding.batch_axis_size(mesh)
    config, objective = _objective(config, devices, global_batch)
    accum = config.get("accum_steps", 1)
    sharding.check_batch_divisible(global_batch, accum, mesh,  # ValueError naming the fields
                                   objective.stream_sizes(global_batch))
    base_rng = jax.random.key(config.seed)
    init_rng, step_rng, _ = jax.random.split(base_rng, 3)
    abstract_state = train.abstract_train_state(config, objective, init_rng)
    state_sh = train.make_state_shardings(config, abstract_state, mesh)
    schedule = optim.make_schedule(1e-3, 1000, 10)  # values do not change the program
    abstract_params = abstract_state.params
    tx = optim.make_optimizer(config.optimizer, schedule, abstract_params)
    step = train.make_train_step(objective, tx, schedule, accum, step_rng, mesh,
                                 data_cfg=config.data)
    rows = sharding.batch_sharded(mesh)
    batch = {name: jax.ShapeDtypeStruct(field.shape, field.dtype, sharding=rows)
             for name, field in objective.batch_fields(global_batch).items()}
    jitted = jax.jit(step, in_shardings=(state_sh, rows),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = jitted.lower(sharding.with_shardings(abstract_state, state_sh), batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return CompiledStep(
        per_chip_batch=per_chip_batch, global_batch=global_batch,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float(cost["flops"]) if cost and "flops" in cost else None,
        compile_seconds=seconds)


def out_of_memory(error: Exception) -> Optional[str]:
    """XLA's own line when `error` is its refusal of a program larger than the chip
    (RESOURCE_EXHAUSTED, with the bytes it needed), else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    return one_line(text).split("RESOURCE_EXHAUSTED:", 1)[-1].strip()


def _compile_or_refusal(config, devices, batch) -> tuple:
    """(CompiledStep, None), or (None, XLA's line) when XLA refuses the batch for the chip's
    memory; any other compile error propagates."""
    try:
        return compile_train_step(config, devices, batch), None
    except Exception as e:
        refusal = out_of_memory(e)
        if refusal is None:
            raise
        return None, refusal


def _fits(config, devices, batch, hbm) -> tuple:
    """(fits?, CompiledStep or None): a compile that runs out of memory does not fit."""
    step, refusal = _compile_or_refusal(config, devices, batch)
    if refusal is not None:
        return False, None
    return (hbm is None or step.total_bytes <= hbm), step


def find_max_batch(config, devices, hbm: int, start: int = 8, report=print, max_compiles=12,
                   tolerance: float = 1 / 16, bytes_per_image: Optional[float] = None,
                   compiles: Optional[list] = None, unit: int = 1, on_compile=None):
    """Largest per-chip batch that fits, within `tolerance` (batch // 16 by default):
    (batch, CompiledStep, smallest batch found not to fit or None). After `max_compiles` the
    bracket may be wider. Only multiples of `unit` (batch_unit) are compiled.

    A step's memory grows linearly with the batch, so after two compiles a straight line
    through the last two points guesses the answer (after one compile, a line of slope
    `bytes_per_image` when given, e.g. from the same model on another chip); each guess is
    then checked by compiling it, and the bracket [largest fit, smallest misfit] closes in a
    few compiles (a compile of ViT-B takes minutes on a CPU). `compiles`, when given, gets
    (batch, total bytes or None when out of memory, compile seconds or None) per compile.
    Entries already in it (a stopped search of the same step and chip) count as compiled: the
    search goes on from them instead of from `start`, and the step returned is None when the
    largest fit is one of them. `on_compile`, when given, is called with each new entry as its
    compile ends (to record a long search as it goes)."""
    # The search counts in units: `low`, `high`, `n` and the points' batches are multiples.
    points = []  # (units, total bytes) of every step that compiled
    low, low_step, high = 0, None, None
    for batch, total, _ in compiles or ():
        if total is not None:
            points.append((batch // unit, total))
        if total is not None and total <= hbm:
            low = max(low, batch // unit)
        else:
            high = batch // unit if high is None else min(high, batch // unit)
    slope = bytes_per_image * unit if bytes_per_image else None
    if not compiles:
        n = max(1, start // unit)
    elif high is not None and high - low <= max(1, int(low * tolerance)):
        n = None  # the earlier compiles already bracket the answer
    else:
        n = _next_guess(points, low, high, hbm, tolerance, slope)
    for _ in range(max_compiles if n else 0):
        batch = n * unit
        ok, step = _fits(config, devices, batch, hbm)
        entry = (batch, step.total_bytes, step.compile_seconds) if step else (batch, None, None)
        if compiles is not None:
            compiles.append(entry)
        if on_compile is not None:
            on_compile(entry)
        report(_row(step, hbm) if step else f"  per-chip batch {batch}: does not compile "
               "(out of memory)")
        if step is not None:
            points.append((n, step.total_bytes))
        if ok:
            low, low_step = n, step
        else:
            high = n if high is None else min(high, n)
        if high is not None and high - low <= max(1, int(low * tolerance)):
            break
        n = _next_guess(points, low, high, hbm, tolerance, slope)
        if n is None:
            break
    return low * unit, low_step, None if high is None else high * unit


def _next_guess(points, low: int, high: Optional[int], hbm: int, tolerance: float = 1 / 16,
                bytes_per_image: Optional[float] = None) -> Optional[int]:
    """The next batch to compile. While nothing has failed: where the line through the last
    two compiled points meets `hbm` (at least low + `tolerance`), or 2 x low. Once bracketed
    by (low, high): that line's guess kept within the bracket's middle half, so the bracket
    shrinks to at most 3/4 each time (XLA's own remat bends or flattens the line), or the
    bracket's middle when there is no line or it aims at or past `high`. None when no batch
    is left to try."""
    step = max(1, int(low * tolerance))
    lower = low + step if low else 1
    guess = None
    distinct = sorted(set(points))
    if len(distinct) >= 2:
        (b1, t1), (b2, t2) = distinct[-2], distinct[-1]
        if b2 != b1 and t2 > t1:
            guess = int(b2 + (hbm - t2) * (b2 - b1) / (t2 - t1))
    elif len(distinct) == 1 and bytes_per_image:
        (b1, t1), = distinct
        guess = int(b1 + (hbm - t1) / bytes_per_image)
    if high is None:
        if guess is not None:  # below `lower`: check the edge the line predicts; above
            # 4 x low: the line is near flat (XLA's own remat), do not leap past the answer
            return min(max(guess, lower), 4 * low) if low else max(guess, 1)
        return max(2 * low, lower) if low else 1
    upper = high - 1
    if upper < lower:
        return None
    quarter = (high - low) // 4
    inner_low, inner_high = max(lower, low + quarter), min(upper, high - quarter)
    # A line that aims at or past a batch already found not to fit has been contradicted
    # there (XLA's own remat flattened it): bisect instead of following it to the edge.
    if guess is None or guess >= high or inner_low > inner_high:
        guess = (low + high) // 2
    else:
        guess = min(max(guess, inner_low), inner_high)
    return min(max(guess, lower), upper)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _row(step: CompiledStep, hbm: Optional[int]) -> str:
    fits = "" if hbm is None else ("  fits" if step.total_bytes <= hbm else "  DOES NOT FIT")
    flops = ""
    if step.flops:
        flops = (f", {step.flops / 1e12:.2f} TFLOP" if step.flops >= 1e11 else
                 f", {step.flops / 1e9:.3f} GFLOP") + " per step per chip"
    return (f"  per-chip batch {step.per_chip_batch} (global {step.global_batch}): arguments "
            f"{_gib(step.argument_bytes)}, temporaries {_gib(step.temp_bytes)}, outputs "
            f"{_gib(step.output_bytes)} (aliased {_gib(step.alias_bytes)}), total "
            f"{_gib(step.total_bytes)}{'' if hbm is None else ' of ' + _gib(hbm)}{fits}"
            f"{flops}; compiled in {step.compile_seconds:.0f} s")


def _single_row(config, devices, batch: int, hbm: Optional[int]) -> str:
    """The row of one compile; a batch XLA refuses for the chip's memory is an answer too."""
    step, refusal = _compile_or_refusal(config, devices, batch)
    if refusal is not None:
        return f"  per-chip batch {batch}: DOES NOT FIT (XLA: {refusal})"
    return _row(step, hbm)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v4:2x2x2, v5e:4x4, "
                                "v5p:4x4x4, v6e:8x8.")
_BATCH = flags.DEFINE_integer("per_chip_batch", None, "Per-chip batch (default: the config's "
                              "batch_size over the batch shards of the mesh).")
_FIND = flags.DEFINE_bool("find_max_batch", False, "Search the largest per-chip batch that "
                          "fits in HBM.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax
    jax.config.update("jax_platforms", "cpu")  # the host compiles; the pod is described
    from mim_jax import sharding
    config = _CONFIG.value
    try:
        devices = topology_devices(_TOPOLOGY.value)
        kind = devices[0].device_kind
        hbm = hbm_per_device(devices)
        mesh_shape = sharding.mesh_shape(config.get("mesh"), len(devices))
        shards = mesh_shape[0] * mesh_shape[1]
        batch = _BATCH.value or max(1, config.batch_size // shards)
        model = config.model
        print(f"{_TOPOLOGY.value}: {len(devices)} x {kind}, HBM "
              f"{_gib(hbm) if hbm else 'unknown'} per device; mesh data={mesh_shape[0]} "
              f"fsdp={mesh_shape[1]} model={mesh_shape[2]}; {model.name} {model.variant} "
              f"dtype={model.get('dtype')} remat={model.get('remat')} "
              f"scan={model.get('scan', False)} accum_steps={config.get('accum_steps', 1)}",
              flush=True)
        if _FIND.value:
            if hbm is None:
                raise ConfigError(f"--find_max_batch needs the HBM of {kind!r}, not in the "
                                  "table (mim_jax/aot.py HBM_BYTES_TABLE).")
            unit = batch_unit(config, devices)
            batch = max(unit, batch // unit * unit)
            if unit > 1:
                print(f"per-chip batches in multiples of {unit} (the objective's streams and "
                      "accum_steps split them evenly)", flush=True)
            best, _, misfit = find_max_batch(config, devices, hbm, start=batch,
                                             report=lambda line: print(line, flush=True),
                                             unit=unit)
            bracket = f" ({misfit} does not)" if misfit else " (no larger batch was tried)"
            print(f"largest per-chip batch that fits: {best}{bracket}" if best else
                  f"nothing fits, not even a per-chip batch of {batch}", flush=True)
        else:
            print(_single_row(config, devices, batch, hbm), flush=True)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def run():
    sys.path.insert(0, os.getcwd())  # configs import configs.common

    def guarded(argv):
        try:
            main(argv)
        except RunError as e:
            logging.flush()
            print(f"mim_jax.aot: error: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
    app.run(guarded)


if __name__ == "__main__":
    run()
