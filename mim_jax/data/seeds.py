"""Seeds of the input streams, derived from a run's seed without TensorFlow.

Every stream (images, texts, image-text pairs) draws its shuffles and augmentations from a seed
derived here, with a distinct `purpose` per use, so that two streams reading the same dataset
with the same run seed still see it in unrelated orders.
"""

import numpy as np

# Purposes of derived seeds; distinct so the streams are independent.
SHUFFLE, AUGMENT, TEXT_STREAM, PAIR_STREAM = 0, 1, 2, 3
_INT63 = (1 << 63) - 1


def derive_seed(seed: int, process_index: int, epoch: int, purpose: int) -> int:
    """Well-mixed non-negative int64 seed from the identifying integers."""
    # SeedSequence hashes its entropy, so nearby seeds/epochs do not give
    # correlated streams; it only accepts non-negative ints, hence the modulo.
    entropy = [seed % (1 << 64), process_index, epoch, purpose]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return int(state[0]) & _INT63
