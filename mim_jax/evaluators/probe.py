"""Linear probe on frozen features: L2-regularised logistic regression fitted to convergence.

The protocol of CLIP's linear-probe evaluation (Radford et al. 2021, appendix A.3), the one
that cannot flatter an encoder by under-fitting its baseline:
  1. features are standardised with the statistics of the examples being fitted;
  2. a multinomial logistic regression, mean cross-entropy + l2 / 2 * ||W||^2 (bias not
     penalised), is fitted by L-BFGS (until no gradient entry exceeds 1e-4, at most 1,000
     iterations: scikit-learn's rule, as CLIP used it) for every l2 on a log grid, on 80% of the training split, and scored on the
     other 20% (the validation part);
  3. the l2 with the best validation accuracy (ties: the lower validation loss) is refitted on
     the whole training split and scored once on the test split.
The objective is scikit-learn's LogisticRegression(C=1 / (l2 * n_train)) (tested against it).
ImageNet-scale probes with augmentation are
`configs/linear_probe.py` (MAE's LARS recipe), run through the trainer.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

# 1e-8 .. 1e2 in half decades: from an almost unregularised fit to one that barely moves off 0.
DEFAULT_L2_GRID = tuple(float(10.0 ** (k / 2)) for k in range(-16, 5))


class ProbeResult(NamedTuple):
    accuracy: float  # top-1 on the test split, in [0, 1]
    l2: float  # the chosen regularisation strength
    val_accuracy: float  # its accuracy on the validation part of train


def standardize(train_x, test_x, eps: float = 1e-6):
    """Both sets scaled by the training set's per-feature mean and standard deviation."""
    mean = train_x.mean(0, keepdims=True)
    std = np.sqrt(train_x.var(0, keepdims=True) + eps)
    return (train_x - mean) / std, (test_x - mean) / std


def _loss(params, x, y, l2):
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@partial(jax.jit, static_argnames=("max_iter",))
def fit_logistic(x, y, l2, init, *, max_iter: int = 1000, tol: float = 1e-4):
    """({'w': [D, C], 'b': [C]}, iterations): L-BFGS from `init` until no gradient entry is
    larger than `tol` in magnitude (or `max_iter` iterations): scikit-learn's stopping rule
    and default tolerance."""
    fun = partial(_loss, x=x, y=y, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def running(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad_max = otu.tree_max(jax.tree.map(jnp.abs, otu.tree_get(state, "grad")))
        return (count == 0) | ((count < max_iter) & (grad_max > tol))

    params, state = jax.lax.while_loop(running, step, (init, opt.init(init)))
    return params, otu.tree_get(state, "count")


@jax.jit
def _scores(params, x, y):
    """Accuracy and mean cross-entropy of a fit on (x, y)."""
    logits = x @ params["w"] + params["b"]
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return acc, optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fit_and_score(train_x, train_y, test_x, test_y, l2s: Sequence[float], *,
                  num_classes: int, max_iter: int = 1000):
    """(accuracy [L], cross-entropy [L], iterations [L]) on the test set of fits on the
    standardised training set, one per l2, each started from zero as scikit-learn's. They run
    in float64, as scikit-learn's do: near a separable optimum float32 cannot resolve the line
    search's conditions, and L-BFGS then takes 3-4 times the steps and stops short of it."""
    train_x, test_x = standardize(np.asarray(train_x, np.float64),
                                  np.asarray(test_x, np.float64))
    out = []
    with jax.enable_x64(True):
        x, y = jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32)
        tx, ty = jnp.asarray(test_x), jnp.asarray(test_y, jnp.int32)
        zeros = {"w": jnp.zeros((x.shape[1], num_classes), x.dtype),
                 "b": jnp.zeros((num_classes,), x.dtype)}
        for l2 in l2s:
            params, iters = fit_logistic(x, y, jnp.asarray(l2, x.dtype), zeros,
                                         max_iter=max_iter)
            out.append(tuple(float(v) for v in (*_scores(params, tx, ty), iters)))
    acc, ce, iters = (np.array(column) for column in zip(*out))
    return acc, ce, iters.astype(int)


def validation_split(n: int, fraction: float, seed: int = 0):
    """(fit indices, validation indices) of a fixed random split of n training examples."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def linear_probe(train_x, train_y, test_x, test_y, *, num_classes: int = None,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.2,
                 max_iter: int = 1000, seed: int = 0) -> ProbeResult:
    """The protocol above: l2 chosen on a validation part of train, refit on all of train."""
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    num_classes = int(num_classes or max(np.max(train_y), np.max(test_y)) + 1)
    fit, val = validation_split(len(train_x), val_fraction, seed)
    val_acc, val_ce, _ = fit_and_score(train_x[fit], train_y[fit], train_x[val], train_y[val],
                                       l2_grid, num_classes=num_classes, max_iter=max_iter)
    best = min(range(len(l2_grid)), key=lambda i: (-val_acc[i], val_ce[i]))
    acc, _, _ = fit_and_score(train_x, train_y, test_x, test_y, [l2_grid[best]],
                              num_classes=num_classes, max_iter=max_iter)
    return ProbeResult(float(acc[0]), float(l2_grid[best]), float(val_acc[best]))
