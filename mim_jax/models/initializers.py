"""The weight initialisers of the reference implementations, named after where they come from.

Flax's truncated_normal takes its bounds in units of std; the references' timm / torch calls
take them in absolute units, which is why two "truncated normals of std 0.02" differ:
  * timm's trunc_normal_(std=.02) cuts at +-2 absolute = +-100 std: a plain normal in effect
    (MAE's tokens, Swin, SparK's decoder);
  * BEiT / SimMIM-ViT call it with a=-std, b=std: cut at +-1 std (sample std about 0.54 x 0.02).
PyTorch's default nn.Linear / nn.Conv2d init, kept wherever a reference never re-initialises a
layer, draws kernel and bias uniformly in +-1/sqrt(fan_in).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STD = 0.02


def timm_trunc_normal():
    """timm's trunc_normal_(std=.02) with its default absolute cut at +-2."""
    return nn.initializers.truncated_normal(STD, lower=-2.0 / STD, upper=2.0 / STD)


def beit_trunc_normal():
    """trunc_normal_(std=.02, a=-.02, b=.02): cut at +-1 std (BEiT, SimMIM-ViT, SparK tokens)."""
    return nn.initializers.truncated_normal(STD, lower=-1.0, upper=1.0)


def torch_default_kernel(out_axis=-1):
    """PyTorch's default Linear / Conv kernel: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
    fan_in = the in_axis sizes x the receptive field (the axes that are neither)."""
    def init(key, shape, dtype=jnp.float32):
        # Every axis but the outputs' counts (in_axis and the receptive field alike).
        outs = {a % len(shape) for a in np.atleast_1d(out_axis)}
        fan_in = int(np.prod([n for a, n in enumerate(shape) if a not in outs]))
        bound = 1.0 / np.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def torch_default_bias(fan_in: int):
    """PyTorch's default Linear / Conv bias: U(+-1/sqrt(fan_in)) of the layer's kernel."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init
