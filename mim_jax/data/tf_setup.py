"""Single entry point for importing TensorFlow inside the input pipeline.

TensorFlow is only used here for tf.data / TFDS on the host CPU.  If it were
allowed to see the accelerators it would pre-allocate their memory and fight
with JAX, so every module of this package imports `tf` from here, which hides
the GPUs exactly once, before any TF op can initialise the devices.
"""

import os
import re
import sys
import tempfile

# TensorFlow's C++ start-up banner: absl's "All log messages before absl::InitializeLog() is
# called are written to STDERR" warning plus oneDNN and CPU-feature notices. Recent releases
# print it whatever TF_CPP_MIN_LOG_LEVEL says, between a run's log records and its one-line
# errors, so it is held back during the import; anything else printed then is passed on.
_BANNER = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations "
                     r"are on|cpu_feature_guard|To enable the following instructions")


def _import_tensorflow_quietly():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # pylint: disable=g-import-not-at-top
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not _BANNER.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
    return tensorflow


tf = _import_tensorflow_quietly()


def _hide_accelerators() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # Devices were already initialised by someone else's TF code; visibility
        # can no longer change.  Not fatal for a CPU-only input pipeline.
        pass


_hide_accelerators()

__all__ = ["tf"]
