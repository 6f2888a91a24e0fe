"""Single entry point for importing TensorFlow inside the input pipeline.

TensorFlow is only used here for tf.data / TFDS on the host CPU.  If it were
allowed to see the accelerators it would pre-allocate their memory and fight
with JAX, so every module of this package imports `tf` from here, which hides
the GPUs exactly once, before any TF op can initialise the devices.
"""

import tensorflow as tf


def _hide_accelerators() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # Devices were already initialised by someone else's TF code; visibility
        # can no longer change.  Not fatal for a CPU-only input pipeline.
        pass


_hide_accelerators()

__all__ = ["tf"]
