"""Benchmarks: train-step speed, FLOPs, MFU and memory; input pipeline; PyTorch side by side.

Run from the repository root (configs/ is imported as a package from the working directory):

  # Train step on on-device synthetic images (+ the real input pipeline unless data is synthetic)
  python -m mim_jax.benchmark --config configs/mae.py:variant=B/16 --batch 256 \
      --config.data.name=synthetic --json_out b16.json
  python -m mim_jax.benchmark --config configs/mae.py:quickstart --steps 20

  # Input pipeline alone: JPEG decode + RandomResizedCrop + flip at 224 px, images/s per core
  python -m mim_jax.benchmark --config configs/mae.py --mode input

  # mim_jax vs Hugging Face PyTorch ViTMAE, one process, same threads / batch / model, float32
  python -m mim_jax.benchmark --config configs/mae.py --mode compare_torch --batch 16 \
      --warmup 2 --steps 5

Modes:
  train          Compile time, steady-state step time, images/s, analytic vs XLA FLOPs, MFU,
                 peak memory and the share of the step spent in masking; then, with --data or
                 when config.data.name is not 'synthetic', images/s of the whole loop with the
                 real input pipeline.
  input          The input pipeline alone on a generated JPEG dataset (TFDS records or a folder).
  compare_torch  The mim_jax MAE train step and transformers' ViTMAEForPreTraining + AdamW, timed
                 interleaved (A, B, A, B, ...) on the CPU with the same thread count.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

# JAX only reads its thread and platform settings when the first computation runs (after
# pin_threads). TensorFlow, TFDS, torch and transformers are imported where they are used, so
# a train-mode run needs none of them.
from mim_jax import data, flops, masking, objectives, optim, sharding, train
from mim_jax.flops import PEAK_FLOPS_TABLE, peak_flops_for  # noqa: F401  (re-exported)

MODES = ("train", "input", "compare_torch")
SYNTHETIC = "synthetic"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/mae.py:variant=B/16.", lock_config=False)
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (train, compare_torch) or batches (input).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps / batches before timing.")
_BATCH = flags.DEFINE_integer(
    "batch", None, "Global batch size. Default: config.batch_size (train), 16 (compare_torch), "
    "128 (input).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Overrides config.data.image_size.")
_VARIANT = flags.DEFINE_string(
    "variant", None, "Overrides config.model.variant (compare_torch default: B/16).")
_PEAK_FLOPS = flags.DEFINE_float(
    "peak_flops", None, "Peak FLOP/s of ONE device for MFU; default: the built-in table.")
_DATA = flags.DEFINE_bool(
    "data", None, "train: also time the loop with the real input pipeline (default: when "
    "config.data.name is not 'synthetic').")
_THREADS = flags.DEFINE_integer(
    "threads", None, "CPU threads for XLA, PyTorch and tf.data (pins the process to that many "
    "cores); default: every core this process may use.")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "train / compare_torch on the CPU: trace a few mim_jax steps with "
    "jax.profiler and report where the step time goes, by XLA op kind.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every figure as JSON to this path.")
_INPUT_FORMAT = flags.DEFINE_enum(
    "input_format", "tfds", ("tfds", "folder"),
    "input: JPEGs as TFDS records (TFRecord files, like ImageNet in TFDS) or as a folder of files.")
_INPUT_IMAGES = flags.DEFINE_integer("input_images", 2048, "input: images to generate.")
_INPUT_DIR = flags.DEFINE_string(
    "input_dir", None, "input: where the generated dataset lives (reused when present); default: "
    "a folder in the system temp directory.")

# --------------------------------------------------------------------------- small helpers


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
    drift of a shared machine hits both alike. -> {name: [measure_call dicts]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    calls = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            calls[name].append(measure_call(fn))
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


def xla_flops(compiled) -> Optional[float]:
    """FLOPs of one call of a compiled executable by XLA's cost analysis (one device's share)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def xla_memory(compiled) -> Optional[dict]:
    """Buffer sizes XLA planned for one call: arguments, outputs, temporaries (bytes)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if stats is None:
        return None
    return {name: int(getattr(stats, f"{name}_size_in_bytes"))
            for name in ("argument", "output", "alias", "temp")}


# --------------------------------------------------------------------------- config


def apply_overrides(config, batch: Optional[int], image_size: Optional[int],
                    variant: Optional[str]):
    if batch is not None:
        if batch <= 0:
            raise ValueError(f"--batch={batch} must be > 0.")
        config.batch_size = batch
    if image_size is not None:
        config.data.image_size = image_size
    if variant is not None:
        config.model.variant = variant
    return config


def describe_model(config) -> dict:
    arch = flops.backbone_arch(config)
    obj = config.objective
    return {"objective": obj.name, "backbone": config.model.get("name", "vit"),
            "variant": config.model.variant, "arch": dataclasses.asdict(arch),
            "image_size": arch.image_size, "objective_config": obj.to_dict(),
            "dtype": config.model.get("dtype", "float32"),
            "remat": config.model.get("remat", False), "scan": config.model.get("scan", False),
            "batch_size": config.batch_size, "accum_steps": config.get("accum_steps", 1)}


# --------------------------------------------------------------------------- train step


@dataclasses.dataclass
class TrainSetup:
    objective: object
    mesh: object
    step: object  # the jitted (not yet lowered) train step
    state: object
    batch: dict  # on-device synthetic images, sharded like the trainer's batch


def _synthetic_device_batch(objective, batch_size: int, mesh, seed: int) -> dict:
    shape = (batch_size, *objective.image_shape)
    make = jax.jit(lambda key: jax.random.normal(key, shape),
                   out_shardings=sharding.batch_sharded(mesh))
    return {"image": make(jax.random.key(seed + 1))}


def build_train_setup(config) -> TrainSetup:
    """The trainer's own state, optimizer and jitted step (donated state), without data."""
    objective = objectives.build(config)
    mesh = sharding.make_mesh()
    accum = config.get("accum_steps", 1)
    sharding.check_batch_divisible(config.batch_size, accum, mesh)
    peak_lr = optim.peak_learning_rate(config.optimizer, config.batch_size)
    # The schedule only sets the learning-rate value; its length does not change the compute.
    schedule = optim.make_schedule(peak_lr, total_steps=10_000, warmup_steps=100)
    tx = optim.make_optimizer(config.optimizer, schedule)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    repl = sharding.replicated(mesh)

    def init_state(rng):
        params = objective.init(rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params),
                                nonfinite_steps=jnp.zeros((), jnp.int32))

    state = jax.jit(init_state, out_shardings=repl)(init_rng)
    step = jax.jit(train.make_train_step(objective, tx, schedule, accum, step_rng, mesh),
                   in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=(repl, repl),
                   donate_argnums=(0,))
    batch = _synthetic_device_batch(objective, config.batch_size, mesh, config.seed)
    return TrainSetup(objective, mesh, step, state, batch)


def compile_step(setup: TrainSetup):
    """-> (compiled step, {'trace_lower_s', 'compile_s'})."""
    start = time.perf_counter()
    lowered = setup.step.lower(setup.state, setup.batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return compiled, {"trace_lower_s": lowered_at - start, "compile_s": done - lowered_at}


class StepRunner:
    """Calls a compiled step on its own (donated) state; each call blocks on the result."""

    def __init__(self, compiled, state, batch):
        self._compiled, self.state, self._batch = compiled, state, batch
        self.metrics = None

    def __call__(self, batch=None):
        self.state, self.metrics = self._compiled(self.state,
                                                  self._batch if batch is None else batch)
        jax.block_until_ready(self.metrics)
        return self.metrics

    def async_call(self, batch):
        self.state, self.metrics = self._compiled(self.state, batch)


def flops_report(config, compiled, per_device_batch: int) -> dict:
    forward = flops.forward_flops_breakdown(config)
    analytic = flops.model_flops_per_image(config)
    measured = xla_flops(compiled)
    xla_per_image = measured / per_device_batch if measured is not None else None
    loops = [name for name, on in (("model.scan", config.model.get("scan", False)),
                                   ("accum_steps > 1", config.get("accum_steps", 1) > 1)) if on]
    return {
        "xla_note": (f"{' and '.join(loops)}: XLA's cost analysis may count a loop body once, "
                     "so its figure can be low" if loops else None),
        "analytic_train_per_image": analytic,
        "analytic_forward_per_image": sum(forward.values()),
        "analytic_forward_breakdown": forward,
        "xla_train_per_image": xla_per_image,
        "xla_over_analytic": xla_per_image / analytic if xla_per_image else None,
        "convention": "analytic: matmuls only, 2 FLOPs per multiply-add, train = 3x forward; "
                      "XLA: compiled.cost_analysis()['flops'] of the whole step (all ops, "
                      "incl. optimizer) / per-device batch",
    }


# --------------------------------------------------------------------------- masking share


@dataclasses.dataclass(frozen=True)
class MaskingWork:
    """The masking work of one train step, isolated: `forward(key, *inputs)` ->
    (outputs, aux); inputs and outputs are float arrays of the given shapes."""
    forward: Callable
    inputs: Tuple[Tuple[int, ...], ...]
    outputs: Tuple[Tuple[int, ...], ...]


def mae_masking_work(batch_size: int, num_patches: int, mask_ratio: float, enc_width: int,
                     dec_width: int) -> MaskingWork:
    """random_masking, the encoder's gather of the visible tokens and the decoder's unshuffle
    (mask tokens appended, then gathered back into patch order)."""
    keep = masking.num_visible(num_patches, mask_ratio)

    def forward(key, enc_tokens, dec_visible, mask_token):
        m = masking.random_masking(key, batch_size, num_patches, mask_ratio)
        kept = jnp.take_along_axis(enc_tokens, m.ids_keep[..., None], axis=1)
        fill = jnp.broadcast_to(mask_token, (batch_size, num_patches - keep, dec_width))
        full = jnp.concatenate([dec_visible, fill], axis=1)
        unshuffled = jnp.take_along_axis(full, m.ids_restore[..., None], axis=1)
        return (kept, unshuffled), m.mask

    return MaskingWork(
        forward, inputs=((batch_size, num_patches, enc_width), (batch_size, keep, dec_width),
                         (1, 1, dec_width)),
        outputs=((batch_size, keep, enc_width), (batch_size, num_patches, dec_width)))


def simmim_masking_work(batch_size: int, image_size: int, mask_patch_size: int,
                        patch_size: int, mask_ratio: float, width: int) -> MaskingWork:
    """simmim_mask and the replacement of the masked patch embeddings by the mask token."""
    tokens = (image_size // patch_size)**2

    def forward(key, embeddings, mask_token):
        token_mask = masking.simmim_mask(key, batch_size, image_size, mask_patch_size,
                                         patch_size, mask_ratio)
        w = token_mask[..., None].astype(embeddings.dtype)
        return (embeddings * (1 - w) + mask_token * w,), token_mask

    return MaskingWork(forward, inputs=((batch_size, tokens, width), (1, 1, width)),
                       outputs=((batch_size, tokens, width),))


def masking_work_for(config) -> MaskingWork:
    obj, arch = config.objective, flops.backbone_arch(config)
    if obj.name == "mae":
        return mae_masking_work(config.batch_size, arch.num_patches, obj.mask_ratio,
                                arch.width, obj.decoder_width)
    if obj.name == "simmim":
        width = arch.embed_dim if hasattr(arch, "embed_dim") else arch.width
        return simmim_masking_work(config.batch_size, arch.image_size, obj.mask_patch_size,
                                   arch.patch_size, obj.mask_ratio, width)
    raise ValueError(f"objective.name={obj.name!r}: no masking workload defined; "
                     "supported: ['mae', 'simmim'].")


def masking_program(work: MaskingWork, with_backward: bool):
    """(key, inputs, cotangents) -> outputs (and, with the backward, the input gradients: the
    scatter-adds / selects the train step runs for the masking)."""
    def program(key, inputs, cotangents):
        if not with_backward:
            return work.forward(key, *inputs)
        outs, vjp, aux = jax.vjp(lambda *a: work.forward(key, *a), *inputs, has_aux=True)
        return outs, aux, vjp(cotangents)
    return program


def measure_masking(config, mesh, steps: int, warmup: int) -> dict:
    work = masking_work_for(config)
    rows, repl = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    keys = iter(jax.random.split(jax.random.key(7), len(work.inputs) + len(work.outputs)))
    place = lambda shape: jax.device_put(
        jax.random.normal(next(keys), shape), rows if shape[0] == config.batch_size else repl)
    inputs = tuple(place(s) for s in work.inputs)
    cotangents = tuple(place(s) for s in work.outputs)
    out = {}
    for label, backward in (("forward", False), ("forward_backward", True)):
        args = (jax.random.key(3), inputs, cotangents)
        compiled = jax.jit(masking_program(work, backward)).lower(*args).compile()
        calls = measure_each(lambda: jax.block_until_ready(compiled(*args)), steps, warmup)
        out[label] = call_summary(calls)
    return out


# --------------------------------------------------------------------------- op profile (CPU)

# Thunks are classified by the HLO opcodes they run (fusions expanded), first match wins.
OP_CATEGORIES = (
    ("masking (gather/scatter/sort)", ("gather", "scatter", "sort")),
    ("matmul / conv", ("dot", "convolution")),
    ("reductions (norms, softmax, sums)", ("reduce",)),
)
OTHER_CATEGORY = "elementwise / copies / other"
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _opcode(rhs: str) -> Optional[str]:
    """'f32[2]{0} add(x, y)' or '(f32[2], s32[2]) sort(...)' -> the opcode."""
    depth, i = 0, 0
    if rhs.startswith("("):  # tuple shape: skip to its closing parenthesis
        for i, ch in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        rhs = rhs[i + 1:]
    match = re.match(r"\s*(?:\S+\s+)?([a-z][a-z0-9\-]*)\(", rhs)
    return match.group(1) if match else None


def _parse_hlo(hlo_text: str):
    """-> (computation -> its opcodes, computation -> computations it calls,
           instruction -> (opcode, computations it calls))."""
    body_ops, nested, instructions, computation = {}, {}, {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            computation = head.group(1)
            body_ops[computation], nested[computation] = set(), set()
            continue
        inst = _INSTRUCTION.match(line)
        if inst and computation is not None:
            op, callees = _opcode(inst.group(2)), _CALLEE.findall(inst.group(2))
            body_ops[computation].add(op)
            nested[computation].update(callees)
            instructions[inst.group(1)] = (op, callees)
    return body_ops, nested, instructions


def hlo_instruction_ops(hlo_text: str) -> dict:
    """Instruction name -> every opcode it executes (called computations expanded)."""
    body_ops, nested, instructions = _parse_hlo(hlo_text)
    memo = {}

    def closure(computation, stack=()):
        if computation not in memo:
            ops = set(body_ops.get(computation, ()))
            for callee in nested.get(computation, ()):
                if callee not in stack:  # HLO has no recursion; this only guards bad input
                    ops |= closure(callee, stack + (computation,))
            memo[computation] = ops
        return memo[computation]

    out = {}
    for name, (op, callees) in instructions.items():
        ops = {op} - {None}
        for callee in callees:
            ops |= closure(callee)
        out[name] = ops
    return out


def op_category(ops: set) -> str:
    for category, opcodes in OP_CATEGORIES:
        if ops & set(opcodes):
            return category
    return OTHER_CATEGORY


def _thunk_durations(trace_dir: str, names: set) -> dict:
    """Summed duration (s) of every XLA CPU thunk event named like an HLO instruction."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # ships with TensorFlow
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = {}
    for plane in space.planes:
        meta = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = meta.get(event.metadata_id)
                if name in names:
                    totals[name] = totals.get(name, 0.0) + event.duration_ps * 1e-12
    return totals


def profile_ops(runner: StepRunner, compiled, steps: int, top: int = 12) -> dict:
    """Traces `steps` calls of the compiled step and splits the XLA thunk time by op kind."""
    if jax.devices()[0].platform != "cpu":
        return {"error": "--profile classifies XLA CPU thunks; not implemented for "
                         f"{jax.devices()[0].platform}"}
    ops = hlo_instruction_ops(compiled.as_text())
    trace_dir = tempfile.mkdtemp(prefix="mim_jax_profile_")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            runner()
    try:
        durations = _thunk_durations(trace_dir, set(ops))
    except (ImportError, FileNotFoundError) as e:
        return {"error": f"could not read the trace: {e}"}
    total = sum(durations.values())
    if not total:
        return {"error": "the trace holds no XLA thunk events"}
    by_category = {}
    for name, seconds in durations.items():
        category = op_category(ops[name])
        by_category[category] = by_category.get(category, 0.0) + seconds
    ranked = sorted(durations.items(), key=lambda kv: -kv[1])
    describe = lambda n, v: {"name": n, "seconds_per_step": v / steps, "share": v / total,
                             "category": op_category(ops[n]),
                             "opcodes": sorted(o for o in ops[n]
                                               if o not in ("parameter", "fusion"))}
    by_kind = {}
    for name, seconds in ranked:
        kind = by_kind.setdefault(op_category(ops[name]), [])
        if len(kind) < 3:
            kind.append(describe(name, seconds))
    return {
        "steps": steps, "thunk_seconds_per_step": total / steps,
        "categories": {c: {"seconds_per_step": v / steps, "share": v / total}
                       for c, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_ops": [describe(n, v) for n, v in ranked[:top]],
        "top_ops_by_category": by_kind,
        "method": "jax.profiler trace of the XLA CPU thunks; each thunk classified by the HLO "
                  "opcodes it runs; shares are of the summed thunk time",
    }


# --------------------------------------------------------------------------- mode: train


def benchmark_train_step(config, steps: int, warmup: int, peak_override=None,
                         profile: bool = False) -> dict:
    setup = build_train_setup(config)
    compiled, compile_times = compile_step(setup)
    runner = StepRunner(compiled, setup.state, setup.batch)
    step_times = call_summary(measure_each(runner, steps, warmup))
    n_dev = setup.mesh.devices.size
    images_per_sec = config.batch_size / step_times["median_s"]
    flop = flops_report(config, compiled, config.batch_size // n_dev)
    device = jax.devices()[0]
    peak, peak_source = peak_flops_for(device.device_kind, device.platform, peak_override)
    result = {
        "compile": compile_times,
        "xla_memory": xla_memory(compiled),
        "step_time": step_times,
        "images_per_sec": images_per_sec,
        "flops": flop,
        "achieved_flops_per_sec": images_per_sec * flop["analytic_train_per_image"],
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "mfu": mfu(images_per_sec, flop["analytic_train_per_image"], peak, n_dev),
        "final_loss": float(runner.metrics["loss"]),
        "memory": peak_memory(device),
    }
    masking_times = measure_masking(config, setup.mesh, steps, warmup)
    result["masking"] = dict(
        masking_times,
        share_of_step=masking_times["forward_backward"]["median_s"] / step_times["median_s"],
        share_of_step_min=masking_times["forward_backward"]["min_s"] / step_times["min_s"],
        method="the objective's masking (MAE: random_masking + encoder gather + decoder "
               "unshuffle; SimMIM: simmim_mask + mask-token replacement), with its gradients, "
               "jitted and timed alone on the step's shapes / the full step")
    if profile:
        result["profile"] = profile_ops(runner, compiled, min(steps, 3))
    # Reused by the input-pipeline loop; popped before output.
    result["_runner"] = (runner, setup.batch)
    return result


def loop_throughput(runner: StepRunner, next_batch: Callable[[], dict], batch_size: int,
                    steps: int, warmup: int) -> dict:
    """Images/s of the trainer's loop shape: get a batch, dispatch the step, never block
    until the end (so host work overlaps device work, as in training)."""
    for _ in range(warmup):
        runner.async_call(next_batch())
    jax.block_until_ready(runner.metrics)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - t
        runner.async_call(batch)
    jax.block_until_ready(runner.metrics)
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": elapsed, "images_per_sec": steps * batch_size / elapsed,
            "batch_wait_s_per_step": wait / steps}


def benchmark_pipeline_loop(config, train_data, runner: StepRunner, device_batch: dict,
                            steps: int, warmup: int) -> dict:
    """The loop with the real input pipeline (host batch -> global array -> step) next to the
    same loop fed the on-device synthetic batch."""
    mesh = sharding.make_mesh()
    real = loop_throughput(runner, lambda: sharding.global_batch(next(train_data), mesh),
                           config.batch_size, steps, warmup)
    synthetic = loop_throughput(runner, lambda: device_batch, config.batch_size, steps, warmup)
    return {"data": config.data.name, "pipeline": real, "on_device_synthetic": synthetic,
            "pipeline_over_synthetic": real["images_per_sec"] / synthetic["images_per_sec"]}


def run_train(config, threads: int, use_data: Optional[bool]) -> dict:
    result = {"mode": "train", "environment": environment(threads),
              "model": describe_model(config)}
    if use_data is None:
        use_data = config.data.name != SYNTHETIC
    # Opened first, so that a dataset that is not there fails before minutes of measuring.
    train_data = (data.create_train_iterator(config.data, global_batch_size=config.batch_size,
                                             seed=config.seed) if use_data else None)
    result["train_step"] = benchmark_train_step(config, _STEPS.value, _WARMUP.value,
                                                _PEAK_FLOPS.value, _PROFILE.value)
    runner, device_batch = result["train_step"].pop("_runner")
    result["input_pipeline_loop"] = (
        benchmark_pipeline_loop(config, train_data, runner, device_batch, _STEPS.value,
                                _WARMUP.value) if use_data else None)
    result["train_step"]["memory"] = peak_memory(jax.devices()[0])  # after everything ran
    return result


# --------------------------------------------------------------------------- mode: input


JPEG_DATASET = "mim_bench_jpeg"
JPEG_QUALITY = 90
_SIDE_RANGE = (256, 400)


def synthetic_jpegs(num: int, seed: int):
    """Yields JPEG bytes of photo-like images: smooth colour fields at 256-400 px per side with
    fine noise (so files are neither trivially compressible nor pure noise)."""
    from mim_jax.data.tf_setup import tf
    rng = np.random.default_rng(seed)
    for _ in range(num):
        h, w = (int(v) for v in rng.integers(_SIDE_RANGE[0], _SIDE_RANGE[1] + 1, size=2))
        coarse = rng.uniform(0, 255, size=(int(rng.integers(3, 12)),
                                           int(rng.integers(3, 12)), 3)).astype(np.float32)
        image = tf.image.resize(coarse[None], (h, w), method="bicubic")[0].numpy()
        image += rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        yield tf.io.encode_jpeg(pixels, quality=JPEG_QUALITY).numpy()


def _jpeg_builder_class():
    """A TFDS builder of generated JPEGs, defined on first use (TFDS registers on definition)."""
    import tensorflow_datasets as tfds
    try:  # TFDS registers a builder class when it is defined: define it once per process
        return tfds.builder_cls(JPEG_DATASET)
    except Exception:  # DatasetNotFoundError
        pass

    class MimBenchJpeg(tfds.core.GeneratorBasedBuilder):
        """JPEG-encoded images in TFDS records, for input-pipeline benchmarks."""
        name = JPEG_DATASET
        # Under `python -m` this module is __main__, which TFDS cannot resolve to a package.
        __module__ = "mim_jax.benchmark"
        VERSION = tfds.core.Version("1.0.0")
        code_path = pathlib.Path(__file__)  # no checksums or metadata next to this code

        def __init__(self, *, num_images: int = 0, seed: int = 0, **kwargs):
            self._num_images, self._seed = num_images, seed
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                description="Generated JPEG images for mim_jax benchmarks.",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                                 encoding_format="jpeg")}))

        def _split_generators(self, dl_manager):
            del dl_manager
            if self._num_images <= 0:
                raise ValueError(f"{JPEG_DATASET} is not prepared in {self.data_dir}; it is "
                                 "generated by `--mode input`.")
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, jpeg in enumerate(synthetic_jpegs(self._num_images, self._seed)):
                yield i, {"image": jpeg}

    return MimBenchJpeg


def prepare_jpeg_dataset(fmt: str, root: str, num_images: int, seed: int = 0) -> dict:
    """Writes (once) the generated JPEGs as TFDS records or files; -> data-config overrides."""
    if num_images <= 0:
        raise ValueError(f"--input_images={num_images} must be > 0.")
    where = os.path.join(root, f"{fmt}_n{num_images}_s{seed}")
    if fmt == "folder":
        if not os.path.isdir(where):
            tmp = where + ".partial"
            os.makedirs(tmp, exist_ok=True)
            for i, jpeg in enumerate(synthetic_jpegs(num_images, seed)):
                with open(os.path.join(tmp, f"{i:06d}.jpg"), "wb") as f:
                    f.write(jpeg)
            os.rename(tmp, where)
        return {"name": "folder", "folder": where, "data_dir": None}
    builder = _jpeg_builder_class()(num_images=num_images, seed=seed, data_dir=where)
    builder.download_and_prepare()
    return {"name": JPEG_DATASET, "folder": None, "data_dir": where}


def read_encoded(overrides: dict) -> list:
    """Every encoded image of the generated dataset, read back from where the pipeline reads."""
    if overrides["name"] == "folder":
        folder = overrides["folder"]
        blobs = []
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                blobs.append(f.read())
        return blobs
    import tensorflow_datasets as tfds
    ds = tfds.builder(JPEG_DATASET, data_dir=overrides["data_dir"]).as_dataset(
        split="train", decoders={"image": tfds.decode.SkipDecoding()})
    return [ex["image"] for ex in ds.as_numpy_iterator()]


def dataset_stats(blobs: Sequence[bytes]) -> dict:
    """Average encoded size and resolution."""
    from mim_jax.data.tf_setup import tf
    sizes = [len(b) for b in blobs]
    pixels = [int(np.prod(tf.image.extract_jpeg_shape(b).numpy()[:2])) for b in blobs]
    return {"images": len(sizes), "mean_bytes": float(np.mean(sizes)),
            "mean_pixels": float(np.mean(pixels)),
            "bytes_per_pixel": float(np.sum(sizes) / np.sum(pixels))}


def _stage_functions(data_cfg) -> dict:
    """(encoded, seed) -> image, for each cumulative stage of the pipeline's per-image work,
    built from the pipeline's own ops; 'what-if' entries are alternatives it does not use."""
    from mim_jax.data import image_ops
    spec = image_ops.ImageSpec.from_config(data_cfg)
    size, interp = spec.image_size, spec.interpolation

    def crop(encoded, seed):
        return image_ops.decode_random_crop(encoded, seed, spec.channels, spec.crop_scale,
                                            spec.crop_ratio)

    def raw_resize(image, method, antialias):
        from mim_jax.data.tf_setup import tf
        out = tf.image.resize(image, (size, size), method=method, antialias=antialias)
        return tf.clip_by_value(out, 0.0, 255.0)

    return {
        "decode whole JPEG": lambda e, s: image_ops.decode_any(e, spec.channels),
        "decode crop window only": crop,
        f"+ resize to {size} ({interp}, antialias)":
            lambda e, s: image_ops.resize(crop(e, s), size, interp),
        "+ flip + normalise (the pipeline's map)": lambda e, s: image_ops.normalize(
            image_ops.train_image(e, s, spec), spec.mean, spec.std),
        "what-if: the map without normalise (normalise on device)":
            lambda e, s: image_ops.train_image(e, s, spec),
        f"what-if: crop + {interp} resize without antialias":
            lambda e, s: raw_resize(crop(e, s), interp, False),
        "what-if: crop + bilinear resize with antialias":
            lambda e, s: raw_resize(crop(e, s), "bilinear", True),
    }


def measure_input_stages(blobs: Sequence[bytes], data_cfg, images: int = 512) -> dict:
    """Process CPU milliseconds per image of each stage, on ONE tf.data thread."""
    from mim_jax.data.tf_setup import tf
    if data_cfg.crop_scale is None:
        return {"error": "data.crop_scale is None: the pipeline does no RandomResizedCrop"}
    records = tf.data.Dataset.from_tensor_slices(list(blobs[:images])).enumerate()
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    out = {}
    for name, fn in _stage_functions(data_cfg).items():
        # A sum of the pixels, so no stage can be pruned as unused (costs ~0.03 ms/img).
        ds = records.map(lambda i, e, fn=fn: tf.reduce_sum(tf.cast(
            fn(e, tf.stack([tf.constant(7, tf.int64), i])), tf.float32)),
                         num_parallel_calls=1).with_options(options)
        ds.take(16).reduce(0, lambda a, x: a + 1)  # kernels initialised outside the timing
        cpu0 = os.times()
        count = int(ds.reduce(0, lambda a, x: a + 1))
        cpu1 = os.times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        out[name] = {"cpu_ms_per_image": 1e3 * cpu / count,
                     "images_per_cpu_second": count / cpu if cpu > 0 else None}
    return out


def measure_input(data_cfg, batch_size: int, steps: int, warmup: int, cores: int) -> dict:
    train_data = data.create_train_iterator(data_cfg, global_batch_size=batch_size, seed=0,
                                            process_index=0, process_count=1)
    for _ in range(warmup):  # fills the shuffle buffer and lets tf.data autotune settle
        next(train_data)
    cpu_start, start = os.times(), time.perf_counter()
    for _ in range(steps):
        next(train_data)
    elapsed = time.perf_counter() - start
    cpu_end = os.times()
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    return dict(input_rates(steps * batch_size, elapsed, cores, cpu),
                steps_per_epoch=train_data.steps_per_epoch)


def input_rates(images: int, seconds: float, cores: int, cpu_seconds: float) -> dict:
    """Throughput figures of the input pipeline.

    Per core divides by the pool size (wall clock: understates the per-core speed when other
    work shares the cores); per CPU-second divides by the CPU time the process actually got,
    so it holds up on a shared machine.
    """
    rate = images / seconds
    return {"images": images, "seconds": seconds, "images_per_sec": rate, "cores": cores,
            "images_per_sec_per_core": per_core(rate, cores), "process_cpu_seconds": cpu_seconds,
            "images_per_cpu_second": images / cpu_seconds if cpu_seconds > 0 else None}


def run_input(config, threads: int, batch: Optional[int]) -> dict:
    config.batch_size = batch or 128
    root = _INPUT_DIR.value or os.path.join(tempfile.gettempdir(), "mim_jax_bench_jpeg")
    start = time.perf_counter()
    overrides = prepare_jpeg_dataset(_INPUT_FORMAT.value, root, _INPUT_IMAGES.value)
    prepare_s = time.perf_counter() - start
    config.data.update(overrides)
    config.data.split = "train"
    d = config.data
    blobs = read_encoded(overrides)
    return {
        "mode": "input", "environment": environment(threads),
        "dataset": dict(dataset_stats(blobs), format=_INPUT_FORMAT.value,
                        description=("JPEG bytes in TFDS records (TFRecord files, decoded by "
                                     "the pipeline)" if _INPUT_FORMAT.value == "tfds" else
                                     "a folder of JPEG files"),
                        location=overrides["data_dir"] or overrides["folder"],
                        prepare_seconds=prepare_s),
        "augmentation": {"image_size": d.image_size, "crop_scale": tuple(d.crop_scale or ()),
                         "interpolation": d.interpolation, "flip": d.flip,
                         "batch_size": config.batch_size},
        "threads_note": "tf.data runs on its default thread pool, sized to the schedulable "
                        "cores (the pipeline sets no private pool); per core = images/s / "
                        "that count",
        "input": measure_input(d, config.batch_size, _STEPS.value, _WARMUP.value, threads),
        "stages_one_thread": measure_input_stages(blobs, d),
    }


# --------------------------------------------------------------------------- mode: compare_torch


def hf_vitmae_config(config):
    """transformers.ViTMAEConfig of exactly the mim_jax model in `config`."""
    import transformers
    arch, obj = flops.vit_arch(config), config.objective
    return transformers.ViTMAEConfig(
        hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.num_heads,
        intermediate_size=arch.mlp_dim, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, image_size=arch.image_size,
        patch_size=arch.patch_size, num_channels=arch.channels, qkv_bias=True,
        decoder_hidden_size=obj.decoder_width, decoder_num_hidden_layers=obj.decoder_depth,
        decoder_num_attention_heads=obj.decoder_heads,
        decoder_intermediate_size=int(obj.decoder_width * obj.get("decoder_mlp_ratio", 4.0)),
        mask_ratio=obj.mask_ratio, norm_pix_loss=bool(obj.norm_pix_loss))


class TorchMAEStep:
    """ViTMAEForPreTraining forward + backward + torch.optim.AdamW step (float32, train mode)."""

    def __init__(self, config, images_nhwc):
        import torch
        import transformers
        torch.manual_seed(config.seed)
        self.model = transformers.ViTMAEForPreTraining(hf_vitmae_config(config)).float().train()
        opt = config.optimizer
        # The reference's groups: no weight decay on biases, norms and tokens (ndim <= 1).
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        lr = opt.base_lr * config.batch_size / opt.lr_batch_divisor
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(opt.b1, opt.b2),
            eps=opt.get("eps", 1e-8))
        self.pixels = torch.from_numpy(
            np.array(np.transpose(np.asarray(images_nhwc), (0, 3, 1, 2)), order="C", copy=True))
        self.loss = None

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(pixel_values=self.pixels).loss
        loss.backward()
        self.optimizer.step()
        self.loss = float(loss.detach())
        return self.loss

    def describe(self) -> dict:
        import torch
        import transformers
        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "attn_implementation": self.model.config._attn_implementation,
                "torch_threads": torch.get_num_threads(),
                "optimizer": "torch.optim.AdamW (default implementation)",
                "parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}


def run_compare_torch(config, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    if jax.devices()[0].platform != "cpu":
        raise ValueError("--mode=compare_torch compares on the CPU; run with JAX_PLATFORMS=cpu.")
    if config.model.get("dtype", "float32") != "float32":
        raise ValueError(f"model.dtype={config.model.dtype!r}: compare_torch is float32 only.")
    if config.objective.name != "mae" or config.model.get("name", "vit") != "vit":
        raise ValueError(f"objective.name={config.objective.name!r} / model.name="
                         f"{config.model.get('name', 'vit')!r}: compare_torch compares the MAE "
                         "ViT with transformers' ViTMAEForPreTraining; use configs/mae.py.")
    setup = build_train_setup(config)
    compiled, compile_times = compile_step(setup)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state.params))
    jax_step = StepRunner(compiled, setup.state, setup.batch)
    torch_step = TorchMAEStep(config, jax.device_get(setup.batch["image"]))
    calls = interleaved_calls({"mim_jax": jax_step, "torch": torch_step},
                              _STEPS.value, _WARMUP.value)
    jax_t, torch_t = call_summary(calls["mim_jax"]), call_summary(calls["torch"])
    masking_times = measure_masking(config, setup.mesh, _STEPS.value, _WARMUP.value)
    profile = profile_ops(jax_step, compiled, min(_STEPS.value, 2)) if _PROFILE.value else None
    train_flops = flops.model_flops_per_image(config)
    per_sec = lambda t: config.batch_size / t["median_s"]
    masking_s = masking_times["forward_backward"]
    return {
        "mode": "compare_torch", "environment": environment(threads),
        "model": describe_model(config),
        "threads": {"xla_cpu_pool (PJRT_NPROC)": int(os.environ["PJRT_NPROC"]),
                    "torch.get_num_threads": torch.get_num_threads(),
                    "process_affinity_cores": usable_cores()},
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")
                       or k == "LD_PRELOAD"},
        "mim_jax": {"step_time": jax_t, "images_per_sec": per_sec(jax_t),
                    "compile": compile_times, "parameters": n_params,
                    "xla_memory": xla_memory(compiled),
                    "final_loss": float(jax_step.metrics["loss"]),
                    "achieved_flops_per_sec": per_sec(jax_t) * train_flops},
        "torch": dict(torch_step.describe(), step_time=torch_t, images_per_sec=per_sec(torch_t),
                      final_loss=torch_step.loss,
                      achieved_flops_per_sec=per_sec(torch_t) * train_flops),
        "torch_over_mim_jax": torch_t["median_s"] / jax_t["median_s"],
        "torch_over_mim_jax_paired_wall": paired_ratios(calls["torch"], calls["mim_jax"],
                                                        "wall_s"),
        "torch_over_mim_jax_cpu": torch_t["cpu_median_s"] / jax_t["cpu_median_s"],
        "flops": flops_report(config, compiled, config.batch_size // setup.mesh.devices.size),
        "masking": dict(masking_times,
                        share_of_step=masking_s["median_s"] / jax_t["median_s"],
                        share_of_step_min=masking_s["min_s"] / jax_t["min_s"]),
        "order": "interleaved per round: mim_jax, torch",
        "profile": profile,
    }


# --------------------------------------------------------------------------- output


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.3f} s"


def _fmt_flops(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f} GFLOP"


def _fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _step_line(t: dict) -> str:
    return f"median {_fmt_seconds(t['median_s'])}, min {_fmt_seconds(t['min_s'])}"


def _train_rows(r: dict) -> list:
    t, f = r["train_step"], r["train_step"]["flops"]
    rows = [
        ("model", f"{r['model']['objective']} {r['model']['variant']} @ "
                  f"{r['model']['image_size']} px, batch {r['model']['batch_size']}, "
                  f"{r['model']['dtype']}"),
        ("trace + lower", _fmt_seconds(t["compile"]["trace_lower_s"])),
        ("XLA compile", _fmt_seconds(t["compile"]["compile_s"])),
        ("step time", _step_line(t["step_time"])),
        ("per step", _cpu_line(t["step_time"])),
        ("XLA temp buffer", "n/a" if not t["xla_memory"]
         else f"{t['xla_memory']['temp'] / 2**30:.2f} GiB"),
        ("images/s (on-device synthetic)", f"{t['images_per_sec']:.1f}"),
        ("train FLOPs/img analytic", _fmt_flops(f["analytic_train_per_image"])),
        ("train FLOPs/img XLA", _fmt_flops(f["xla_train_per_image"])),
        ("XLA / analytic", "n/a" if f["xla_over_analytic"] is None
         else f"{f['xla_over_analytic']:.3f}"),
        ("achieved (analytic)", f"{t['achieved_flops_per_sec'] / 1e12:.4f} TFLOP/s"),
        ("MFU", _fmt_pct(t["mfu"]) + f"  [{t['peak_flops_source']}"
                + ("; --peak_flops sets one]" if t["mfu"] is None else "]")),
        ("peak memory", f"{t['memory']['bytes'] / 2**30:.2f} GiB  [{t['memory']['source']}]"),
        ("masking fwd+bwd (isolated)", _step_line(t["masking"]["forward_backward"])),
        ("masking share of step", f"{_fmt_pct(t['masking']['share_of_step'])} (median), "
                                  f"{_fmt_pct(t['masking']['share_of_step_min'])} (min)"),
    ]
    rows += _profile_rows(t.get("profile"))
    loop = r.get("input_pipeline_loop")
    if loop:
        real, synthetic = loop["pipeline"], loop["on_device_synthetic"]
        rows += [
            (f"loop images/s, {loop['data']} pipeline",
             f"{real['images_per_sec']:.1f} (waits {_fmt_seconds(real['batch_wait_s_per_step'])}"
             "/step for a batch)"),
            ("loop images/s, on-device synthetic", f"{synthetic['images_per_sec']:.1f}"),
            ("pipeline / synthetic", f"{loop['pipeline_over_synthetic']:.3f}"),
        ]
    return rows


def _stage_rows(stages: dict) -> list:
    if "error" in stages:
        return [("stages", stages["error"])]
    return [(f"  {name}", f"{s['cpu_ms_per_image']:.2f} ms CPU/img "
                          f"({s['images_per_cpu_second']:.0f} img per CPU-second)")
            for name, s in stages.items()]


def _input_rows(r: dict) -> list:
    d, i = r["dataset"], r["input"]
    return [
        ("dataset", f"{d['images']} {d['description']}, mean {d['mean_pixels'] ** 0.5:.0f} px "
                    f"side, {d['mean_bytes'] / 1024:.1f} KiB"),
        ("augmentation", f"decode+RandomResizedCrop{tuple(r['augmentation']['crop_scale'])} "
                         f"{r['augmentation']['interpolation']} -> "
                         f"{r['augmentation']['image_size']} px, flip, normalise"),
        ("images/s", f"{i['images_per_sec']:.1f} ({i['images']} images)"),
        ("tf.data threads (cores)", str(i["cores"])),
        ("images/s per core", f"{i['images_per_sec_per_core']:.1f}"),
        ("images per process CPU-second", "n/a" if i["images_per_cpu_second"] is None
         else f"{i['images_per_cpu_second']:.1f}"),
        ("stages, one thread (cumulative)", ""),
    ] + _stage_rows(r["stages_one_thread"])


def _cpu_line(t: dict) -> str:
    return (f"CPU median {t['cpu_median_s']:.2f} s (user {t['user_median_s']:.2f}, "
            f"kernel {t['sys_median_s']:.2f}), {t['minor_faults_median']:.0f} page faults")


def _compare_rows(r: dict) -> list:
    j, t, paired = r["mim_jax"], r["torch"], r["torch_over_mim_jax_paired_wall"]
    return [
        ("model", f"MAE {r['model']['variant']} @ {r['model']['image_size']} px, batch "
                  f"{r['model']['batch_size']}, float32, CPU"),
        ("threads", ", ".join(f"{k} {v}" for k, v in r["threads"].items())),
        ("malloc env", ", ".join(f"{k}={v}" for k, v in r["malloc_env"].items()) or "default"),
        ("mim_jax step", _step_line(j["step_time"]) + f"  ({j['images_per_sec']:.2f} img/s)"),
        ("torch step", _step_line(t["step_time"]) + f"  ({t['images_per_sec']:.2f} img/s, "
                       f"attn {t['attn_implementation']})"),
        ("torch / mim_jax (median)", f"{r['torch_over_mim_jax']:.3f}"),
        ("torch / mim_jax (per round)", f"median {paired['median']:.3f}, range "
                                        f"{paired['min']:.3f}-{paired['max']:.3f}"),
        ("mim_jax per step", _cpu_line(j["step_time"])),
        ("torch per step", _cpu_line(t["step_time"])),
        ("torch / mim_jax (CPU time)", f"{r['torch_over_mim_jax_cpu']:.3f}"),
        ("XLA temp buffer", "n/a" if not j["xla_memory"]
         else f"{j['xla_memory']['temp'] / 2**30:.2f} GiB"),
        ("train FLOPs/img analytic / XLA", f"{_fmt_flops(r['flops']['analytic_train_per_image'])}"
                                           f" / {_fmt_flops(r['flops']['xla_train_per_image'])}"),
        ("achieved mim_jax / torch", f"{j['achieved_flops_per_sec'] / 1e9:.1f} / "
                                     f"{t['achieved_flops_per_sec'] / 1e9:.1f} GFLOP/s"),
        ("masking fwd+bwd (isolated)", _step_line(r["masking"]["forward_backward"])),
        ("masking share of mim_jax step", f"{_fmt_pct(r['masking']['share_of_step'])} (median),"
                                          f" {_fmt_pct(r['masking']['share_of_step_min'])} (min)"),
    ] + _profile_rows(r.get("profile"))


def _profile_rows(profile: Optional[dict]) -> list:
    if not profile:
        return []
    if "error" in profile:
        return [("profile", profile["error"])]
    rows = [("profile: XLA thunk time", f"{_fmt_seconds(profile['thunk_seconds_per_step'])}"
                                        "/step")]
    rows += [(f"  {name}", f"{_fmt_seconds(c['seconds_per_step'])}/step ({_fmt_pct(c['share'])})")
             for name, c in profile["categories"].items()]
    describe = lambda op: f"{op['name']} [{', '.join(op['opcodes'][:6])}] {_fmt_pct(op['share'])}"
    rows += [(f"  top op {i + 1}", describe(op)) for i, op in enumerate(profile["top_ops"][:3])]
    rows += [(f"  top {kind.split(' ')[0]} op", describe(ops[0]))
             for kind, ops in profile["top_ops_by_category"].items() if kind != "matmul / conv"]
    return rows


def format_table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)


def report(result: dict, json_out: Optional[str]) -> None:
    rows = {"train": _train_rows, "input": _input_rows, "compare_torch": _compare_rows}
    print(format_table(rows[result["mode"]](result)), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2, default=str)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    mode = _MODE.value
    threads = pin_threads(_THREADS.value)  # before JAX, TF or torch start their pools
    if _STEPS.value <= 0 or _WARMUP.value < 0:
        raise ValueError(f"--steps={_STEPS.value} must be > 0 and --warmup={_WARMUP.value} >= 0.")
    config = _CONFIG.value
    batch = _BATCH.value if _BATCH.value is not None else (16 if mode == "compare_torch" else None)
    variant = _VARIANT.value or ("B/16" if mode == "compare_torch" else None)
    if mode == "input":
        apply_overrides(config, None, _IMAGE_SIZE.value, None)
        result = run_input(config, threads, _BATCH.value)
    else:
        apply_overrides(config, batch, _IMAGE_SIZE.value, variant)
        result = (run_train(config, threads, _DATA.value) if mode == "train"
                  else run_compare_torch(config, threads))
    result["command"] = " ".join(["python -m mim_jax.benchmark"] + sys.argv[1:])
    report(result, _JSON_OUT.value)


def run():
    # Configs import `configs.common`: make the repository root importable from anywhere.
    sys.path.insert(0, os.getcwd())
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
