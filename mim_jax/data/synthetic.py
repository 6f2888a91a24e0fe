"""Synthetic images without TensorFlow: for benchmarks and hosts that have only JAX.

Every step sees one fixed global batch of smooth random images (low-frequency patterns, so an
objective can still learn something); each process yields its rows of it, so a run's data does
not depend on how many processes share it; an "epoch" is `synthetic_steps_per_epoch`
steps. Select it with data.name='synthetic'. Like the real pipelines it yields uint8 pixels,
normalised on the device (mim_jax.data.normalize_images); the pixels are chosen so that the
normalised images are the smooth standard-normal fields (up to rounding and clipping).
"""

from __future__ import annotations

import numpy as np

NAME = "synthetic"
STEPS_PER_EPOCH = 1000
NUM_CLASSES = 10  # labels (fine-tuning benchmarks) are the image index modulo this
EVAL_EXAMPLES = 256


def _smooth_images(rng, n, data_cfg, low=None):
    size, channels = data_cfg.image_size, data_cfg.channels
    if low is None:
        low = rng.standard_normal((n, 4, 4, channels)).astype(np.float32)
    up = np.repeat(np.repeat(low, -(-size // 4), axis=1), -(-size // 4), axis=2)
    # uint8 pixels whose normalisation (x / 255 - mean) / std is close to the field.
    mean = np.asarray(data_cfg.mean, np.float32)
    std = np.asarray(data_cfg.std, np.float32)
    pixels = np.rint(255.0 * (mean + std * up[:, :size, :size]))
    return np.clip(pixels, 0, 255).astype(np.uint8)


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
        with_labels=False,
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
        rows = range(process_index * local, (process_index + 1) * local)
        # One generator per global row: the same image whatever the process count.
        low = np.stack([np.random.default_rng([seed, row]).standard_normal(
            (4, 4, data_cfg.channels)).astype(np.float32) for row in rows])
        self._batch = {"image": _smooth_images(None, local, data_cfg, low)}
        if with_labels:
            self._batch["label"] = np.asarray(rows, dtype=np.int64) % NUM_CLASSES
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
    return _smooth_images(rng, num, data_cfg)


def eval_batches(data_cfg, *, global_batch_size, max_examples=None):
    """A fixed labelled eval set, as data.eval_batches yields it: this process's rows of each
    global batch (the last one padded, valid False)."""
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
    local = global_batch_size // process_count
    n = min(EVAL_EXAMPLES, max_examples or EVAL_EXAMPLES)
    images = fixed_images(data_cfg, n)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    for start in range(0, n, global_batch_size):
        k = min(global_batch_size, n - start)
        image = np.zeros((global_batch_size,) + images.shape[1:], np.uint8)
        image[:k] = images[start:start + k]
        label = np.zeros((global_batch_size,), np.int64)
        label[:k] = labels[start:start + k]
        rows = slice(process_index * local, (process_index + 1) * local)
        yield {"image": image[rows], "label": label[rows],
               "valid": (np.arange(global_batch_size) < k)[rows]}
