"""The layers' activation: the exact (erf) GELU of the references' nn.GELU (flax's nn.gelu
defaults to the tanh approximation)."""
from __future__ import annotations

import functools

import jax

gelu = functools.partial(jax.nn.gelu, approximate=False)
