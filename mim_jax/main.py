"""Entry point: python -m mim_jax.main --config configs/NAME.py[:ARGS] --workdir DIR.

Run the same command on every host of a multi-host job with --distributed (or set
JAX_COORDINATOR_ADDRESS etc.); see launch/ for ready-made scripts.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import reporting

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/mae.py:quickstart.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize(): on TPU pods and SLURM the cluster is auto-detected; "
    "elsewhere pass the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(reporting.QuietLibraries())
    import jax  # after absl has parsed flags, so JAX picks up its own flags and env
    if _DISTRIBUTED.value:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU-only multi-process runs (tests, debugging) need a collectives backend.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from mim_jax import train
    logging.info("JAX %s, %d process(es), %d devices: %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    train.train_and_evaluate(_CONFIG.value, os.path.abspath(_WORKDIR.value))


def run():
    # Configs import `configs.common`: make the repository root importable from anywhere.
    sys.path.insert(0, os.getcwd())
    app.run(main)


if __name__ == "__main__":
    run()
