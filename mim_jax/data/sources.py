"""Where encoded images come from: a TFDS dataset or a folder of files.

A source hands the pipeline *references* to encoded images, already in the
per-epoch shuffled order of one process's shard:
  * TFDS: the encoded image bytes themselves (decoding is skipped at load
    time, so the shuffle buffer holds compressed bytes, not pixels);
  * folder: file paths; the bytes are read only after the resume `skip`, so
    skipped records cost nothing but a string.
`load` turns a reference into encoded bytes inside the tf.data graph.

Sharding: process `i` of `n` reads a disjoint part of the split and the parts
together cover it (TFDS: `tfds.even_splits`; folder: `files[i::n]`).
"""

import os
from typing import Optional, Sequence

import numpy as np
from etils import epath

from mim_jax.data.tf_setup import tf  # first: hides accelerators from TensorFlow
import tensorflow_datasets as tfds

from mim_jax import paths as paths_lib
from mim_jax.data import config as config_lib
from mim_jax.data import mnist5k  # noqa: F401  (registers the bundled TFDS dataset)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


class TfdsSource:
    """Any TFDS dataset (prepared on demand for mnist5k or when missing).

    Records are {'ref': encoded image} or, with `label_key`, also {'label': int64}.
    """

    def __init__(self, cfg, label_key: Optional[str] = None):
        self._image_key = cfg.image_key
        self._label_key = label_key
        download_config = tfds.download.DownloadConfig(
            manual_dir=cfg.manual_dir,
            # Never reach for the network to fetch pre-built data.
            try_download_gcs=False,
        )
        self.builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
        # mnist5k is tiny and built offline, so it is always prepared on demand
        # (a no-op once it exists); other datasets only when not there yet, e.g.
        # ImageNet from the tar files in `manual_dir`.
        if cfg.name == config_lib.MNIST5K or not self.builder.is_prepared():
            self.builder.download_and_prepare(download_config=download_config)
        features = self.builder.info.features
        if self._image_key not in features:
            raise ValueError(
                f"data.image_key={self._image_key!r} is not a feature of TFDS "
                f"dataset {cfg.name!r}; available: {sorted(features.keys())}."
            )
        if label_key is not None and label_key not in features:
            raise ValueError(
                f"data.label_key={label_key!r} is not a feature of TFDS dataset "
                f"{cfg.name!r}; available: {sorted(features.keys())}."
            )


    def num_examples(self, split: str) -> int:
        try:
            return int(self.builder.info.splits[split].num_examples)
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"data.split={split!r} is not valid for TFDS dataset "
                f"{self.builder.name!r}; available splits: "
                f"{sorted(self.builder.info.splits.keys())}. ({e})"
            ) from None

    def shard_size(self, split: str, process_index: int, process_count: int) -> int:
        shard = tfds.even_splits(split, n=process_count)[process_index]
        return int(self.builder.info.splits[shard].num_examples)

    def _examples(self, split, shuffle_seed: Optional[int]) -> tf.data.Dataset:
        """Whole examples of `split`, the image still encoded."""
        # Files are shuffled (deterministically, from `shuffle_seed`) unless the
        # dataset's author fixed the example order.
        shuffle_files = shuffle_seed is not None and not self.builder.info.disable_shuffling
        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed if shuffle_files else None,
            # Caching would freeze one order in memory and hold every image.
            try_autocache=False,
            options=_deterministic_options(),
        )
        return self.builder.as_dataset(
            split=split,
            shuffle_files=shuffle_files,
            decoders={self._image_key: tfds.decode.SkipDecoding()},
            read_config=read_config,
        )

    def _read(self, split, shuffle_seed: Optional[int]) -> tf.data.Dataset:
        ds = self._examples(split, shuffle_seed)
        key, label_key = self._image_key, self._label_key
        if label_key is None:
            return ds.map(lambda ex: {"ref": ex[key]})
        return ds.map(lambda ex: {"ref": ex[key], "label": tf.cast(ex[label_key], tf.int64)})

    def epoch_records(
        self,
        split: str,
        process_index: int,
        process_count: int,
        *,
        shuffle_seed: int,
        shuffle_buffer: int,
    ):
        shard = tfds.even_splits(split, n=process_count)[process_index]
        ds = self._read(shard, shuffle_seed)
        # Shuffling encoded bytes: cheap to hold in the buffer, decoded later.
        return ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

    def eval_records(self, split: str) -> tf.data.Dataset:
        return self._read(split, shuffle_seed=None)

    def eval_shard_records(self, split: str, process_index: int, process_count: int):
        return self._read(tfds.even_splits(split, n=process_count)[process_index], None)

    @staticmethod
    def load(ref):
        return ref  # Already the encoded bytes.


def _walk(folder: str):
    """os.walk of a local folder (symlinked class folders followed); a bucket's (gs://) through
    epath. TensorFlow reads the files of either."""
    if paths_lib.is_local(folder):
        return os.walk(folder, followlinks=True)
    return epath.Path(folder).walk()


def list_image_files(folder: str):
    """Sorted image paths under `folder` (recursive) and their labels.

    Label = index of the sorted first-level subfolder (a class) that holds the
    image, or 0 for every image when the folder is flat.  In a mixed layout,
    images lying directly in `folder` get -1 (unlabelled).
    """
    paths = []
    for root, dirs, files in _walk(folder):
        dirs.sort()  # Walk order does not matter (we sort below) but is cheaper.
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.relpath(os.path.join(root, f), folder))
    if not paths:
        raise ValueError(
            f"data.folder={folder!r} contains no images with extensions "
            f"{IMAGE_EXTENSIONS} (case-insensitive)."
        )
    # Sort by path components so the order does not depend on the filesystem.
    paths.sort(key=lambda p: p.split(os.sep))
    parts = [p.split(os.sep) for p in paths]
    classes = sorted({p[0] for p in parts if len(p) > 1})
    class_index = {c: i for i, c in enumerate(classes)}
    if classes:
        labels = [class_index[p[0]] if len(p) > 1 else -1 for p in parts]
    else:
        labels = [0] * len(paths)
    full = [os.path.join(folder, p) for p in paths]
    return full, np.asarray(labels, np.int64), classes


def _as_bytes(paths: Sequence[str]) -> np.ndarray:
    # os.fsencode round-trips any filename (non-ASCII, undecodable bytes).
    return np.asarray([os.fsencode(p) for p in paths], dtype=object)


class FolderSource:
    """A directory of the user's own images; splits do not apply.

    Records are {'ref': path} or, with labels, also {'label': class subfolder index}.
    """

    def __init__(self, cfg, label_key: Optional[str] = None):
        self.folder = cfg.folder
        self.files, self.labels, self.classes = list_image_files(cfg.folder)
        self._with_labels = label_key is not None
        if self._with_labels and (not self.classes or (self.labels < 0).any()):
            raise ValueError(
                f"data.folder={cfg.folder!r} has no class subfolders for every image; "
                "labelled training needs FOLDER/CLASS_NAME/IMAGE files."
            )

    def _records(self, paths, labels) -> tf.data.Dataset:
        records = {"ref": _as_bytes(paths)}
        if self._with_labels:
            records["label"] = np.asarray(labels, np.int64)
        return tf.data.Dataset.from_tensor_slices(records)

    def num_examples(self, split: str) -> int:
        del split  # A folder is a single split.
        return len(self.files)

    def _shard(self, process_index: int, process_count: int) -> Sequence[str]:
        return self.files[process_index::process_count]

    def _shard_labels(self, process_index: int, process_count: int) -> np.ndarray:
        return self.labels[process_index::process_count]

    def shard_size(self, split: str, process_index: int, process_count: int) -> int:
        del split
        return len(self._shard(process_index, process_count))

    def epoch_records(
        self,
        split: str,
        process_index: int,
        process_count: int,
        *,
        shuffle_seed: int,
        shuffle_buffer: int,
    ):
        del split, shuffle_buffer
        # File lists are sorted by class, so a bounded shuffle buffer would mix
        # poorly; a full permutation of the path strings is exact and cheap.
        shard = np.asarray(self._shard(process_index, process_count), dtype=object)
        labels = self._shard_labels(process_index, process_count)
        order = np.random.default_rng(shuffle_seed).permutation(len(shard))
        return self._records(shard[order], labels[order])

    def eval_records(self, split: str) -> tf.data.Dataset:
        del split
        return self._records(self.files, self.labels)

    def eval_shard_records(self, split: str, process_index: int, process_count: int):
        del split
        return self._records(self._shard(process_index, process_count),
                             self._shard_labels(process_index, process_count))

    @staticmethod
    def load(ref):
        # Inside the map, so unreadable files are skipped like corrupt ones.
        return tf.io.read_file(ref)


def num_classes(cfg) -> Optional[int]:
    """Classes of data.label_key, read from the dataset's metadata or class folders (nothing
    is prepared or decoded)."""
    if cfg.name == config_lib.FOLDER:
        return len(list_image_files(cfg.folder)[2]) or None
    features = tfds.builder(cfg.name, data_dir=cfg.data_dir).info.features
    key = cfg.label_key
    return getattr(features[key], "num_classes", None) if key in features else None


def missing_labels(cfg) -> Optional[str]:
    """See mim_jax.data.missing_labels."""
    if cfg.name == config_lib.FOLDER:
        try:
            _, labels, classes = list_image_files(cfg.folder)
        except (OSError, ValueError):
            return None  # no images at all: the training data reports that
        if not classes:
            return (f"data.folder={cfg.folder!r} has no class subfolders (labels come from "
                    "FOLDER/CLASS_NAME/IMAGE)")
        if (labels < 0).any():
            return (f"data.folder={cfg.folder!r} has {int((labels < 0).sum())} images outside "
                    "class subfolders (labels come from FOLDER/CLASS_NAME/IMAGE)")
        return None
    try:
        features = tfds.builder(cfg.name, data_dir=cfg.data_dir).info.features
    except Exception:  # noqa: BLE001 - an unknown or unprepared dataset fails later, clearly
        return None
    if cfg.label_key not in features:
        return (f"data.label_key={cfg.label_key!r} is not a feature of TFDS dataset "
                f"{cfg.name!r} (features: {sorted(features.keys())})")
    return None


def missing_split(cfg, split: str) -> Optional[str]:
    """See mim_jax.data.missing_split."""
    try:
        splits = tfds.builder(cfg.name, data_dir=cfg.data_dir).info.splits
    except Exception:  # noqa: BLE001 - an unknown dataset is reported where it is read
        return None
    if not splits:
        return None  # not prepared yet: its splits are known once it is
    try:
        splits[split].num_examples
    except (KeyError, ValueError):
        return f"{split!r} is not a split of {cfg.name!r} (splits: {sorted(splits.keys())})"
    return None


def make_source(cfg, label_key: Optional[str] = None):
    """The source of `cfg`; with `label_key` its records carry integer labels too."""
    if cfg.name == config_lib.FOLDER:
        return FolderSource(cfg, label_key)
    return TfdsSource(cfg, label_key)
