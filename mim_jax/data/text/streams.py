"""The text stream: batches of tokenized texts, deterministic and exactly resumable.

Design (per process), as for images (mim_jax/data/pipeline.py):
  * Process i of n owns texts i, i + n, i + 2n, ... of the corpus (TFDS: `tfds.even_splits`);
    the shards are disjoint and cover it.
  * Epoch e visits the shard in an order drawn from (seed, process, e); every process runs the
    same number of steps per epoch, from the smallest shard, so no host waits on another.
  * Resuming at step k = e * steps_per_epoch + o builds epoch e and starts at its text
    o * local_batch: batches k, k+1, ... are those of a fresh run, and nothing before is
    tokenized.
Texts are tokenized on the host (TextTokenizer), one batch at a time.

Sources here need no TensorFlow: texts in memory (`InMemoryTexts`) and plain-text files, one
sentence or paragraph per line (`TextFiles`). A TFDS text dataset is in text/tfds_text.py.
"""

from __future__ import annotations

import glob
import mmap
import os
from array import array
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from mim_jax.data import seeds
from mim_jax.data.text.tokenizer import TextTokenizer


class IndexedTexts:
    """A corpus whose texts can be read by index; `epoch_texts` shuffles a shard's indices."""

    num_examples: int

    def get(self, indices: Sequence[int]) -> List[str]:
        raise NotImplementedError

    def epoch_texts(self, process_index: int, process_count: int, shuffle_seed: int,
                    skip: int) -> Iterator[str]:
        shard = np.arange(process_index, self.num_examples, process_count)
        order = shard[np.random.default_rng(shuffle_seed).permutation(len(shard))]
        chunk = 1024  # texts read at a time: a file corpus reads lines lazily
        for start in range(skip, len(order), chunk):
            yield from self.get(order[start:start + chunk])


class InMemoryTexts(IndexedTexts):
    """A list of strings (the quickstart corpus, tests)."""

    def __init__(self, texts: Sequence[str], what: str = "texts"):
        self._texts = list(texts)
        self.num_examples = len(self._texts)
        self.what = what

    def get(self, indices):
        return [self._texts[i] for i in indices]


def expand_files(patterns: Sequence[str], field: str = "text.files") -> List[str]:
    """Files of `patterns` (paths or globs), each pattern's matches sorted, in pattern order."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise ValueError(f"{field}: {pattern!r} matches no file.")
        files.extend(m for m in matches if os.path.isfile(m))
    if not files:
        raise ValueError(f"{field}={list(patterns)!r} names no regular file.")
    return files


class TextFiles(IndexedTexts):
    """Plain-text files (UTF-8), one text per line; blank lines are not texts.

    The files are scanned once on start-up for where each non-blank line lies (12 bytes of
    index per line, in every process); a batch reads its lines through memory maps."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        self.what = f"{len(self.files)} text file(s)"
        file_of, offsets, lengths = array("i"), array("q"), array("i")
        for number, path in enumerate(self.files):
            position = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        file_of.append(number)
                        offsets.append(position)
                        lengths.append(len(line))
                    position += len(line)
        self._file_of = np.frombuffer(file_of, np.int32)
        self._offsets = np.frombuffer(offsets, np.int64)
        self._lengths = np.frombuffer(lengths, np.int32)
        self.num_examples = len(self._offsets)
        self._maps: Dict[int, mmap.mmap] = {}

    def _map(self, number: int) -> mmap.mmap:
        if number not in self._maps:
            with open(self.files[number], "rb") as f:
                self._maps[number] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[number]

    def get(self, indices):
        texts = []
        for i in indices:
            start = int(self._offsets[i])
            raw = self._map(int(self._file_of[i]))[start:start + int(self._lengths[i])]
            # A stray invalid byte must not stop a long run: it becomes U+FFFD.
            texts.append(raw.decode("utf-8", errors="replace").strip())
        return texts


def resolve_processes(process_index: Optional[int], process_count: Optional[int]):
    """(process_index, process_count), from JAX where not given; checked."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} / process_count={process_count}: "
                         "need process_count >= 1 and 0 <= process_index < process_count.")
    return process_index, process_count


def local_batch(global_batch_size: int, process_count: int, what: str) -> int:
    """This process's share of a global batch, which must split evenly."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"{what} {global_batch_size} must be a positive multiple of the "
                         f"number of processes ({process_count}).")
    return global_batch_size // process_count


class TextStream:
    """Infinite iterator over one process's text batches.

    Yields {'text_ids': int32 [local_batch, max_len], 'text_padding': bool [local_batch,
    max_len] (True at padding)}. Attributes: num_examples (this process's shard),
    steps_per_epoch (the same on all processes), local_batch_size, step (the next batch's)."""

    def __init__(self, source, tokenizer: TextTokenizer, max_len: int, *,
                 global_batch_size: int, seed: int, start_step: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        process_index, process_count = resolve_processes(process_index, process_count)
        self.local_batch_size = local_batch(global_batch_size, process_count, "text batch size")
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0.")
        total = source.num_examples
        # From the total (not this shard) so every process agrees.
        self.steps_per_epoch = (total // process_count) // self.local_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"text batch size {global_batch_size} is larger than {source.what} with {total} "
                f"texts allows: each of {process_count} process(es) needs "
                f"{self.local_batch_size} per batch.")
        self.num_examples = len(range(process_index, total, process_count))
        self._source, self._tokenizer, self._max_len = source, tokenizer, max_len
        self._seed, self._process = seed, (process_index, process_count)
        self.step = start_step
        self._texts: Optional[Iterator[str]] = None
        self._epoch_end = 0  # first step of the next epoch

    def _start_epoch(self) -> None:
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        shuffle_seed = seeds.derive_seed(self._seed, self._process[0], epoch, seeds.TEXT_STREAM)
        self._texts = self._source.epoch_texts(*self._process, shuffle_seed,
                                               offset * self.local_batch_size)
        self._epoch_end = (epoch + 1) * self.steps_per_epoch

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._texts is None or self.step == self._epoch_end:
            self._start_epoch()
        texts = [next(self._texts) for _ in range(self.local_batch_size)]
        ids, padding = self._tokenizer.encode_batch(texts, self._max_len)
        self.step += 1
        return {"text_ids": ids, "text_padding": padding}
