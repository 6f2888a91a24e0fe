"""Linear probe on cached features: the cheap variant for small datasets.

Features are extracted once (no augmentation); the MAE probe head (BatchNorm without affine,
then a linear layer initialised with std 0.01) is fitted on them. On fixed features a
BatchNorm without affine at evaluation time is a standardisation by the training statistics,
so the features are standardised once and a linear layer is trained with AdamW + cosine. (The
full MAE recipe - LARS, lr 0.1 x batch/256, RandomResizedCrop + flip every epoch - is
`configs/linear_probe.py`, run through the trainer.)
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax


def standardize(train_x, test_x, eps: float = 1e-6):
    mean = train_x.mean(0, keepdims=True)
    std = np.sqrt(train_x.var(0, keepdims=True) + eps)
    return (train_x - mean) / std, (test_x - mean) / std


@partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit(x, y, key, *, num_classes: int, epochs: int, batch_size: int, lr: float,
         weight_decay: float):
    n, d = x.shape
    steps_per_epoch = max(n // batch_size, 1)
    schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    params = {"w": 0.01 * jax.random.normal(key, (d, num_classes)),
              "b": jnp.zeros((num_classes,))}

    def loss_fn(p, xb, yb):
        logits = xb @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def epoch(carry, epoch_key):
        p, opt_state = carry
        order = jax.random.permutation(epoch_key, n)[:steps_per_epoch * batch_size]
        order = order.reshape(steps_per_epoch, batch_size)

        def step(carry, idx):
            p, opt_state = carry
            grads = jax.grad(loss_fn)(p, x[idx], y[idx])
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), None
        return jax.lax.scan(step, (p, opt_state), order)[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, tx.init(params)),
                                  jax.random.split(key, epochs))
    return params


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int = None,
                          epochs: int = 100, batch_size: int = 256, lr: float = 1e-3,
                          weight_decay: float = 0.0, seed: int = 0) -> float:
    """Top-1 test accuracy (in [0, 1]) of a linear classifier fitted on cached features."""
    train_x, test_x = standardize(np.asarray(train_x, np.float32),
                                  np.asarray(test_x, np.float32))
    num_classes = int(num_classes or int(np.max(train_y)) + 1)
    params = _fit(jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32), jax.random.key(seed),
                  num_classes=num_classes, epochs=epochs,
                  batch_size=min(batch_size, len(train_x)), lr=lr, weight_decay=weight_decay)
    logits = jnp.asarray(test_x) @ params["w"] + params["b"]
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(test_y)))
