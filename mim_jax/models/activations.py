"""Softmax and exact GELU whose backward passes keep one saved tensor instead of several.

The softmax computes the same forward values as jax.nn.softmax, the GELU those of
jax.nn.gelu(approximate=False) to 1e-6 (absolute); what changes is what the backward pass
saves and reads, and with it the memory the train step needs:

- jax.nn.softmax differentiates exp(x - max) / sum by the quotient rule unless the global flag
  `jax_softmax_custom_jvp` is on (it is off by default in this JAX), so the backward pass of
  MAE's decoder attention read the exponentials, the broadcast reciprocal of their sums (one
  more [B, heads, N, N] tensor, materialised) and the probabilities. `softmax` here has the
  rule d softmax = y * (t - sum(y * t)), so only y is saved (in the dtype the attention
  multiplies it in: on a TPU in bfloat16, a float32 y would add a [B, heads, N, N] float32
  tensor per layer to what the step keeps).
- jax.nn.gelu's derivative goes through erfc's, so the forward pass wrote three
  [tokens, mlp_dim] tensors (the erfc, the Gaussian and the output) and the backward pass read
  them back. `gelu` here is, on a CPU, rematerialised (jax.checkpoint): the forward pass
  writes only its output, and the backward pass recomputes the erf terms from the saved input
  in the same elementwise pass that applies the gradient. On a CPU it is also written as
  PyTorch's nn.GELU computes it, x (1 + erf(x / sqrt 2)) / 2, whose forward pass XLA evaluates
  about 2.7 times as fast as jax.nn's x erfc(-x / sqrt 2) / 2 (erfc takes an exponential and
  two branches); the two agree to 1e-6 (absolute).

Compiled temporaries of the float32 train step at batch 16 on a CPU: MAE ViT-B/16 3,379 ->
2,105 MiB, SimMIM Swin-B 4,934 -> 3,525, BEiT v2 ViT-B 5,695 -> 3,887 (BENCHMARKS.md 13).

Each is a JAX transformation of ordinary operations, so jvp, vmap, remat and scan work as usual.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def softmax(x, axis: int = -1, dtype=None):
    """jax.nn.softmax(x, axis).astype(dtype): the same values; its derivative saves only the
    output, in `dtype`. Attention with bfloat16 values asks for bfloat16 probabilities: the
    tensor that its product with v saves anyway, so the softmax saves nothing of its own."""
    unnormalized = jnp.exp(x - jnp.max(x, axis, keepdims=True))
    return (unnormalized / jnp.sum(unnormalized, axis, keepdims=True)).astype(dtype or x.dtype)


def _softmax_tangent(y, x_dot, axis):
    wide = y.astype(x_dot.dtype)  # the derivative is taken in the input's precision
    return (wide * (x_dot - jnp.sum(wide * x_dot, axis, keepdims=True))).astype(y.dtype)


# Rematerialised, so that the backward pass keeps y itself: otherwise JAX would save the
# widened copy of a bfloat16 y, computed from y alone, in the forward pass.
_softmax_tangent_recomputed = jax.checkpoint(
    _softmax_tangent, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable)


@softmax.defjvp
def _softmax_jvp(axis, dtype, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis, dtype)
    return y, _softmax_tangent_recomputed(y, x_dot, axis)


def _gelu_exact(x):
    # jax.nn.gelu(x, approximate=False), written out: the same operations, the same values.
    sqrt_half = np.sqrt(0.5).astype(x.dtype)
    return 0.5 * x * lax.erfc(-x * sqrt_half)


def _gelu_erf(x):
    # PyTorch's (and so the references') formula. In float32, below x = -5 the sum 1 + erf
    # cancels to a few ulps of 1, where GELU itself is below 2e-6 in magnitude; a narrower
    # type would lose that sum's digits from x = -1 on, so it is computed in float32.
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    sqrt_half = np.sqrt(0.5).astype(wide.dtype)
    return (0.5 * wide * (1.0 + lax.erf(wide * sqrt_half))).astype(x.dtype)


# prevent_cse (the default) keeps XLA from merging the backward pass's recomputation with the
# forward's, which would bring back the saved intermediates this exists to avoid.
_gelu_recomputed = jax.checkpoint(_gelu_erf, policy=jax.checkpoint_policies.nothing_saveable)


def gelu(x):
    """The exact (erf) GELU. Compiled for a CPU it is PyTorch's formula, x (1 + erf(x /
    sqrt 2)) / 2, and its backward pass recomputes the erf terms from the saved input;
    compiled for any other platform it is jax.nn.gelu(x, approximate=False)'s program:
    compiled for a TPU, the recomputed form needed 7% more memory for a reduced MAE step
    (BENCHMARKS.md 13), jax.nn's none. The two forms agree to 1e-6 (absolute). The choice is
    made per platform when the step is lowered, so a TPU program compiled ahead of time on a
    CPU host (mim_jax.aot) gets the TPU form."""
    return lax.platform_dependent(x, cpu=_gelu_recomputed, default=_gelu_exact)
