"""Masked-token accuracy of a BEiT-3 run next to the constant guess, on batches it did not train
on: what `python -m mim_jax.evaluate` reports as the masked data modeling result.

The batches are the mixed stream's (images, texts, pairs) drawn from another seed than the
run's, with images and pairs from the evaluation split (config.data.eval_split). The text
corpus has no held-out part (the quickstart's Shakespeare is all training text), so texts are
training texts in another order and with other masks. Each accuracy is the share of masked
positions predicted right, over every batch; next to it, the accuracy of always answering a
batch's most frequent masked target (the objective's `*_accuracy_most_frequent_token`).
"""
from __future__ import annotations

import jax
import numpy as np

from mim_jax import data
from mim_jax.objectives.base import make_rngs

# The predictions reported: metric prefix -> what it is.
PREDICTIONS = {"image": "image patches (VQ-KD codes)", "text": "texts (token ids)",
               "pair_text": "captions of image-text pairs",
               "pair_image": "image patches of pairs"}
SEED_OFFSET = 10_000  # batches and masks the run never drew


def eval_batches(config, tokenizer, sizes, *, steps: int):
    """`steps` mixed batches (numpy) of `sizes` (Objective.stream_sizes) from the evaluation
    split."""
    from mim_jax.data import text as text_data  # pylint: disable=g-import-not-at-top

    data_cfg = config.data.copy_and_resolve_references()
    text_cfg = config.text.copy_and_resolve_references()
    data_cfg.split = data_cfg.eval_split
    text_cfg.pair_split = data_cfg.eval_split
    stream = text_data.create_mixed_iterator(text_cfg, data_cfg, tokenizer, sizes,
                                             seed=config.seed + SEED_OFFSET,
                                             process_index=0, process_count=1)
    return [next(stream) for _ in range(steps)]


def masked_token_accuracy(objective, params, model_state, batches, data_cfg,
                          seed: int = 0) -> dict:
    """{prefix: {'what', 'accuracy', 'most_frequent_token'}}, accuracies in [0, 1] averaged
    over `batches`
    (each weighs the same: every batch masks about the same number of positions)."""
    @jax.jit
    def metrics(params, batch, key):
        batch = data.normalize_batch(batch, data_cfg)
        _, aux = objective.loss_fn(params, model_state, batch, make_rngs(key), False)
        return aux["metrics"]

    runs = [jax.device_get(metrics(params, b, jax.random.key(seed + i)))
            for i, b in enumerate(batches)]
    out = {}
    for prefix in PREDICTIONS:
        if f"{prefix}_accuracy" in runs[0]:
            out[prefix] = {
                "what": PREDICTIONS[prefix],
                "accuracy": float(np.mean([r[f"{prefix}_accuracy"] for r in runs])),
                "most_frequent_token": float(np.mean(
                    [r[f"{prefix}_accuracy_most_frequent_token"] for r in runs]))}
    return out
