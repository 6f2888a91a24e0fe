"""Entry point: python -m mim_jax.main --config configs/NAME.py[:ARGS] --workdir DIR.

Run the same command on every host of a multi-host job with --distributed (or set
JAX_COORDINATOR_ADDRESS etc.); see launch/ for ready-made scripts.
"""
from __future__ import annotations

import os
import sys
import threading

if __name__ == "__main__":  # first: before anything starts threads (mim_jax/allocator.py)
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()

from absl import app, flags, logging
from ml_collections import config_flags

from mim_jax import paths, reporting
from mim_jax.errors import RunError, Stopped, one_line

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/mae.py:quickstart.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images: "
                                "a local path or gs://BUCKET/path.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize(): on TPU pods and SLURM the cluster is auto-detected; "
    "elsewhere pass the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Continue a run in --workdir although its config changed (e.g. a longer schedule); the "
    "new config is recorded next to the old one. Without it such a run is refused.")
flags.mark_flags_as_required(["config", "workdir"])


def _one_line_background_failures():
    """A failed asynchronous save makes orbax's threads (and tensorstore's callbacks into their
    closed event loops) print dozens of tracebacks; the trainer reports the failure once, as a
    CheckpointError. Background failures become one warning line each instead."""
    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        logging.warning("Background thread %s failed: %s: %s", args.thread.name if args.thread
                        else "?", args.exc_type.__name__, one_line(args.exc_value)[:300])

    def unraisable_hook(unraisable):
        logging.warning("Ignored in background: %s", one_line(unraisable.exc_value)[:300])
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(reporting.QuietLibraries())
    _one_line_background_failures()
    import jax  # after absl has parsed flags, so JAX picks up its own flags and env
    if _DISTRIBUTED.value:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU-only multi-process runs (tests, debugging) need a collectives backend.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    if jax.process_count() > 1:
        logging.get_absl_handler().addFilter(
            reporting.ProcessTag(jax.process_index(), jax.process_count()))
    from mim_jax import train
    logging.info("JAX %s, %d process(es), %d devices: %s", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    try:
        train.train_and_evaluate(_CONFIG.value, paths.resolve(_WORKDIR.value),
                                 allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except RunError as e:
        # Something the user must act on: one line, no traceback (see mim_jax.errors).
        logging.flush()
        kind = "" if isinstance(e, Stopped) else "error: "
        print(f"mim_jax: {kind}{one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except OSError as e:
        # The machine, not the code: a full disk, a permission, a vanished file or mount.
        logging.flush()
        print(f"mim_jax: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


def _user_cause(error: BaseException) -> BaseException:
    """The first exception in the chain whose text is not a formatted traceback: config_flags
    wraps the config file's own error that way; absl's flag errors name the flag."""
    chain = [error]
    while len(chain) < 20:  # bounded: exception chains can loop
        last = chain[-1]
        nxt = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    for e in chain:
        if "Traceback (most recent" not in str(e):
            return e
    return chain[-1]


def _parse_flags(argv):
    """absl's parser, but a bad --config / override is ONE line (exit 2), not a traceback:
    the config file's own error or the unknown field, as the user typed it."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - whatever the config file raised
        cause = _user_cause(e)
        message = one_line(cause)
        if isinstance(cause, (AttributeError, KeyError)):
            text = cause
            while isinstance(text, BaseException) and text.args:  # unwrap KeyError reprs
                text = text.args[0]
            message = f"the config has no field {one_line(text)}"
        print(f"mim_jax: error: bad command line: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def run():
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()  # for the mim-jax-train command; under `python -m` it is set already
    # Configs import `configs.common`: make the repository root importable from anywhere.
    sys.path.insert(0, os.getcwd())
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
