"""One training batch per step from up to three streams: images, texts and image-text pairs.

Each stream is its own iterator (the image pipeline, text/streams.py, text/pairs.py), built at
the same start step with its own derived seed, so the mixed stream is deterministic and resumes
exactly when each part does. A step's batch merges them under the keys the BEiT-3 objective
reads:

    image       uint8 [Bi, H, W, C]              the image stream
    text_ids    int32 [Bt, T], text_padding      the text stream
    pair_image  uint8 [Bp, H, W, C], pair_text_ids, pair_text_padding    the pair stream

(images are normalised on the device, mim_jax.data.normalize_batch). A stream of size 0 is left
out. An "epoch" (num_epochs, warmup_epochs) is one of the first stream present in the order
image, pair, text; the others wrap around on their own.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

STREAM_ORDER = ("image", "pair", "text")
# How each stream's keys are named in the mixed batch.
PREFIX = {"image": "", "text": "", "pair": "pair_"}


class MixedStream:
    """Infinite iterator over one process's mixed batches (see the module docstring).

    `parts`: stream name -> its iterator (each with steps_per_epoch; the image and pair
    iterators also count skipped_images)."""

    def __init__(self, parts: Mapping[str, object]):
        unknown = sorted(set(parts) - set(STREAM_ORDER))
        if unknown or not parts:
            raise ValueError(f"streams {sorted(parts)}: need one or more of {STREAM_ORDER}.")
        self.parts = dict(parts)
        first = next(s for s in STREAM_ORDER if s in self.parts)
        self.steps_per_epoch = self.parts[first].steps_per_epoch

    @property
    def skipped_images(self) -> int:
        return sum(getattr(part, "skipped_images", 0) for part in self.parts.values())

    def __iter__(self) -> "MixedStream":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        batch = {}
        for stream in STREAM_ORDER:
            if stream in self.parts:
                part = next(self.parts[stream])
                batch.update({PREFIX[stream] + key: value for key, value in part.items()})
        return batch
