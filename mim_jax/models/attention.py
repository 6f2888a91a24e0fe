"""Softmax attention, as the transformer layers call it: `attention_fn(query, key, value,
bias=None)` on [batch, tokens, heads, head_dim] with an additive logit bias broadcastable to
[batch, heads, tokens, tokens] (jax.nn.dot_product_attention's signature).
`model.attention_impl` names one:

  'xla'      jax.nn.dot_product_attention's XLA implementation (the default; the MAE TPU
             steps' memory with it and with 'mim_jax' is in BENCHMARKS.md);
  'cudnn'    its cuDNN flash attention (NVIDIA GPUs), on sequences padded to an even length;
  'mim_jax'  `plain_attention`: the same function written out, q scaled before its product.
https://docs.jax.dev/en/latest/_autosummary/jax.nn.dot_product_attention.html
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

xla_attention = functools.partial(jax.nn.dot_product_attention, implementation="xla")


def even_length_attention(query, key, value, bias=None, *, implementation="cudnn"):
    """jax.nn.dot_product_attention, on a sequence padded to an even length where it is odd
    (cuDNN's flash attention trains only on even lengths, e.g. not on a ViT's 197 tokens): the
    padding token is masked out as a key (key_value_seq_lengths) and dropped from the output.
    cuDNN takes the bias in the inputs' dtype."""
    if bias is not None:
        bias = bias.astype(query.dtype)
    n = query.shape[1]
    if n % 2 == 0:
        return jax.nn.dot_product_attention(query, key, value, bias=bias,
                                            implementation=implementation)
    pad = lambda t: jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0)))
    if bias is not None:  # [..., N, N] -> [..., N+1, N+1]
        bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 2) + [(0, 1), (0, 1)])
    lengths = jnp.full((query.shape[0],), n, jnp.int32)
    out = jax.nn.dot_product_attention(pad(query), pad(key), pad(value), bias=bias,
                                       key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :n]


cudnn_attention = functools.partial(even_length_attention, implementation="cudnn")


def plain_attention(query, key, value, bias=None):
    """softmax((q / sqrt(head_dim)) k^T + bias) v, the logits and the softmax in float32, q
    scaled before the product (N x head_dim values, not N x N)."""
    scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    # bfloat16 inputs with float32 logits must name the algorithm, or the backward pass mixes
    # types, as jax.nn.dot_product_attention does (https://github.com/jax-ml/jax/issues/24047).
    precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if query.dtype == jnp.bfloat16 else None
    logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key, precision=precision,
                        preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value)


IMPLEMENTATIONS = {"xla": xla_attention, "cudnn": cudnn_attention, "mim_jax": plain_attention}
DEFAULT = "xla"
