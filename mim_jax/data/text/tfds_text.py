"""Texts of a TFDS dataset (e.g. 'wikipedia/20230601.en', 'lm1b') for the text stream.

Process i reads `tfds.even_splits(split, n)[i]`; an epoch shuffles its files (from the epoch's
seed) and its texts in a buffer, so the order is fixed by the seed, and a resume skips
undecoded strings only (see text/streams.py).
"""

from __future__ import annotations

from typing import Iterator, Optional

from mim_jax.data.tf_setup import tf  # first: hides accelerators from TensorFlow
import tensorflow_datasets as tfds


def feature(example, key: str):
    """`example[key]`, where a key 'a/b' reads a nested feature (e.g. 'captions/text')."""
    for part in key.split("/"):
        example = example[part]
    return example


def check_feature(features, key: str, field: str, name: str) -> None:
    """ValueError naming `field` when `key` ('a/b' for nested) is not a feature of `name`."""
    node = features
    for part in key.split("/"):
        keys = list(getattr(node, "keys", lambda: [])())
        if not keys and hasattr(node, "feature"):  # a Sequence of a dict
            node = node.feature
            keys = list(getattr(node, "keys", lambda: [])())
        if part not in keys:
            raise ValueError(f"{field}={key!r} is not a feature of TFDS dataset {name!r}; "
                             f"available: {sorted(keys)}.")
        node = node[part]


def prepared_builder(name: str, data_dir: Optional[str], manual_dir: Optional[str] = None):
    """The TFDS builder of `name`, prepared if it is not yet (never fetching pre-built data)."""
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False))
    return builder


def _deterministic() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


class TfdsTexts:
    """The strings of feature `text_key` of a TFDS split."""

    def __init__(self, name: str, *, split: str = "train", text_key: str = "text",
                 data_dir: Optional[str] = None, shuffle_buffer: int = 10_000):
        self.builder = prepared_builder(name, data_dir)
        check_feature(self.builder.info.features, text_key, "text.text_key", name)
        try:
            self.num_examples = int(self.builder.info.splits[split].num_examples)
        except (KeyError, ValueError):
            raise ValueError(f"text.split={split!r} is not a split of TFDS dataset {name!r}; "
                             f"available: {sorted(self.builder.info.splits.keys())}.") from None
        self.what = f"TFDS dataset {name!r}, split {split!r}"
        self._split, self._key, self._buffer = split, text_key, shuffle_buffer

    def epoch_texts(self, process_index: int, process_count: int, shuffle_seed: int,
                    skip: int) -> Iterator[str]:
        shard = tfds.even_splits(self._split, n=process_count)[process_index]
        shuffle_files = not self.builder.info.disable_shuffling
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed if shuffle_files else None,
                                      try_autocache=False, options=_deterministic())
        ds = self.builder.as_dataset(split=shard, shuffle_files=shuffle_files,
                                     read_config=read_config)
        key = self._key
        ds = ds.map(lambda example: feature(example, key))
        ds = ds.shuffle(self._buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.skip(skip).batch(1024).prefetch(2).with_options(_deterministic())
        for texts in ds.as_numpy_iterator():
            yield from (t.decode("utf-8", errors="replace") for t in texts)
