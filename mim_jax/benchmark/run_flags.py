"""The flags every benchmark command takes (python -m mim_jax.benchmark, python -m
tools.torch_compare): the config, the steps to time, batch, image size, threads, JSON output."""
from __future__ import annotations

import dataclasses
from typing import Optional

from absl import flags
from ml_collections import config_flags

from mim_jax.benchmark.environment import pin_threads


@dataclasses.dataclass(frozen=True)
class RunFlags:
    config: flags.FlagHolder
    steps: flags.FlagHolder
    warmup: flags.FlagHolder
    batch: flags.FlagHolder
    image_size: flags.FlagHolder
    variant: flags.FlagHolder
    threads: flags.FlagHolder
    json_out: flags.FlagHolder

    def start(self) -> tuple:
        """Pins the threads (before JAX, TF or torch start their pools) and checks the step
        counts -> (threads, steps, warmup)."""
        threads = pin_threads(self.threads.value)
        steps, warmup = self.steps.value, self.warmup.value
        if steps <= 0 or warmup < 0:
            raise ValueError(f"--steps={steps} must be > 0 and --warmup={warmup} >= 0.")
        return threads, steps, warmup


def define(steps_help: str, batch_default: Optional[int], batch_help: str,
           variant_help: str = "Overrides config.model.variant.") -> RunFlags:
    return RunFlags(
        config=config_flags.DEFINE_config_file(
            "config", None, "Experiment config file, e.g. configs/mae.py:variant=B/16.",
            lock_config=False),
        steps=flags.DEFINE_integer("steps", 10, steps_help),
        warmup=flags.DEFINE_integer("warmup", 3, "Untimed steps / batches before timing."),
        batch=flags.DEFINE_integer("batch", batch_default, batch_help),
        image_size=flags.DEFINE_integer("image_size", None, "Overrides config.data.image_size."),
        variant=flags.DEFINE_string("variant", None, variant_help),
        threads=flags.DEFINE_integer(
            "threads", None, "CPU threads for XLA, tf.data and PyTorch (pins the process to "
            "that many cores); default: every core this process may use."),
        json_out=flags.DEFINE_string("json_out", None, "Write every figure as JSON to this path."))
