"""Benchmarks: train-step speed, FLOPs, MFU and memory; the input pipeline.

Run from the repository root (configs/ is imported as a package from the working directory):

  # Train step on on-device synthetic images (+ the real input pipeline unless data is synthetic)
  python -m mim_jax.benchmark --config configs/mae.py:variant=B/16 --batch 256 \
      --config.data.name=synthetic --json_out b16.json
  python -m mim_jax.benchmark --config configs/mae.py:quickstart --steps 20

  # Input pipeline alone: JPEG decode + RandomResizedCrop + flip at 224 px, images/s per core
  python -m mim_jax.benchmark --config configs/mae.py --mode input

  # SparK ResNet-50 and ConvNeXt-S steps next to MAE ViT-B/16 (same batch, one process)
  python -m mim_jax.benchmark --config configs/mae.py:variant=B/16 --mode compare_steps \
      --also configs/spark.py:model=resnet50 --also configs/spark.py:model=convnext_s \
      --batch 8 --warmup 1 --steps 3

Modes:
  train          Compile time, steady-state step time, images/s, analytic vs XLA FLOPs, MFU,
                 peak memory and the share of the step spent in masking; then, with --data or
                 when config.data.name is not 'synthetic', images/s of the whole loop with the
                 real input pipeline.
  input          The input pipeline alone on a generated JPEG dataset (TFDS records or a folder).
  compare_steps  mim_jax train steps of --config and every --also config, timed interleaved at
                 the same batch / image size: step-time ratios to --config's step, XLA FLOPs.

The mim_jax step next to the PyTorch reference models on a CPU: tools/torch_compare.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # first: before anything starts threads (mim_jax/allocator.py)
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()

from absl import app, flags

# JAX only reads its thread and platform settings when the first computation runs (after
# pin_threads). TensorFlow and TFDS are imported where they are used, so a train-mode run
# needs neither.
from mim_jax.benchmark import run_flags
from mim_jax.benchmark.compare_steps import label_suffix, run_compare_steps
from mim_jax.benchmark.input_pipeline import run_input
from mim_jax.benchmark.model_config import apply_overrides
from mim_jax.benchmark.report import report
from mim_jax.benchmark.train_mode import run_train
from mim_jax.config_file import load_config

MODES = ("train", "input", "compare_steps")

_RUN = run_flags.define(
    "Timed steps (train, compare_steps) or batches (input).", None,
    "Global batch size. Default: config.batch_size (train, compare_steps), 128 (input).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to measure.")
_PEAK_FLOPS = flags.DEFINE_float(
    "peak_flops", None, "Peak FLOP/s of ONE device for MFU; default: the built-in table.")
_DATA = flags.DEFINE_bool(
    "data", None, "train: also time the loop with the real input pipeline (default: when "
    "config.data.name is not 'synthetic').")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "train: also write a jax.profiler trace of 3 steps and the compiled "
    "step's HLO text to this folder (any backend; open it with TensorBoard's profile plugin, "
    "or summarise a GPU's with python -m mim_jax.benchmark.gpu_trace).")
_ALSO = flags.DEFINE_multi_string(
    "also", [], "compare_steps: another config (path[:arg][+field=value...]) whose train step "
    "is timed next to --config's, e.g. --also configs/spark.py:model=resnet50 or --also "
    "configs/mae.py+model.remat=full. Repeatable.")
_INPUT_FORMAT = flags.DEFINE_enum(
    "input_format", "tfds", ("tfds", "folder"),
    "input: JPEGs as TFDS records (TFRecord files, like ImageNet in TFDS) or as a folder of files.")
_INPUT_IMAGES = flags.DEFINE_integer("input_images", 2048, "input: images to generate.")
_INPUT_DIR = flags.DEFINE_string(
    "input_dir", None, "input: where the generated dataset lives (reused when present); default: "
    "a folder in the system temp directory.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    threads, steps, warmup = _RUN.start()
    config, batch, image_size = _RUN.config.value, _RUN.batch.value, _RUN.image_size.value
    if _MODE.value == "input":
        apply_overrides(config, None, image_size, None)
        result = run_input(config, threads, batch, steps, warmup, _INPUT_FORMAT.value,
                           _INPUT_IMAGES.value, _INPUT_DIR.value)
    elif _MODE.value == "compare_steps":
        if not _ALSO.value:
            raise app.UsageError("--mode compare_steps needs at least one --also CONFIG.")
        configs = [config] + [load_config(s, flag="--also") for s in _ALSO.value]
        result = run_compare_steps(configs, threads, steps, warmup, batch, image_size,
                                   [""] + [label_suffix(s) for s in _ALSO.value])
    else:
        apply_overrides(config, batch, image_size, _RUN.variant.value)
        result = run_train(config, threads, _DATA.value, steps, warmup, _PEAK_FLOPS.value,
                           _TRACE_DIR.value)
    result["command"] = " ".join(["python -m mim_jax.benchmark"] + sys.argv[1:])
    report(result, _RUN.json_out.value)


def run():
    # Configs import `configs.common`: make the repository root importable from anywhere.
    sys.path.insert(0, os.getcwd())
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
