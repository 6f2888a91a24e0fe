"""Synthetic images without TensorFlow: for benchmarks and hosts that have only JAX.

Each process yields one fixed batch of smooth random images (low-frequency patterns, so an
objective can still learn something) at every step; an "epoch" is `synthetic_steps_per_epoch`
steps. Select it with data.name='synthetic'.
"""

from __future__ import annotations

import numpy as np

NAME = "synthetic"
STEPS_PER_EPOCH = 1000


def _smooth_images(rng, n, size, channels):
    low = rng.standard_normal((n, 4, 4, channels)).astype(np.float32)
    up = np.repeat(np.repeat(low, -(-size // 4), axis=1), -(-size // 4), axis=2)
    return up[:, :size, :size]


class SyntheticData:
    def __init__(
        self,
        data_cfg,
        *,
        global_batch_size,
        seed,
        start_step=0,
        process_index=None,
        process_count=None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if global_batch_size % process_count:
            raise ValueError(
                f"batch_size={global_batch_size} is not divisible by the process "
                f"count {process_count}."
            )
        local = global_batch_size // process_count
        rng = np.random.default_rng([seed, process_index])
        self._batch = {"image": _smooth_images(rng, local, data_cfg.image_size, data_cfg.channels)}
        self.num_examples = local * STEPS_PER_EPOCH
        self.steps_per_epoch = STEPS_PER_EPOCH
        self.skipped_images = 0
        del start_step  # every step sees the same batch, so resuming needs no offset

    def __iter__(self):
        return self

    def __next__(self):
        return self._batch


def fixed_images(data_cfg, num):
    rng = np.random.default_rng([12345])
    return _smooth_images(rng, num, data_cfg.image_size, data_cfg.channels)
