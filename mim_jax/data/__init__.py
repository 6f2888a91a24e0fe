"""Input pipeline of mim_jax: the only package that uses TensorFlow / TFDS.

TensorFlow is imported only when a TF-backed dataset is used, so hosts with JAX alone can
run on data.name='synthetic'. The first such import hides accelerators from TensorFlow and
registers the offline `mnist5k` TFDS dataset.
"""

from __future__ import annotations

import os

import numpy as np

from mim_jax import paths
from mim_jax.data import synthetic
from mim_jax.data.config import default_data_config, validate_data_config


def _pipeline():
    from mim_jax.data import pipeline  # imports TensorFlow and hides accelerators from it

    return pipeline


def prepare(data_cfg) -> None:
    """Builds the TFDS dataset if it is not prepared yet (mnist5k: from the bundled digits).

    Multi-process runs call this on one process before the others read, so that no two
    processes prepare the same dataset at once.
    """
    if data_cfg.name in (synthetic.NAME, "folder"):
        return
    from mim_jax.data import sources

    sources.make_source(data_cfg)  # a TFDS source prepares its dataset when it is missing


# Split sizes known without touching any data: mnist5k is bundled (data/mnist5k.py), so a bad
# split or an oversized batch fails at start-up, not after TensorFlow has loaded.
KNOWN_SPLITS = {"mnist5k": {"train": 4500, "test": 500}}


def check_known_splits(data_cfg, global_batch_size: int, process_count: int = 1) -> None:
    """Raises ValueError for a split that does not exist or a batch larger than the split,
    where the sizes are known statically (other datasets are checked once prepared)."""
    sizes = KNOWN_SPLITS.get(data_cfg.name)
    if sizes is None:
        return
    for field in ("split", "eval_split"):
        split = data_cfg.get(field)
        if split and split not in sizes:
            raise ValueError(f"data.{field}={split!r} is not a split of {data_cfg.name!r}; "
                             f"allowed: {sorted(sizes)}.")
    total = sizes[data_cfg.split]
    if global_batch_size > total - total % process_count:
        raise ValueError(f"batch_size={global_batch_size} is larger than the split "
                         f"data.split={data_cfg.split!r} of {data_cfg.name!r} ({total} "
                         "examples): it must be <= the examples per epoch.")


def check_data_dir(data_cfg) -> None:
    """data.data_dir must be a directory or creatable as one (TFDS prepares data into it)."""
    path = data_cfg.get("data_dir")
    if not path or data_cfg.name in (synthetic.NAME, "folder"):
        return
    if not paths.is_local(path):
        return  # a bucket (gs://) has no directories to check; TFDS reports what it cannot do
    path = os.path.abspath(os.path.expanduser(path))
    existing = path
    while not os.path.exists(existing):  # the nearest ancestor that exists decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK) and \
            existing != path:
        raise ValueError(f"data.data_dir={data_cfg.data_dir!r} cannot be used: {existing!r} is "
                         "not a writable directory; pass a directory for the datasets.")


def create_train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index=None,
    process_count=None,
    with_labels: bool = False,
):
    """Per-process training batches {'image': uint8 [local_batch, H, W, C]} (and 'label'
    int64 [local_batch] with `with_labels`) from step `start_step` on; see
    pipeline.create_train_iterator for the guarantees."""
    kwargs = dict(
        global_batch_size=global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        with_labels=with_labels,
    )
    if data_cfg.name == synthetic.NAME:
        validate_data_config(data_cfg)
        return synthetic.SyntheticData(data_cfg, **kwargs)
    return _pipeline().create_train_iterator(data_cfg, **kwargs)


def fixed_eval_images(data_cfg, num: int, minimum=None) -> np.ndarray:
    """The first `num` evaluation images, deterministic and identical on every process; with
    `minimum`, fewer are fine down to that many (a small folder)."""
    if data_cfg.name == synthetic.NAME:
        return synthetic.fixed_images(data_cfg, num)
    return _pipeline().fixed_eval_images(data_cfg, num, minimum)


def eval_batches(data_cfg, split: str, *, global_batch_size: int, max_examples=None):
    """One labelled, deterministic pass over `split` (this process's shard), padded to equal
    batch counts on every process: {'image', 'label', 'valid'}; see pipeline.eval_batches."""
    if data_cfg.name == synthetic.NAME:
        return synthetic.eval_batches(data_cfg, global_batch_size=global_batch_size,
                                      max_examples=max_examples)
    return _pipeline().eval_batches(data_cfg, split, global_batch_size=global_batch_size,
                                    max_examples=max_examples)


def num_classes(data_cfg):
    """The number of classes of data.label_key (None when the source does not say)."""
    if data_cfg.name == synthetic.NAME:
        return synthetic.NUM_CLASSES
    from mim_jax.data import sources  # imports TensorFlow

    return sources.num_classes(data_cfg)


def missing_labels(data_cfg):
    """Why `data_cfg` cannot give labels (data.label_key), or None when it can (or cannot be
    told yet: a dataset that is not prepared reports its own problems when it is read)."""
    if data_cfg.name == synthetic.NAME or data_cfg.name in KNOWN_SPLITS:
        return None
    from mim_jax.data import sources  # imports TensorFlow

    return sources.missing_labels(data_cfg)


def missing_split(data_cfg, split: str):
    """Why `split` cannot be read from `data_cfg`'s dataset, or None when it can (or cannot be
    told before the dataset is prepared). A folder and synthetic data have one split."""
    if data_cfg.name == synthetic.NAME or data_cfg.name == "folder":
        return None
    sizes = KNOWN_SPLITS.get(data_cfg.name)
    if sizes is not None:
        return None if split in sizes else f"{split!r} is not a split of {data_cfg.name!r} " \
                                          f"(splits: {sorted(sizes)})"
    from mim_jax.data import sources  # imports TensorFlow

    return sources.missing_split(data_cfg, split)


def normalize_images(images, data_cfg):
    """The one place where pixels are normalised, on the device: call it at the start of every
    jitted computation that consumes batch["image"].

    The pipelines emit uint8 pixels (4x fewer host -> device bytes than float32, and no
    per-pixel float work on the host); an integer array becomes float32 (x / 255 - mean) / std
    with the config's data.mean / data.std (in [0, 1] units, one value per channel). A
    floating array is taken as already normalised and only cast to float32. Works on numpy
    and jax arrays, inside and outside jit (the dtype is static)."""
    import jax.numpy as jnp

    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(jnp.float32)
    if data_cfg is None:
        raise ValueError("uint8 images need the data config (its mean / std) to be normalised.")
    if images.dtype != jnp.uint8:
        raise TypeError(f"images of dtype {images.dtype}: expected uint8 pixels in [0, 255] "
                        "or already-normalised floats.")
    mean = np.asarray(data_cfg.mean, np.float32)
    std = np.asarray(data_cfg.std, np.float32)
    # The same float32 arithmetic as the host pipeline used (image_ops.normalize).
    return (images.astype(jnp.float32) / 255.0 - mean) / std


IMAGE_KEYS = ("image", "pair_image")  # a mixed batch's images (data/text/mixed.py)


def normalize_batch(batch: dict, data_cfg) -> dict:
    """`batch` with its images ('image', and 'pair_image' of a mixed batch) passed through
    normalize_images; other entries untouched."""
    return dict(batch, **{k: normalize_images(batch[k], data_cfg) for k in IMAGE_KEYS
                          if k in batch})


def denormalize(images, data_cfg) -> np.ndarray:
    """Pixels in [0, 1] for viewing: uint8 pipeline output / 255, or the inverse of the
    normalisation of floats, clipped to [0, 1]."""
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.float32) / 255.0
    mean = np.asarray(data_cfg.mean, np.float32)
    std = np.asarray(data_cfg.std, np.float32)
    return np.clip(images.astype(np.float32) * std + mean, 0.0, 1.0)


__all__ = [
    "check_data_dir",
    "check_known_splits",
    "create_train_iterator",
    "prepare",
    "default_data_config",
    "denormalize",
    "eval_batches",
    "fixed_eval_images",
    "missing_labels",
    "missing_split",
    "normalize_batch",
    "normalize_images",
    "num_classes",
    "validate_data_config",
]
