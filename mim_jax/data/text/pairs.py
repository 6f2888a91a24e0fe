"""The image-text pair stream: images through the image pipeline, captions tokenized on the host.

Images go through mim_jax/data/pipeline.py's TrainData unchanged (same augmentation, sharding,
per-epoch order and exact resume); each record carries its caption (TFDS) or the index of its
index-file entry (JSONL), and the host tokenizes a batch's captions. Sources:
  * JsonlPairs: an index of JSON lines {"image_path": ..., "text": ...} with image paths
    relative to a root folder. unilm's BEiT-3 index files load as they are: their
    "text_segment" holds XLM-R ids of the text without bos / eos (or a string).
  * TfdsPairs: a TFDS dataset whose examples hold an image and several captions (e.g.
    'coco_captions', captions at 'captions/text'): each epoch pairs every image with one of its
    captions, drawn from the epoch's seed. The same class pairs the bundled 'mnist5k' digits
    with synthetic captions of their labels (text/quickstart.py).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mim_jax.data import pipeline
from mim_jax.data import seeds
from mim_jax.data import sources
from mim_jax.data.text import quickstart
from mim_jax.data.text import streams
from mim_jax.data.text import tfds_text
from mim_jax.data.text.tokenizer import TextTokenizer
from mim_jax.data.tf_setup import tf

# Keys of an index line: the image, then its text (unilm writes "text_segment").
IMAGE_KEY = "image_path"
TEXT_KEYS = ("text", "text_segment")

Caption = Union[str, List[int]]


def _caption(entry: dict, where: str) -> Caption:
    for key in TEXT_KEYS:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return value
    raise ValueError(f"{where}: needs a caption in {' or '.join(map(repr, TEXT_KEYS))} (a "
                     "non-empty string, or a list of token ids); found keys "
                     f"{sorted(entry)}.")


def read_index(index_files: Sequence[str], root: Optional[str] = None
               ) -> Tuple[List[str], List[Caption]]:
    """Image paths and captions of JSONL index files, in file and line order.

    An entry's "image_path" is relative to `root`, by default the folder of its index file."""
    paths, captions = [], []
    for index_file in index_files:
        base = root if root else os.path.dirname(os.path.abspath(index_file))
        with open(index_file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{index_file}:{number}"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON object ({e.msg}).") from None
                if not isinstance(entry, dict) or not isinstance(entry.get(IMAGE_KEY), str):
                    raise ValueError(f"{where}: needs {IMAGE_KEY!r}, an image path relative to "
                                     f"{base!r}.")
                paths.append(os.path.join(base, entry[IMAGE_KEY]))
                captions.append(_caption(entry, where))
    if not paths:
        raise ValueError(f"text.pair_index={list(index_files)!r} holds no image-text pairs.")
    return paths, captions


class JsonlPairs:
    """Pairs listed in JSONL index files; a source for pipeline.TrainData.

    Records are {'ref': image path, 'item': index of the pair}; process i of n owns pairs
    i, i + n, ..."""

    def __init__(self, index_files: Sequence[str], root: Optional[str] = None):
        self.paths, self.captions = read_index(index_files, root)
        self._paths = np.asarray([os.fsencode(p) for p in self.paths], dtype=object)

    def num_examples(self, split: str) -> int:
        del split  # an index is one split
        return len(self.paths)

    def shard_size(self, split: str, process_index: int, process_count: int) -> int:
        del split
        return len(range(process_index, len(self.paths), process_count))

    def epoch_records(self, split, process_index, process_count, *, shuffle_seed,
                      shuffle_buffer):
        del split, shuffle_buffer
        # A full permutation of the shard's indices: exact and cheap (no image is touched).
        shard = np.arange(process_index, len(self.paths), process_count)
        order = shard[np.random.default_rng(shuffle_seed).permutation(len(shard))]
        return tf.data.Dataset.from_tensor_slices(
            {"ref": self._paths[order], "item": order.astype(np.int64)})

    @staticmethod
    def load(ref):
        return tf.io.read_file(ref)  # inside the map: an unreadable file is skipped, counted

    def batch_captions(self, batch: Dict[str, np.ndarray]) -> List[Caption]:
        return [self.captions[i] for i in batch.pop("item")]


class TfdsPairs(sources.TfdsSource):
    """A TFDS dataset of images with candidate captions; `captions_of(example)` gives an
    example's candidates (a string vector) and each epoch picks one per image.

    Records are {'ref': encoded image, 'text': caption}."""

    def __init__(self, cfg, captions_of: Callable):
        super().__init__(cfg)
        self._captions_of = captions_of

    def _read(self, split, shuffle_seed: Optional[int]) -> tf.data.Dataset:
        ds = self._examples(split, shuffle_seed).enumerate()
        image_key, captions_of = self._image_key, self._captions_of
        seed = tf.constant(0 if shuffle_seed is None else shuffle_seed, tf.int64)

        def pick(position, example):
            candidates = captions_of(example)
            count = tf.shape(candidates, out_type=tf.int64)[0]
            # The files' order is fixed by the seed, so (seed, position) names the example.
            k = tf.random.stateless_uniform([], tf.stack([seed, position]), minval=0,
                                            maxval=tf.maximum(count, 1), dtype=tf.int64)
            text = tf.cond(count > 0, lambda: tf.gather(candidates, k), lambda: tf.constant(""))
            return {"ref": example[image_key], "text": text}

        return ds.map(pick)

    @staticmethod
    def batch_captions(batch: Dict[str, np.ndarray]) -> List[str]:
        return [t.decode("utf-8", errors="replace") for t in batch.pop("text")]


def coco_style_pairs(cfg, caption_key: str = "captions/text") -> TfdsPairs:
    """TFDS pairs whose captions are the feature `caption_key` (a sequence of strings)."""
    source = TfdsPairs(cfg, lambda example: tfds_text.feature(example, caption_key))
    tfds_text.check_feature(source.builder.info.features, caption_key, "text.caption_key",
                            cfg.name)
    return source


def mnist5k_pairs(cfg) -> TfdsPairs:
    """The bundled digits, each with one of its label's synthetic captions per epoch."""
    table = tf.constant([quickstart.digit_captions(label) for label in range(10)])
    return TfdsPairs(cfg, lambda example: tf.gather(table, example["label"]))


class PairStream:
    """Infinite iterator over one process's image-text batches.

    Yields {'image': uint8 [local_batch, H, W, C] (normalised on the device, like every image
    batch: mim_jax.data.normalize_images), 'text_ids': int32 [local_batch, max_len],
    'text_padding': bool [local_batch, max_len] (True at padding)}. Attributes as TrainData's:
    num_examples, steps_per_epoch, local_batch_size, step, skipped_images."""

    def __init__(self, source, data_cfg, tokenizer: TextTokenizer, max_len: int, *,
                 global_batch_size: int, seed: int, start_step: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        process_index, process_count = streams.resolve_processes(process_index, process_count)
        local = streams.local_batch(global_batch_size, process_count, "pair batch size")
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        total = source.num_examples(data_cfg.split)
        steps = (total // process_count) // local
        if steps == 0:
            raise ValueError(f"pair batch size {global_batch_size} is larger than the "
                             f"{total} image-text pairs allow: each of {process_count} "
                             f"process(es) needs {local} per batch.")
        self._data = pipeline.TrainData(
            source, data_cfg, split=data_cfg.split, local_batch_size=local,
            steps_per_epoch=steps,
            num_examples=source.shard_size(data_cfg.split, process_index, process_count),
            # Not the image stream's seed: pairs of the same images must not repeat its order.
            seed=seeds.derive_seed(seed, 0, 0, seeds.PAIR_STREAM), start_step=start_step,
            process_index=process_index, process_count=process_count)
        self._source, self._tokenizer, self._max_len = source, tokenizer, max_len

    @property
    def step(self) -> int:
        return self._data.step

    @property
    def steps_per_epoch(self) -> int:
        return self._data.steps_per_epoch

    @property
    def local_batch_size(self) -> int:
        return self._data.local_batch_size

    @property
    def num_examples(self) -> int:
        return self._data.num_examples

    @property
    def skipped_images(self) -> int:
        return self._data.skipped_images

    def __iter__(self) -> "PairStream":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = next(self._data)
        captions = self._source.batch_captions(batch)
        ids, padding = self._tokenizer.encode_batch(captions, self._max_len)
        return {"image": batch["image"], "text_ids": ids, "text_padding": padding}
