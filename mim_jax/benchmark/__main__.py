"""Benchmarks: train-step speed, FLOPs, MFU and memory; input pipeline; PyTorch side by side.

Run from the repository root (configs/ is imported as a package from the working directory):

  # Train step on on-device synthetic images (+ the real input pipeline unless data is synthetic)
  python -m mim_jax.benchmark --config configs/mae.py:variant=B/16 --batch 256 \
      --config.data.name=synthetic --json_out b16.json
  python -m mim_jax.benchmark --config configs/mae.py:quickstart --steps 20

  # Input pipeline alone: JPEG decode + RandomResizedCrop + flip at 224 px, images/s per core
  python -m mim_jax.benchmark --config configs/mae.py --mode input

  # mim_jax vs Hugging Face PyTorch ViTMAE (in a process of its own, --torch_process), same
  # threads / batch / model, float32
  python -m mim_jax.benchmark --config configs/mae.py --mode compare_torch --batch 16 \
      --warmup 2 --steps 5
  # mim_jax SimMIM Swin-B/192 (window 6) vs transformers' SwinForMaskedImageModeling
  python -m mim_jax.benchmark --config configs/simmim.py --mode compare_torch --batch 16 \
      --warmup 1 --steps 3
  # mim_jax BEiT-B/16 (v1; version=2 for v2) vs transformers' BeitForMaskedImageModeling, and
  # the mim_jax step with its tokenizer (random weights: the time does not depend on them)
  python -m mim_jax.benchmark --config configs/beit.py:version=1 --mode compare_torch \
      --batch 16 --warmup 2 --steps 5

  # MAE ViT-B/16's attention (encoder and decoder shapes) vs torch SDPA, forward + backward
  python -m mim_jax.benchmark --config configs/mae.py --mode compare_attention --steps 11
  python -m mim_jax.benchmark --config configs/simmim.py --mode compare_attention --steps 9

  # Every product of MAE ViT-B/16's train step timed alone, mim_jax vs torch.einsum
  python -m mim_jax.benchmark --config configs/mae.py --mode compare_products --steps 5

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
  compare_torch  The mim_jax train step and transformers' PyTorch model + AdamW, timed interleaved
                 (A, B, A, B, ...) on the CPU with the same thread count: MAE ViT vs
                 ViTMAEForPreTraining, SimMIM Swin vs SwinForMaskedImageModeling, or BEiT ViT
                 vs BeitForMaskedImageModeling. Float32 on both sides; with bfloat16
                 products (model.matmul_precision) PyTorch's forward runs under its CPU
                 bfloat16 autocast, the like-for-like setting. BEiT: both sides get token
                 ids as labels (no tokenizer), and the mim_jax step that runs its tokenizer
                 (dVAE at 112 px / VQ-KD) is timed as a third call per round, for the
                 tokenizer's share.
  compare_attention
                 Attention alone, forward + backward, float32: mim_jax's (own and 'xla') next to
                 torch's scaled_dot_product_attention and its eager softmax(q k^T) v, at the
                 config's shapes (MAE: encoder on the visible tokens, and the decoder; Swin:
                 each stage's windows, with the relative position bias and shift mask), timed
                 interleaved; how much of the compare_torch gap the attention core explains.
  compare_products
                 Every matrix product of the train step (read from its jaxpr: forward,
                 backward, inside remat / scan / cond) compiled alone with the step's products
                 library (config.cpu_dots) and timed interleaved with torch.einsum on the same
                 operands (the step's dtypes), on the CPU: per-step sums on both sides and the
                 shapes that lose the most. mim_jax's sum is an upper bound (each product
                 alone carries its own layout copies); PyTorch's is close to its step's.
  compare_steps  mim_jax train steps of --config and every --also config, timed interleaved at
                 the same batch / image size: step-time ratios to --config's step, XLA FLOPs,
                 and with --profile where each step's time goes.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # first of all: glibc reads its MALLOC_* policy only at start-up
    from mim_jax.allocator import reexec_with_cpu_allocator
    reexec_with_cpu_allocator()

from absl import app, flags
from ml_collections import config_flags

# JAX only reads its thread and platform settings when the first computation runs (after
# pin_threads). TensorFlow, TFDS, torch and transformers are imported where they are used, so
# a train-mode run needs none of them.
from mim_jax.benchmark.compare_attention import run_compare_attention
from mim_jax.benchmark.compare_products import run_compare_products
from mim_jax.benchmark.compare_steps import label_suffix, load_config, run_compare_steps
from mim_jax.benchmark.compare_torch import run_compare_torch
from mim_jax.benchmark.environment import pin_threads
from mim_jax.benchmark.input_pipeline import run_input
from mim_jax.benchmark.model_config import apply_overrides
from mim_jax.benchmark.report import report
from mim_jax.benchmark.train_mode import run_train

MODES = ("train", "input", "compare_torch", "compare_steps", "compare_attention",
         "compare_products")

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
    "variant", None, "Overrides config.model.variant (compare_torch default for a ViT: B/16).")
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
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "train: also write a jax.profiler trace of 3 steps and the compiled "
    "step's HLO text to this folder (any backend; open it with TensorBoard's profile plugin).")
_TOKENIZER_STEP = flags.DEFINE_bool(
    "tokenizer_step", True, "compare_torch with a tokenizer objective (BEiT): also time the "
    "mim_jax step that runs the tokenizer, interleaved as a third call per round.")
_TORCH_PROCESS = flags.DEFINE_enum(
    "torch_process", "own", ("own", "shared"),
    "compare_torch: run PyTorch in a process of its own with the environment the command was "
    "started in, less the allocator settings mim_jax adds for itself ('own'), or in mim_jax's "
    "process under those settings ('shared').")
_ALSO = flags.DEFINE_multi_string(
    "also", [], "compare_steps: another config (path[:arg][+field=value...]) whose train step "
    "is timed next to --config's, e.g. --also configs/mae.py:variant=B/16 or --also "
    "configs/mae.py+model.matmul_precision=bfloat16. Repeatable.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write every figure as JSON to this path.")
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
    mode = _MODE.value
    threads = pin_threads(_THREADS.value)  # before JAX, TF or torch start their pools
    steps, warmup = _STEPS.value, _WARMUP.value
    if steps <= 0 or warmup < 0:
        raise ValueError(f"--steps={steps} must be > 0 and --warmup={warmup} >= 0.")
    config = _CONFIG.value
    versus_torch = mode in ("compare_torch", "compare_attention", "compare_products")
    batch = _BATCH.value if _BATCH.value is not None else (16 if versus_torch else None)
    vit = config.model.get("name", "vit") == "vit"
    variant = _VARIANT.value or ("B/16" if mode == "compare_torch" and vit else None)
    if mode == "input":
        apply_overrides(config, None, _IMAGE_SIZE.value, None)
        result = run_input(config, threads, _BATCH.value, steps, warmup, _INPUT_FORMAT.value,
                           _INPUT_IMAGES.value, _INPUT_DIR.value)
    elif mode == "compare_steps":
        if not _ALSO.value:
            raise app.UsageError("--mode compare_steps needs at least one --also CONFIG.")
        result = run_compare_steps([config] + [load_config(s) for s in _ALSO.value], threads,
                                   steps, warmup, batch, _IMAGE_SIZE.value, _PROFILE.value,
                                   [""] + [label_suffix(s) for s in _ALSO.value])
    elif mode == "compare_attention":
        apply_overrides(config, batch, _IMAGE_SIZE.value, variant)
        result = run_compare_attention(config, threads, steps, warmup)
    elif mode == "compare_products":
        apply_overrides(config, batch, _IMAGE_SIZE.value, variant)
        result = run_compare_products(config, threads, steps, warmup)
    elif mode == "train":
        apply_overrides(config, batch, _IMAGE_SIZE.value, variant)
        result = run_train(config, threads, _DATA.value, steps, warmup, _PEAK_FLOPS.value,
                           _PROFILE.value, _TRACE_DIR.value)
    else:
        apply_overrides(config, batch, _IMAGE_SIZE.value, variant)
        result = run_compare_torch(config, threads, steps, warmup, _PROFILE.value,
                                   _TOKENIZER_STEP.value, _TORCH_PROCESS.value)
    result["command"] = " ".join(["python -m mim_jax.benchmark"] + sys.argv[1:])
    report(result, _JSON_OUT.value)


def run():
    # Configs import `configs.common`: make the repository root importable from anywhere.
    sys.path.insert(0, os.getcwd())
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
