"""The objective interface: everything the trainer needs to know about a method."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import flops

# loss_fn(params, model_state, batch, rngs, train, with_outputs=False) -> (loss, aux)
#   model_state: the variables the optimizer does not train (BatchNorm statistics, a frozen
#           tokenizer, teacher or encoder); {} for an objective without any
#   batch:  {'image': float32 [B, H, W, C]} (normalised pixels)
#   rngs:   {'mask': key, 'drop_path': key, 'augment': key}
#   aux:    {'metrics': {name: scalar}, 'model_state': the new model_state (the one given, for
#           an objective that updates none)} and, with with_outputs=True, 'outputs':
#           {'reconstruction': [B, H, W, C] normalised pixels, 'mask': [B, H, W, 1] 1 = masked,
#            'prediction', 'target': what the loss compares (same shape), 'loss_mask': where
#            (broadcastable, 1 = counted)}; the error evaluators use the last three.
# Objectives may take keyword-only extras after these (an explicit mask, for tests).
LossFn = Callable[..., Tuple[jax.Array, Mapping[str, Any]]]

# 'augment': on-device batch augmentation of fine-tuning (mixup / cutmix / random erasing).
RNG_STREAMS = ("mask", "drop_path", "augment")


def make_rngs(key: jax.Array) -> dict:
    """One independent key per RNG stream, derived from `key` (e.g. a per-step key)."""
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(RNG_STREAMS)}


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Weights an objective runs but never trains, named by a config block. The objective
    declares them; mim_jax.pretrained resolves the module they run in when the objective is
    built (`part`) and reads the weights once, into a fresh run, before the data is touched."""
    # 'tokenizer': BEiT's targets (models.tokenizers; part: its TokenizerSpec).
    # 'teacher': an encoder run as it was pretrained (part: a FrozenEncoder).
    # 'encoder': pretrained weights for the objective's own encoder, fitted to it (no part).
    kind: str
    source: str  # the config block that names them, e.g. 'objective.tokenizer'
    # Where they go in {'params': ..., 'model_state': ...}, e.g. ('model_state', 'tokenizer').
    into: Tuple[str, ...]
    part: Any = None


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
    """A frozen encoder with the input it was trained on: `channels`-channel images resized to
    `image_size` and normalised with `mean` / `std`. `source`: the path it comes from."""
    module: nn.Module
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    channels: int
    source: str


class BatchField(NamedTuple):
    """One entry of a train-step batch: its shape and dtype, and `high`, the exclusive upper
    bound of valid values (256 for pixels, the vocabulary for token ids, 2 for flags), so that
    a synthetic batch of random values is one the step can run on."""
    shape: Tuple[int, ...]
    dtype: Any
    high: int


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
    # rng -> (params, model_state); the default is init() and no state.
    init_fn: Optional[Callable] = None
    # Forward FLOPs per image by model part (mim_jax.flops' convention), for throughput and
    # MFU; empty where there is no analytic count (ConvNets).
    forward_flops: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # Parts that only run forward in training (a linear probe's frozen encoder).
    forward_only: Tuple[str, ...] = ()
    # name -> the frozen weights it needs (see Frozen); the registry fills it in.
    frozen: Mapping[str, Frozen] = dataclasses.field(default_factory=dict)
    with_labels: bool = False  # the data iterator must yield 'label'
    # with_outputs=True returns outputs['reconstruction'] (pixels) next to 'prediction',
    # 'target', 'mask' and 'loss_mask': what the reconstruction evaluator shows.
    predicts_pixels: bool = False
    ema_decay: float = 0.0  # exponential moving average of the parameters (0 = off)
    # An objective that reads more than images (BEiT-3: images, texts, image-text pairs) says
    # how a global batch of n examples splits over its input streams (stream -> examples) and
    # what the step's batch then holds (batch_fields). None: images alone.
    stream_sizes_fn: Optional[Callable[[int], Mapping[str, int]]] = None
    batch_fields_fn: Optional[Callable[[int], Mapping[str, "BatchField"]]] = None
    # Every global batch is a multiple of this (BEiT-3: the sum of objective.mix's shares).
    # The streams split any multiple of it in the same proportions, so per-device batches
    # that are multiples of it keep every stream's part divisible over the devices.
    batch_multiple: int = 1
    # Raises ValueError when a text tokenizer's ids are not the ones the model is built for.
    check_text_tokenizer: Optional[Callable[[Any], None]] = None

    @property
    def encoder(self) -> nn.Module:
        """The encoder module (its parameters are params[encoder_keys[0]])."""
        return getattr(self.model, self.encoder_keys[0])

    @property
    def flops_per_image(self) -> Optional[float]:
        """Analytic train-step FLOPs per image, or None without a count."""
        if not self.forward_flops:
            return None
        return flops.train_step_flops(self.forward_flops, self.forward_only)

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

    def stream_sizes(self, batch_size: int) -> Optional[dict]:
        """stream -> examples per step of a global batch of `batch_size` (each is sharded on its
        own), or None for an objective that reads images alone."""
        return None if self.stream_sizes_fn is None else dict(self.stream_sizes_fn(batch_size))

    def batch_fields(self, batch_size: int) -> dict:
        """What the train step reads for a global batch of `batch_size` examples, as the data
        pipelines yield it (uint8 pixels, normalised inside the step): name -> BatchField.
        Benchmarks and the AOT compile build their batches from it."""
        if self.batch_fields_fn is not None:
            return dict(self.batch_fields_fn(batch_size))
        fields = {"image": BatchField((batch_size, *self.image_shape), jnp.uint8, 256)}
        if self.with_labels:
            fields["label"] = BatchField((batch_size,), jnp.int32, self.model.num_classes)
        return fields

    def encoder_params(self, params):
        return {k: params[k] for k in self.encoder_keys}
