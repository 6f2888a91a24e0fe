"""The objective interface: everything the trainer needs to know about a MIM method."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# loss_fn(params, batch, rngs, train, with_outputs=False) -> (loss, aux)
#   batch:  {'image': float32 [B, H, W, C]} (normalised pixels)
#   rngs:   {'mask': key, 'drop_path': key}
#   aux:    {'metrics': {name: scalar}} and, with with_outputs=True, 'outputs':
#           {'reconstruction': [B, H, W, C] normalised pixels, 'mask': [B, H, W, 1] 1 = masked}
LossFn = Callable[..., Tuple[jax.Array, Mapping[str, Any]]]

RNG_STREAMS = ("mask", "drop_path")


def make_rngs(key: jax.Array) -> dict:
    """One independent key per RNG stream, derived from `key` (e.g. a per-step key)."""
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(RNG_STREAMS)}


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    model: nn.Module
    loss_fn: LossFn
    # Top-level parameter subtrees that make up the reusable encoder (fine-tuning / export).
    encoder_keys: Tuple[str, ...]
    image_shape: Tuple[int, int, int]  # (H, W, C)
    # Extra positional model inputs after the images, for init (e.g. SimMIM's token mask).
    init_args: Callable[[int], tuple] = lambda batch_size: ()

    def init(self, rng: jax.Array, batch_size: int = 1):
        """Parameters for this objective's model (a pure function of `rng`)."""
        params_rng, stream_rng = jax.random.split(rng)
        rngs = {"params": params_rng, **make_rngs(stream_rng)}
        images = jnp.zeros((batch_size, *self.image_shape), jnp.float32)
        return self.model.init(rngs, images, *self.init_args(batch_size), train=False)["params"]

    def encoder_params(self, params):
        return {k: params[k] for k in self.encoder_keys}
