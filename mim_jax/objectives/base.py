"""The objective interface: everything the trainer needs to know about a MIM method."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# loss_fn(params, batch, rngs, train, with_outputs=False) -> (loss, aux)
#   batch:  {'image': float32 [B, H, W, C]} (normalised pixels)
#   rngs:   {'mask': key, 'drop_path': key}
#   aux:    {'metrics': {name: scalar}} and, with with_outputs=True, 'outputs':
#           {'reconstruction': [B, H, W, C] normalised pixels, 'mask': [B, H, W, 1] 1 = masked,
#            'prediction', 'target': what the loss compares (same shape), 'loss_mask': where
#            (broadcastable, 1 = counted)}; the error evaluators use the last three.
LossFn = Callable[..., Tuple[jax.Array, Mapping[str, Any]]]

# 'augment': on-device batch augmentation of fine-tuning (mixup / cutmix / random erasing).
RNG_STREAMS = ("mask", "drop_path", "augment")


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
    # How the loss compares prediction and target ('mse' or 'l1'): the best constant guess is
    # the per-element mean or median of the target, which the error evaluator reports.
    error_metric: str = "mse"
    # A stateful objective's loss_fn takes model_state=... (variables the optimizer does not
    # train: BatchNorm statistics, a frozen encoder) and returns the new one in
    # aux['model_state'].
    stateful: bool = False
    # rng -> (params, model_state); the default is init() and no state.
    init_fn: Optional[Callable] = None
    # Host-side (params, model_state) of a fresh run -> the starting ones, run once before the
    # data is touched: loads frozen weights an objective needs (BEiT's tokenizer, VQ-KD's
    # teacher). Raises ValueError naming the config field when they cannot be loaded.
    start_from: Optional[Callable] = None

    @property
    def encoder(self) -> nn.Module:
        """The encoder module (its parameters are params[encoder_keys[0]])."""
        return getattr(self.model, self.encoder_keys[0])

    def init(self, rng: jax.Array, batch_size: int = 1):
        """Parameters for this objective's model (a pure function of `rng`)."""
        params_rng, stream_rng = jax.random.split(rng)
        rngs = {"params": params_rng, **make_rngs(stream_rng)}
        images = jnp.zeros((batch_size, *self.image_shape), jnp.float32)
        return self.model.init(rngs, images, *self.init_args(batch_size), train=False)["params"]

    def init_variables(self, rng: jax.Array):
        """(params, model_state) of a fresh model: what the trainer starts from."""
        if self.init_fn is not None:
            return self.init_fn(rng)
        return self.init(rng), {}

    def encoder_params(self, params):
        return {k: params[k] for k in self.encoder_keys}
