"""Training and evaluation input pipelines.

Training stream design (per process):
  * The stream is a pure function of (seed, process_index): epoch `e` is
    built from scratch with seeds derived from (seed, process_index, e), and
    epochs are chained in Python.
  * Within an epoch: shuffled *encoded* records -> enumerate (the position is
    the element's identity inside the epoch) -> skip -> decode + augment
    (stateless randomness seeded by (epoch key, position)) -> drop corrupt
    images -> batch -> take(steps_per_epoch).  A short final batch is
    dropped on the host (not by `drop_remainder`) so that its positions still
    count towards the corrupt-image tally.
  * Resuming at step k = e * steps_per_epoch + o therefore only has to build
    epoch e and skip o * local_batch *encoded* records: nothing before step k
    is decoded, yet batches k, k+1, ... are bitwise those of a fresh run.
    (Exact as long as no image is corrupt: a skipped corrupt image shifts
    later images between batches, and resume counts records, not images.)
  * Every process runs the same number of steps per epoch, computed from the
    smallest shard, so multi-host training never waits on a finished host.
"""

import threading
from typing import Dict, Iterator, Optional

import numpy as np

from mim_jax.data import config as config_lib
from mim_jax.data import image_ops
from mim_jax.data import sources
from mim_jax.data.seeds import AUGMENT as _AUGMENT
from mim_jax.data.seeds import SHUFFLE as _SHUFFLE
from mim_jax.data.seeds import derive_seed as _derive_seed
from mim_jax.data.tf_setup import tf
from mim_jax.errors import DataError


def _options() -> tf.data.Options:
    options = tf.data.Options()
    # Order-preserving maps: the batches must not depend on thread timing.
    options.deterministic = True
    options.autotune.enabled = True
    return options


class TrainData:
    """Infinite iterator over training batches of one process.

    Yields {'image': uint8 [local_batch, H, W, C]} (rounded pixels, normalised
    on the device by mim_jax.data.normalize_images), and 'label' int64
    [local_batch] when the source was made with a label key (any other field of
    the source's records comes along the same way, e.g. a pair's caption).  Attributes:
      num_examples: examples in this process's shard of the split.
      steps_per_epoch: identical on all processes.
      local_batch_size: images per batch on this process.
      step: index of the next batch to be yielded.
      skipped_images: corrupt / undecodable images dropped so far.
    """

    def __init__(
        self,
        source,
        cfg,
        *,
        split: str,
        local_batch_size: int,
        steps_per_epoch: int,
        num_examples: int,
        seed: int,
        start_step: int,
        process_index: int,
        process_count: int,
    ):
        self._source = source
        self._cfg = cfg
        self._spec = image_ops.ImageSpec.from_config(cfg)
        self._split = split
        self.local_batch_size = local_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.num_examples = num_examples
        self._seed = seed
        self._process_index = process_index
        self._process_count = process_count
        self.step = start_step
        self._iterator: Optional[Iterator[Dict[str, np.ndarray]]] = None
        self._epoch = -1
        # Skip accounting: see `skipped_images`.
        self._skipped_done = 0  # Finished epochs.
        self._epoch_first_pos = 0  # Position of the epoch's first record.
        self._epoch_next_pos = 0  # Last position seen + 1.
        self._epoch_images = 0  # Decoded images seen (incl. a dropped remainder).
        self._epoch_batches = 0  # Full batches yielded.

    @property
    def skipped_images(self) -> int:
        # Deterministic maps keep order, so any position below the last one seen
        # that did not come out as an image was dropped by `ignore_errors`.
        current = self._epoch_next_pos - self._epoch_first_pos - self._epoch_images
        return self._skipped_done + current

    def _epoch_dataset(self, epoch: int, offset: int) -> tf.data.Dataset:
        """Batches `offset`, `offset + 1`, ... of epoch `epoch`."""
        spec, cfg = self._spec, self._cfg
        shuffle_seed = _derive_seed(self._seed, self._process_index, epoch, _SHUFFLE)
        augment_key = _derive_seed(self._seed, self._process_index, epoch, _AUGMENT)
        ds = self._source.epoch_records(
            self._split,
            self._process_index,
            self._process_count,
            shuffle_seed=shuffle_seed,
            shuffle_buffer=cfg.shuffle_buffer,
        )
        ds = ds.enumerate()  # Position in the epoch stream, fixed by the shuffle.
        # Resume: drop still-encoded records (cheap: nothing is decoded).
        ds = ds.skip(offset * self.local_batch_size)
        load = self._source.load

        def process(position, record):
            seed = tf.stack([tf.constant(augment_key, tf.int64), position])
            image = image_ops.train_image_uint8(load(record["ref"]), seed, spec)
            out = {"image": image, "position": position}
            # What travels with the image: its label, or the caption of an image-text pair.
            out.update({key: value for key, value in record.items() if key != "ref"})
            return out

        parallel = cfg.num_parallel_calls
        if parallel == config_lib.AUTOTUNE:
            parallel = tf.data.AUTOTUNE
        ds = ds.map(process, num_parallel_calls=parallel, deterministic=True)
        # A corrupt image must not end a days-long run; it is dropped here and
        # counted on the host from the gaps in 'position'.
        ds = ds.ignore_errors(log_warning=True)
        # No drop_remainder: see the module docstring.  `take` cuts the epoch
        # before a remainder unless the shard ran out (corrupt images).
        ds = ds.batch(self.local_batch_size)
        ds = ds.take(self.steps_per_epoch - offset)
        if cfg.prefetch:
            ds = ds.prefetch(cfg.prefetch)
        return ds.with_options(_options())

    def _start_epoch(self) -> None:
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        self._epoch = epoch
        self._epoch_first_pos = offset * self.local_batch_size
        self._epoch_next_pos = self._epoch_first_pos
        self._epoch_images = 0
        self._epoch_batches = 0
        self._iterator = self._epoch_dataset(epoch, offset).as_numpy_iterator()

    def _finish_epoch(self) -> None:
        """Closes the epoch after its iterator ended; moves to the next one."""
        offset = self._epoch_first_pos // self.local_batch_size
        if self._epoch_batches < self.steps_per_epoch - offset:
            # The shard ran out before `take` stopped it: every remaining record
            # was read, and the ones that produced no image were undecodable.
            self._epoch_next_pos = self.num_examples
        if self._epoch_batches == 0 and offset == 0:
            raise DataError(
                f"{config_lib.describe_source(self._cfg, self._split)} cannot fill one batch: "
                f"epoch {self._epoch} of this process's {self.num_examples} images gave "
                f"{self._epoch_images} decodable and {self.skipped_images} undecodable "
                f"(skipped), fewer than the {self.local_batch_size} a batch needs on each of "
                f"{self._process_count} process(es). Replace or remove the undecodable files, "
                "or lower batch_size."
            )
        self._skipped_done = self.skipped_images
        self._epoch_first_pos = self._epoch_next_pos = self._epoch_images = 0
        self._epoch_batches = 0
        # Moved into a list first, so the list holds the only reference the thread drops.
        finished, self._iterator = [self._iterator], None
        _release_in_background(finished)
        # Normally a no-op.  An epoch cut short by corrupt images still ends
        # here, so the step <-> (epoch, offset) mapping used by resume holds.
        self.step = (self._epoch + 1) * self.steps_per_epoch

    def __iter__(self) -> "TrainData":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        while True:
            if self._iterator is None:
                self._start_epoch()
            batch = next(self._iterator, None)
            if batch is None:
                self._finish_epoch()
                continue
            positions = batch.pop("position")
            self._epoch_next_pos = int(positions[-1]) + 1
            self._epoch_images += len(positions)
            if len(positions) < self.local_batch_size:
                continue  # Remainder of a shard that ran out; its end comes next.
            self._epoch_batches += 1
            self.step += 1
            return batch


def _release_in_background(holder: list) -> None:
    """Empties `holder` (the only reference to a finished epoch's iterator) on a daemon thread.

    Destroying a finished tf.data iterator can block its thread for seconds while tf.data
    winds down its background work (measured: 13-18 s, idle, at some epoch ends of the SparK
    quickstart while the train step ran; about 1 s without a step running). On the training
    thread that stalls the device; elsewhere it costs nothing. The epoch is over, so nothing
    it still holds can reach a batch."""
    threading.Thread(target=holder.clear, name="release-epoch-iterator", daemon=True).start()


def _resolve_processes(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} / process_count={process_count}: "
            "need process_count >= 1 and 0 <= process_index < process_count."
        )
    return process_index, process_count


def _check_batch(data_cfg, global_batch_size, process_index, process_count, what):
    """Validates the config and the batch split -> (process_index, process_count, local)."""
    config_lib.validate_data_config(data_cfg)
    process_index, process_count = _resolve_processes(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"{what}={global_batch_size} must be a positive multiple of the "
            f"number of processes ({process_count})."
        )
    return process_index, process_count, global_batch_size // process_count


def create_train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    with_labels: bool = False,
) -> TrainData:
    """Training batches for this process, starting at batch `start_step`.

    Each process reads a disjoint shard of `data_cfg.split`; the shards cover
    the split.  `start_step=k` yields exactly what batches k, k+1, ... of a
    fresh iterator would (bitwise, when no image is corrupt), without
    decoding anything before step k.  `with_labels` adds data.label_key.
    """
    process_index, process_count, local_batch = _check_batch(
        data_cfg, global_batch_size, process_index, process_count, "batch_size")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0.")
    source = sources.make_source(data_cfg, data_cfg.label_key if with_labels else None)
    split = data_cfg.split
    total = source.num_examples(split)
    # From the total (not this shard) so every process agrees.
    steps_per_epoch = (total // process_count) // local_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={global_batch_size} is larger than the split "
            f"data.split={split!r} with {total} examples allows: each of "
            f"{process_count} processes has at least {total // process_count} "
            f"examples but needs {local_batch} per batch."
        )
    return TrainData(
        source,
        data_cfg,
        split=split,
        local_batch_size=local_batch,
        steps_per_epoch=steps_per_epoch,
        num_examples=source.shard_size(split, process_index, process_count),
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )


def fixed_eval_images(data_cfg, num: int, minimum: Optional[int] = None) -> np.ndarray:
    """First `num` images of the eval split: uint8 [num, H, W, C] (normalise on the device);
    fewer when the split has fewer decodable ones but at least `minimum` (default: `num`).

    No randomness (center square crop, resize), identical on every process and
    every call -- meant for reconstruction figures.  Uses data.eval_split, or
    data.split when that is empty; a folder dataset uses its sorted file list.
    Undecodable images are skipped.
    """
    config_lib.validate_data_config(data_cfg)
    if num <= 0:
        raise ValueError(f"num={num} must be > 0.")
    spec = image_ops.ImageSpec.from_config(data_cfg)
    split = data_cfg.get("eval_split") or data_cfg.split
    source = sources.make_source(data_cfg)
    load = source.load

    def process(record):
        return image_ops.to_uint8(image_ops.eval_image(load(record["ref"]), spec))

    ds = source.eval_records(split).map(
        process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    ds = ds.ignore_errors(log_warning=True).take(num).batch(num)
    ds = ds.with_options(_options())
    images = next(ds.as_numpy_iterator(), None)
    found = 0 if images is None else len(images)
    if found < (num if minimum is None else minimum):
        raise DataError(
            f"{config_lib.describe_source(data_cfg, split)} has {found} decodable images; "
            f"{num if minimum is None else minimum} evaluation images are needed."
        )
    return images


def eval_batches(
    data_cfg,
    split: str,
    *,
    global_batch_size: int,
    max_examples: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[Dict[str, np.ndarray]]:
    """One deterministic pass over `split` with labels: this process's shard.

    Yields {'image' uint8 [b, H, W, C], 'label' int64 [b], 'valid' bool [b]} with b =
    global_batch_size / process_count.  The last batches are padded (valid
    False) and every process yields the same number of batches, so a jitted
    step over all devices never waits for a finished host.  Images get the
    eval transform (center square crop, resize); undecodable ones are dropped.
    `max_examples` caps the split (the first examples of every shard).
    """
    process_index, process_count, local_batch = _check_batch(
        data_cfg, global_batch_size, process_index, process_count, "eval batch size")
    spec = image_ops.ImageSpec.from_config(data_cfg)
    source = sources.make_source(data_cfg, data_cfg.label_key)
    total = source.num_examples(split)
    if max_examples:
        total = min(total, int(max_examples))
    # Shards differ by at most one example; all hosts run the largest shard's batch count.
    per_process = -(-total // process_count)
    num_batches = -(-per_process // local_batch)
    load = source.load

    def process(record):
        image = image_ops.eval_image(load(record["ref"]), spec)
        return {"image": image_ops.to_uint8(image), "label": record["label"]}

    ds = source.eval_shard_records(split, process_index, process_count)
    if max_examples:
        ds = ds.take(per_process)
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=True).batch(local_batch).prefetch(2)
    ds = ds.with_options(_options())
    shape = (local_batch, spec.image_size, spec.image_size, spec.channels)
    produced = 0
    for batch in ds.as_numpy_iterator():
        if produced == num_batches:
            break
        yield _pad_batch(batch, local_batch, shape)
        produced += 1
    empty = {"image": np.zeros(shape, np.uint8), "label": np.zeros((0,), np.int64)}
    for _ in range(num_batches - produced):
        yield _pad_batch(empty, local_batch, shape)


def _pad_batch(batch, size: int, shape) -> Dict[str, np.ndarray]:
    n = len(batch["label"])
    image = np.zeros(shape, np.uint8)
    image[:n] = batch["image"]
    label = np.zeros((size,), np.int64)
    label[:n] = batch["label"]
    return {"image": image, "label": label, "valid": np.arange(size) < n}
