"""Weighted k-nearest-neighbour classification on frozen features (k=20, T=0.07).

The usual cheap monitor of self-supervised encoders (as in DINO / the MIM papers' appendices):
cosine similarity of l2-normalised features, the k most similar training examples vote for
their class with weight exp(similarity / T).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@partial(jax.jit, static_argnames=("k", "num_classes"))
def _votes(train_x, train_y, test_x, *, k: int, temperature: float, num_classes: int):
    sim = _normalize(test_x) @ _normalize(train_x).T  # [n_test, n_train]
    top_sim, top_idx = jax.lax.top_k(sim, k)
    weights = jnp.exp(top_sim / temperature)
    one_hot = jax.nn.one_hot(train_y[top_idx], num_classes)  # [n_test, k, classes]
    return jnp.einsum("nk,nkc->nc", weights, one_hot)


def knn_predict(train_x, train_y, test_x, *, k: int = 20, temperature: float = 0.07,
                num_classes: int = None, chunk: int = 1024) -> np.ndarray:
    """Predicted class of every test row (chunked so [chunk, n_train] fits in memory)."""
    train_x = jnp.asarray(train_x, jnp.float32)
    train_y = jnp.asarray(train_y, jnp.int32)
    num_classes = int(num_classes or int(train_y.max()) + 1)
    k = min(k, train_x.shape[0])
    preds = []
    for start in range(0, len(test_x), chunk):
        votes = _votes(train_x, train_y, jnp.asarray(test_x[start:start + chunk], jnp.float32),
                       k=k, temperature=temperature, num_classes=num_classes)
        preds.append(np.asarray(jnp.argmax(votes, axis=-1)))
    return np.concatenate(preds)


def knn_accuracy(train_x, train_y, test_x, test_y, **kwargs) -> float:
    """Top-1 accuracy (in [0, 1]) of weighted kNN."""
    return float(np.mean(knn_predict(train_x, train_y, test_x, **kwargs) == np.asarray(test_y)))
