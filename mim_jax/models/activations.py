"""Softmax and exact GELU whose backward passes keep one saved tensor instead of several.

Both compute the same forward values as jax.nn.softmax and jax.nn.gelu(approximate=False);
only what the backward pass saves and reads changes, which matters on a CPU where the step
is bound by memory traffic outside its products:

- jax.nn.softmax differentiates exp(x - max) / sum by the quotient rule unless the global flag
  `jax_softmax_custom_jvp` is on (it is off by default in this JAX), so the backward pass of
  MAE's decoder attention read the exponentials, the broadcast reciprocal of their sums (one
  more [B, heads, N, N] tensor, materialised) and the probabilities. `softmax` here has the
  rule d softmax = y * (t - sum(y * t)), so only y is saved.
- jax.nn.gelu's derivative goes through erfc's, so the forward pass wrote three
  [tokens, mlp_dim] tensors (the erfc, the Gaussian and the output) and the backward pass read
  them back. `gelu` here is rematerialised (jax.checkpoint): the forward pass writes only its
  output, and the backward pass recomputes erfc and the Gaussian from the saved input in the
  same elementwise pass that applies the gradient.

Each is a JAX transformation of ordinary operations, so jvp, vmap, remat and scan work as usual.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x, axis: int = -1):
    """jax.nn.softmax(x, axis): the same values; its derivative saves only the output."""
    unnormalized = jnp.exp(x - jnp.max(x, axis, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis, keepdims=True))


def _gelu_exact(x):
    # jax.nn.gelu(x, approximate=False), written out: the same operations, the same values.
    sqrt_half = np.sqrt(0.5).astype(x.dtype)
    return 0.5 * x * lax.erfc(-x * sqrt_half)


# prevent_cse (the default) keeps XLA from merging the backward pass's recomputation with the
# forward's, which would bring back the saved intermediates this exists to avoid.
_gelu_recomputed = jax.checkpoint(_gelu_exact, policy=jax.checkpoint_policies.nothing_saveable)


def gelu(x):
    """jax.nn.gelu(x, approximate=False) (exact, erf): the same values; its backward pass
    recomputes the erf terms from the saved input."""
    return _gelu_recomputed(x)
