"""--mode compare_steps: several objectives' train steps side by side in one process.

Each config's real train step (the trainer's, on on-device synthetic images at the same batch
and image size) is compiled, then all are timed interleaved (A, B, C, A, B, C, ...), so the
ratios between them are measured under the same machine load. FLOPs are XLA's count of the
compiled step (ConvNets have no analytic count), so "GFLOP/s" compares how well each step uses
the machine, and the ratios say what a user pays per image.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from mim_jax.benchmark.environment import environment
from mim_jax.benchmark.model_config import apply_overrides
from mim_jax.benchmark.timing import call_summary, interleaved_calls, paired_ratios
from mim_jax.benchmark.train_step import (StepRunner, build_train_setup, compile_step, xla_flops,
                                          xla_memory)


def label_suffix(spec: str) -> str:
    """' + model.x=y, ...' for a spec with fields (mim_jax.config_file.load_config), else ''."""
    fields = spec.split("+")[1:]
    return " + " + ", ".join(fields) if fields else ""


def label_of(config) -> str:
    model = config.model
    label = f"{config.objective.name} {model.get('name', 'vit')}-{model.get('variant')}"
    if model.get("name") == "convnext" and config.objective.get("gather_visible") is False:
        label += " (dense masked blocks)"
    return label


def run_compare_steps(configs: Sequence, threads: int, steps: int, warmup: int,
                      batch: Optional[int], image_size: Optional[int],
                      suffixes: Sequence[str] = ()) -> dict:
    """configs: the first is the reference every ratio divides by; suffixes: appended to
    the labels (label_suffix of each spec)."""
    runners, entries = {}, {}
    suffixes = list(suffixes) + [""] * (len(configs) - len(suffixes))
    for config, suffix in zip(configs, suffixes):
        apply_overrides(config, batch, image_size, None)
        label = label_of(config) + suffix
        while label in runners:
            label += "'"
        setup = build_train_setup(config)
        compiled, compile_times = compile_step(setup)
        runners[label] = StepRunner(compiled, setup.state, setup.batch)
        flops = xla_flops(compiled)
        entries[label] = {"compile": compile_times, "xla_memory": xla_memory(compiled),
                          "xla_train_flops_per_image": flops and flops / config.batch_size,
                          "batch_size": config.batch_size,
                          "image_size": config.data.image_size}
    calls = interleaved_calls(runners, steps, warmup)
    first = next(iter(runners))
    for label, entry in entries.items():
        summary = call_summary(calls[label])
        entry["step_time"] = summary
        entry["images_per_sec"] = entry["batch_size"] / summary["median_s"]
        per_image = entry["xla_train_flops_per_image"]
        entry["achieved_flops_per_sec"] = per_image and per_image * entry["images_per_sec"]
        entry["step_over_first_paired_wall"] = paired_ratios(calls[label], calls[first],
                                                             "wall_s")
        entry["final_loss"] = float(runners[label].metrics["loss"])
    return {"mode": "compare_steps", "environment": environment(threads), "threads": threads,
            "xla_cpu_pool": os.environ.get("PJRT_NPROC"),
            "reference": first, "steps": entries}
