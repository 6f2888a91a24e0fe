"""mim_jax's train step next to transformers' PyTorch model + AdamW, on the CPU, float32.

Run from the repository root (the test extra installs torch and transformers):

  # MAE ViT-B/16 vs ViTMAEForPreTraining
  python -m tools.torch_compare --config configs/mae.py --batch 16 --image_size 224 \
      --warmup 2 --steps 5
  # SimMIM Swin-B/192 (window 6) vs SwinForMaskedImageModeling
  python -m tools.torch_compare --config configs/simmim.py --batch 16 --warmup 1 --steps 3
  # BEiT-B/16 (v1; version=2 for v2) vs BeitForMaskedImageModeling, and the mim_jax step with
  # its tokenizer (random weights: the time does not depend on them)
  python -m tools.torch_compare --config configs/beit.py:version=1 --batch 16 --warmup 2 \
      --steps 5

The two steps are timed interleaved (A, B, A, B, ...) with the same thread count. BEiT: both
sides get token ids as labels (no tokenizer), and the mim_jax step that runs its tokenizer
(dVAE at 112 px / VQ-KD) is timed as a third call per round, for the tokenizer's share.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # first: before anything starts threads (mim_jax/allocator.py)
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()

from absl import app, flags

from mim_jax.benchmark import run_flags
from mim_jax.benchmark.model_config import apply_overrides
from mim_jax.benchmark.report import report
from tools.torch_compare.compare_torch import compare_rows, run_compare_torch

_RUN = run_flags.define("Timed steps per side.", 16, "Batch size of both steps.",
                        "Overrides config.model.variant (default for a ViT: B/16).")
_TOKENIZER_STEP = flags.DEFINE_bool(
    "tokenizer_step", True, "With a tokenizer objective (BEiT): also time the mim_jax step "
    "that runs the tokenizer, interleaved as a third call per round.")
_TORCH_PROCESS = flags.DEFINE_enum(
    "torch_process", "own", ("own", "shared"),
    "Run PyTorch in a process of its own, with glibc's default allocator ('own'), or in "
    "mim_jax's process under its allocator policy ('shared').")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    threads, steps, warmup = _RUN.start()
    config = _RUN.config.value
    vit = config.model.get("name", "vit") == "vit"
    apply_overrides(config, _RUN.batch.value, _RUN.image_size.value,
                    _RUN.variant.value or ("B/16" if vit else None))
    result = run_compare_torch(config, threads, steps, warmup, _TOKENIZER_STEP.value,
                               _TORCH_PROCESS.value)
    result["command"] = " ".join(["python -m tools.torch_compare"] + sys.argv[1:])
    report(result, _RUN.json_out.value, compare_rows)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # configs import configs.common
    flags.mark_flag_as_required("config")
    app.run(main)
