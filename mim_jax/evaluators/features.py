"""Frozen-encoder features of a labelled split, for kNN and linear-probe evaluation."""
from __future__ import annotations

from typing import Callable, Tuple

import flax.linen as nn
import jax
import numpy as np

from mim_jax import data, sharding
from mim_jax.models.classifier import encoder_has_cls, pool_features


def make_feature_fn(encoder: nn.Module, pool: str, mesh, data_cfg) -> Callable:
    """jitted (encoder_params, images, batch_stats=None) -> pooled features [B, D] float32,
    replicated; the images (uint8 from data.eval_batches) are normalised inside with
    `data_cfg`. An encoder with BatchNorm runs in eval mode on `batch_stats` (its running
    statistics); one that returns its stages' maps (a ConvNet) is pooled at the last one."""
    has_cls = encoder_has_cls(encoder)

    def features(params, images, batch_stats=None):
        images = data.normalize_images(images, data_cfg)
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        out = encoder.apply(variables, images, train=False)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        return pool_features(out, pool, has_cls).astype(np.float32)
    return jax.jit(features, out_shardings=sharding.replicated(mesh))


def encoder_batch_stats(model_state, encoder_key: str):
    """The encoder's BatchNorm statistics in an objective's model_state, or None."""
    return (model_state or {}).get("batch_stats", {}).get(encoder_key)


def extract(feature_fn, params, data_cfg, split: str, *, batch_size: int, mesh,
            max_examples=None, batch_stats=None) -> Tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]) of `split` (every process gets all of them)."""
    feats, labels = [], []
    for batch in data.eval_batches(data_cfg, split, global_batch_size=batch_size,
                                   max_examples=max_examples):
        batch = sharding.global_batch(batch, mesh)
        f = np.asarray(jax.device_get(feature_fn(params, batch["image"], batch_stats)))
        rows = _replicated(batch)
        feats.append(f[rows["valid"]])
        labels.append(rows["label"][rows["valid"]])
    return np.concatenate(feats), np.concatenate(labels)


def _replicated(batch) -> dict:
    """The labels and validity of the whole global batch, on every process."""
    small = {"label": batch["label"], "valid": batch["valid"]}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(small, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(small))


def raw_pixels(data_cfg, split: str, *, max_examples=None, batch_size: int = 256):
    """(flattened normalised pixels [N, H*W*C], labels [N]): the no-learning baseline
    (single process)."""
    feats, labels = [], []
    for batch in data.eval_batches(data_cfg, split, global_batch_size=batch_size,
                                   max_examples=max_examples):
        valid = batch["valid"]
        pixels = np.asarray(data.normalize_images(batch["image"][valid], data_cfg))
        feats.append(pixels.reshape(valid.sum(), -1))
        labels.append(batch["label"][valid])
    return np.concatenate(feats), np.concatenate(labels)
