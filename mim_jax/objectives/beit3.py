"""BEiT-3 (Wang et al. 2023, "Image as a Foreign Language"): masked data modeling with one
shared Multiway encoder on images, texts and image-text pairs.

Three streams, each its own forward pass through the same model inside one loss:
  image  block-wise masked patches (40%) predict the codes of a frozen VQ-KD tokenizer
         (BEiT v2's targets), through the vision MLM head;
  text   15% of the tokens are masked (BERT's 80/10/10 replacement) and predict their ids,
         through the text MLM head;
  pair   50% of the caption's tokens are masked and predicted as in the text stream; the image
         is masked and predicted as in the image stream (objective.mask_pair_images).
The loss is sum_s objective.loss_weights[s] * loss_s over the streams the batch holds.

Batch (every part optional, at least one stream present):
  images  {'image': float32 [Bi, H, W, C]} (normalised pixels)
  texts   {'text_ids': int32 [Bt, T], 'text_padding': bool [Bt, T] (True at padding)}
  pairs   {'pair_image': float32 [Bp, H, W, C], 'pair_text_ids': int32 [Bp, T],
           'pair_text_padding': bool [Bp, T]}
  'image_tokens' / 'pair_image_tokens' (int32 [B, L]): tokenizer ids computed ahead of time,
  used instead of running the tokenizer.

The heads are separate Linear layers (truncated normal 0.02, zero bias): torchscale's BEiT3
refuses a shared input / output embedding and unilm's BEiT-3 text head (BEiT3ForCaptioning's
mlm_head) is its own nn.Linear. Masks are drawn on device from the 'mask' RNG stream.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import flops, masking, models
from mim_jax.models import initializers, multiway
from mim_jax.objectives import beit
from mim_jax.objectives.base import BatchField, Frozen, Objective, make_rngs

STREAMS = ("image", "text", "pair")
# The batch keys that make a stream present.
STREAM_KEYS = {"image": ("image",), "text": ("text_ids", "text_padding"),
               "pair": ("pair_image", "pair_text_ids", "pair_text_padding")}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """objective.text: the text vocabulary, its special ids and the text masking."""
    vocab_size: int = 64010  # the released BEiT-3 sentencepiece vocabulary
    pad_id: int = 1
    bos_id: int = 0
    eos_id: int = 2
    mask_id: Optional[int] = None  # None: vocab_size - 1 (XLM-R's <mask>, the last id)
    max_length: int = 64  # most tokens per text, bos / eos included
    mask_ratio: float = 0.15  # texts alone
    pair_mask_ratio: float = 0.5  # the texts of image-text pairs
    # Of the masked tokens, these fractions get a random ordinary token or stay unchanged;
    # the rest become mask_id (BERT's 80/10/10).
    random_token_prob: float = 0.1
    unchanged_prob: float = 0.1

    @property
    def mask_token(self) -> int:
        return self.vocab_size - 1 if self.mask_id is None else self.mask_id

    @property
    def special_ids(self):
        return (self.bos_id, self.eos_id, self.pad_id, self.mask_token)


@dataclasses.dataclass(frozen=True)
class ImageMaskConfig:
    """objective.image_mask: BEiT's block-wise masking (masking.block_mask)."""
    ratio: float = 0.4  # round(ratio * patches) are masked (78 of 196)
    min_num_patches: int = 16
    max_num_patches: Optional[int] = None
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None
    exact: bool = True  # BEiT v2: fill up to the exact count


LOSS_WEIGHTS = {"image": 1.0, "text": 1.0, "pair": 1.0}
# objective.mix: each stream's share of a step's batch_size (the paper: 2048 + 2048 + 2048).
MIX = {"image": 1, "text": 1, "pair": 1}


# ---------------------------------------------------------------- config

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _read_block(block, cls, field: str):
    """A config block (dict-like or None) -> the dataclass `cls`, unset fields defaulted."""
    values = block.to_dict() if hasattr(block, "to_dict") else dict(block or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{field}.{unknown[0]} is not a field; allowed: {known}.")
    return cls(**{k: v for k, v in values.items() if v is not None})


def _check_open_ratio(value, field: str) -> None:
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{field}={value!r} must be a number in the open interval (0, 1).")


def check_text_config(text: TextConfig) -> TextConfig:
    f = "objective.text"
    if not _is_int(text.vocab_size) or text.vocab_size < 5:
        raise ValueError(f"{f}.vocab_size={text.vocab_size!r} must be an integer >= 5 (the "
                         "four special ids and at least one ordinary token).")
    for name in ("pad_id", "bos_id", "eos_id", "mask_id"):
        value = getattr(text, name)
        if name == "mask_id" and value is None:
            continue
        if not _is_int(value) or not 0 <= value < text.vocab_size:
            raise ValueError(f"{f}.{name}={value!r} must be an id in [0, vocab_size="
                             f"{text.vocab_size}).")
    if len(set(text.special_ids)) != 4:
        raise ValueError(f"{f}: bos_id={text.bos_id}, eos_id={text.eos_id}, pad_id="
                         f"{text.pad_id} and mask_id={text.mask_token} must be four different "
                         "ids.")
    if not _is_int(text.max_length) or text.max_length < 1:
        raise ValueError(f"{f}.max_length={text.max_length!r} must be a positive integer.")
    _check_open_ratio(text.mask_ratio, f"{f}.mask_ratio")
    _check_open_ratio(text.pair_mask_ratio, f"{f}.pair_mask_ratio")
    for name in ("random_token_prob", "unchanged_prob"):
        value = getattr(text, name)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{f}.{name}={value!r} must be a number in [0, 1].")
    if text.random_token_prob + text.unchanged_prob > 1.0:
        raise ValueError(f"{f}.random_token_prob + {f}.unchanged_prob = "
                         f"{text.random_token_prob + text.unchanged_prob} must be <= 1 (the "
                         "rest of the masked tokens become mask_id).")
    return text


def check_text_length(text: TextConfig, arch: multiway.MultiwayConfig) -> None:
    """Texts of max_length tokens must fit the model's text position table."""
    limit = arch.max_text_positions - multiway.POSITION_OFFSET
    if text.max_length > limit:
        raise ValueError(f"objective.text.max_length={text.max_length} must be <= {limit} "
                         f"(model.max_text_positions={arch.max_text_positions} - "
                         f"{multiway.POSITION_OFFSET}).")


def num_masked_patches(image_mask: ImageMaskConfig, num_patches: int) -> int:
    return int(round(image_mask.ratio * num_patches))


def check_image_mask_config(m: ImageMaskConfig, num_patches: int) -> ImageMaskConfig:
    f = "objective.image_mask"
    _check_open_ratio(m.ratio, f"{f}.ratio")
    n = num_masked_patches(m, num_patches)
    if not 1 <= n < num_patches:
        raise ValueError(f"{f}.ratio={m.ratio} masks {n} of {num_patches} patches; at least "
                         "one must be masked and one kept.")
    if not _is_int(m.min_num_patches) or not 1 <= m.min_num_patches <= n:
        raise ValueError(f"{f}.min_num_patches={m.min_num_patches!r} must be an integer in "
                         f"[1, {n}] (the patches the ratio masks).")
    if m.max_num_patches is not None and (not _is_int(m.max_num_patches)
                                          or m.max_num_patches < m.min_num_patches):
        raise ValueError(f"{f}.max_num_patches={m.max_num_patches!r} must be None or an "
                         f"integer >= min_num_patches={m.min_num_patches}.")
    if not _is_number(m.min_aspect) or m.min_aspect <= 0:
        raise ValueError(f"{f}.min_aspect={m.min_aspect!r} must be a number > 0.")
    if m.max_aspect is not None and (not _is_number(m.max_aspect)
                                     or m.max_aspect < m.min_aspect):
        raise ValueError(f"{f}.max_aspect={m.max_aspect!r} must be None (1 / min_aspect) or a "
                         f"number >= min_aspect={m.min_aspect}.")
    if not isinstance(m.exact, bool):
        raise ValueError(f"{f}.exact={m.exact!r} must be True or False.")
    return m


def loss_weights(obj_cfg) -> dict:
    """objective.loss_weights, defaults filled in, checked."""
    given = dict(obj_cfg.get("loss_weights") or {})
    unknown = sorted(set(given) - set(STREAMS))
    if unknown:
        raise ValueError(f"objective.loss_weights.{unknown[0]} is not a stream; allowed: "
                         f"{list(STREAMS)}.")
    weights = {**LOSS_WEIGHTS, **{k: v for k, v in given.items() if v is not None}}
    for stream, value in weights.items():
        if not _is_number(value) or not value >= 0:
            raise ValueError(f"objective.loss_weights.{stream}={value!r} must be a number "
                             ">= 0.")
    if not any(weights[s] > 0 for s in STREAMS):
        raise ValueError(f"objective.loss_weights={weights}: at least one stream needs a "
                         "positive weight.")
    return {s: float(weights[s]) for s in STREAMS}


def stream_mix(obj_cfg, weights: dict) -> dict:
    """objective.mix, defaults filled in, checked: stream -> its share (an integer >= 0)."""
    given = dict(obj_cfg.get("mix") or {})
    unknown = sorted(set(given) - set(STREAMS))
    if unknown:
        raise ValueError(f"objective.mix.{unknown[0]} is not a stream; allowed: "
                         f"{list(STREAMS)}.")
    # Unset shares: 1 for a stream that counts in the loss, 0 for one that does not.
    mix = {s: MIX[s] if weights[s] > 0 else 0 for s in STREAMS}
    mix.update({k: v for k, v in given.items() if v is not None})
    for stream, share in mix.items():
        if not _is_int(share) or share < 0:
            raise ValueError(f"objective.mix.{stream}={share!r} must be an integer >= 0 (its "
                             "share of each step's batch_size).")
        if share and not weights[stream] > 0:
            raise ValueError(f"objective.mix.{stream}={share} feeds a stream whose "
                             f"objective.loss_weights.{stream}=0: set one of them to 0.")
    if not any(mix.values()):
        raise ValueError(f"objective.mix={mix}: at least one stream needs a share > 0.")
    return {s: int(mix[s]) for s in STREAMS}


def split_batch(batch_size: int, mix: dict) -> dict:
    """stream -> examples per step: batch_size split in the proportions of `mix`."""
    total = sum(mix.values())
    if batch_size % total:
        raise ValueError(f"batch_size={batch_size} does not split in the proportions of "
                         f"objective.mix={mix}: it must be a multiple of {total}.")
    return {s: batch_size // total * share for s, share in mix.items()}


def check_text_data(text_cfg, text: TextConfig) -> None:
    """The run's `text` block (the data side) must give what the model is built for."""
    from mim_jax.data import text as text_data  # pylint: disable=g-import-not-at-top

    text_data.validate_text_config(text_cfg)
    if text_cfg.max_len != text.max_length:
        raise ValueError(f"text.max_len={text_cfg.max_len} must equal "
                         f"objective.text.max_length={text.max_length} (the texts the model "
                         "is built for).")


def check_tokenizer(tokenizer, text: TextConfig) -> None:
    """The text tokenizer's ids must be the model's: same vocabulary, special ids and mask."""
    ours = dict(vocab_size=text.vocab_size, bos_id=text.bos_id, eos_id=text.eos_id,
                pad_id=text.pad_id, mask_id=text.mask_token)
    theirs = dict(vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id)
    for name, value in ours.items():
        if theirs[name] != value:
            raise ValueError(f"objective.text.{name}={value} but the tokenizer of "
                             f"text.spm_model has {name} {theirs[name]}: they must match.")


def encoder_from_config(model_cfg, image_size: int, channels: int, vocab_size: int):
    """The MultiwayEncoder config.model describes (models.multiway_from_config), on the data's
    images and the objective's text vocabulary."""
    name = model_cfg.get("name", "multiway")
    if name != "multiway":
        raise ValueError(f"model.name={name!r}: BEiT-3 needs model.name='multiway'.")
    return models.multiway_from_config(model_cfg, image_size, channels, vocab_size=vocab_size)


# ---------------------------------------------------------------- text masking

class TextMask(NamedTuple):
    """A masked batch of texts.

    inputs:    [B, T] the ids the model reads (masked tokens replaced).
    mask:      [B, T] bool, True where a token is predicted.
    positions: [B, K] int32, the masked positions (the first `count` of each row are real).
    valid:     [B, K] bool, which entries of `positions` are masked positions.
    """
    inputs: jax.Array
    mask: jax.Array
    positions: jax.Array
    valid: jax.Array


def text_mask_slots(length: int, ratio: float) -> int:
    """The most tokens a text of `length` can have masked: floor(ratio * length) + 1 (see
    mask_text), at most `length`. The head runs on this many positions, not on all T."""
    return min(length, int(math.floor(ratio * length)) + 1)


def maskable_tokens(text_ids, padding, text: TextConfig):
    """[B, T] bool: tokens that may be masked (never padding, bos, eos or pad ids)."""
    special = (text_ids == text.bos_id) | (text_ids == text.eos_id) | (text_ids == text.pad_id)
    return ~padding.astype(bool) & ~special


def _ordinary_ids(text: TextConfig) -> np.ndarray:
    """The ids a random replacement draws from: all but bos, eos, pad and mask."""
    return np.setdiff1d(np.arange(text.vocab_size), np.asarray(text.special_ids)).astype(np.int32)


def mask_text(key, text_ids, padding, ratio: float, text: TextConfig) -> TextMask:
    """Masks floor(ratio * n + u) of each text's n maskable tokens, u ~ U[0, 1) (fairseq's
    MaskTokensDataset count: `ratio` of the tokens in expectation, exactly a count per text),
    chosen uniformly; each masked token becomes mask_id, a random ordinary token or stays
    itself with probabilities 1 - random - unchanged, random_token_prob, unchanged_prob."""
    b, t = text_ids.shape
    k_count, k_order, k_kind, k_random = jax.random.split(key, 4)
    can = maskable_tokens(text_ids, padding, text)
    n = jnp.sum(can, axis=1)
    count = jnp.floor(ratio * n + jax.random.uniform(k_count, (b,))).astype(jnp.int32)
    # Maskable tokens first in random order: the first `count` of that order are masked.
    noise = jnp.where(can, jax.random.uniform(k_order, (b, t)), 2.0)
    positions = jnp.argsort(noise, axis=1)[:, :text_mask_slots(t, ratio)].astype(jnp.int32)
    valid = jnp.arange(positions.shape[1])[None, :] < count[:, None]
    rows = jnp.arange(b)[:, None]
    mask = jnp.zeros((b, t), bool).at[rows, positions].set(valid)

    u = jax.random.uniform(k_kind, (b, t))
    to_mask = mask & (u < 1.0 - text.random_token_prob - text.unchanged_prob)
    to_random = mask & ~to_mask & (u < 1.0 - text.unchanged_prob)
    ordinary = jnp.asarray(_ordinary_ids(text))
    random_ids = ordinary[jax.random.randint(k_random, (b, t), 0, ordinary.shape[0])]
    inputs = jnp.where(to_mask, text.mask_token, jnp.where(to_random, random_ids, text_ids))
    return TextMask(inputs=inputs.astype(text_ids.dtype), mask=mask, positions=positions,
                    valid=valid)


# ---------------------------------------------------------------- model

class BEiT3(nn.Module):
    """The Multiway encoder with a vision MLM head (tokenizer codes, per patch) and a text MLM
    head (token ids), both on the encoder's final (per-modality LayerNorm) outputs."""
    encoder: multiway.MultiwayEncoder
    vision_vocab_size: int  # the tokenizer's codes
    text_vocab_size: int

    @nn.compact
    def __call__(self, images=None, text_ids=None, *, vision_mask=None, text_padding_mask=None,
                 text_positions=None, predict_image: bool = True, train: bool = False):
        """-> (image logits [B, L, codes] or None, text logits [B, K, vocab] or None).

        Image logits are for every patch (None without images or with predict_image=False);
        text logits at `text_positions` [B, K] (every token when None)."""
        enc = self.encoder
        out = enc(images, text_ids, vision_mask=vision_mask,
                  text_padding_mask=text_padding_mask, train=train)
        x = out["encoder_out"]
        split = enc.config.num_vision_tokens if images is not None else 0

        def head(features, name):
            return nn.Dense(features, dtype=enc.dtype, param_dtype=enc.param_dtype,
                            dot_general=enc.dot_general,
                            kernel_init=initializers.beit_trunc_normal(), name=name)

        vision_head = head(self.vision_vocab_size, "vision_head")
        text_head = head(self.text_vocab_size, "text_head")
        image_logits = text_logits = None
        if images is not None and predict_image:
            image_logits = vision_head(x[:, 1:split])  # patches, CLS left out
        if text_ids is not None:
            tokens = x[:, split:]
            if text_positions is not None:
                tokens = jnp.take_along_axis(tokens, text_positions[..., None], axis=1)
            text_logits = text_head(tokens)
        if self.is_initializing():  # both heads get parameters, whatever the init input
            if image_logits is None:
                vision_head(x[:, :0])
            if text_logits is None:
                text_head(x[:, :0])
        return image_logits, text_logits


# ---------------------------------------------------------------- objective

def needs(config) -> dict:
    """The frozen tokenizer objective.tokenizer names, kept in model_state['tokenizer']."""
    del config
    return {"tokenizer": Frozen(kind="tokenizer", source="objective.tokenizer",
                                into=("model_state", "tokenizer"))}


def _present(batch, stream: str) -> bool:
    return all(k in batch for k in STREAM_KEYS[stream])


def check_batch(batch, image_shape, text: TextConfig) -> None:
    """One-line errors for a batch that does not follow the contract (at trace time)."""
    for stream in STREAMS:
        keys = STREAM_KEYS[stream]
        if any(k in batch for k in keys) and not _present(batch, stream):
            raise ValueError(f"batch has {sorted(k for k in keys if k in batch)} but the "
                             f"{stream} stream needs all of {list(keys)}.")
    for key in ("image", "pair_image"):
        if key in batch and tuple(batch[key].shape[1:]) != tuple(image_shape):
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}; expected "
                             f"[batch, {', '.join(map(str, image_shape))}].")
    for ids, pad in (("text_ids", "text_padding"), ("pair_text_ids", "pair_text_padding")):
        if ids not in batch:
            continue
        shape = tuple(batch[ids].shape)
        if len(shape) != 2 or not jnp.issubdtype(batch[ids].dtype, jnp.integer):
            raise ValueError(f"batch[{ids!r}] is {batch[ids].dtype} {shape}; expected int "
                             "[batch, tokens].")
        if tuple(batch[pad].shape) != shape:
            raise ValueError(f"batch[{pad!r}] has shape {tuple(batch[pad].shape)}; expected "
                             f"that of batch[{ids!r}] {shape}.")
        if shape[1] > text.max_length:
            raise ValueError(f"batch[{ids!r}] holds {shape[1]} tokens per text; "
                             f"objective.text.max_length={text.max_length} is the most.")
    if "pair_image" in batch and batch["pair_image"].shape[0] != batch["pair_text_ids"].shape[0]:
        raise ValueError(f"batch['pair_image'] holds {batch['pair_image'].shape[0]} images "
                         f"but batch['pair_text_ids'] {batch['pair_text_ids'].shape[0]} texts.")


def _prediction_metrics(logits, labels, mask, vocab_size: int) -> dict:
    loss, accuracy = beit.masked_cross_entropy(logits, labels, mask)
    return {"loss": loss, "accuracy": accuracy,
            "accuracy_most_frequent_token": beit.most_frequent_token_accuracy(
                labels, mask, vocab_size)}


def build(config, frozen) -> Objective:
    """`frozen`: needs(config) resolved (mim_jax.pretrained): the tokenizer's module."""
    obj_cfg, data_cfg = config.objective, config.data
    text = check_text_config(_read_block(obj_cfg.get("text"), TextConfig, "objective.text"))
    encoder = encoder_from_config(config.model, data_cfg.image_size, data_cfg.channels,
                                  text.vocab_size)
    arch = encoder.config
    check_text_length(text, arch)
    image_mask = check_image_mask_config(
        _read_block(obj_cfg.get("image_mask"), ImageMaskConfig, "objective.image_mask"),
        arch.num_patches)
    weights = loss_weights(obj_cfg)
    mix = stream_mix(obj_cfg, weights)
    if config.get("batch_size"):
        split_batch(config.batch_size, mix)  # a batch that does not split fails here
    if config.get("text") is not None:
        check_text_data(config.text, text)
    mask_pair_images = obj_cfg.get("mask_pair_images", True)
    if not isinstance(mask_pair_images, bool):
        raise ValueError(f"objective.mask_pair_images={mask_pair_images!r} must be True or "
                         "False.")
    tokenizer = frozen["tokenizer"].part
    if tokenizer.grid != arch.grid:
        raise ValueError(
            f"objective.tokenizer gives a {tokenizer.grid}x{tokenizer.grid} token grid but the "
            f"model's patch grid is {arch.grid}x{arch.grid} (data.image_size="
            f"{data_cfg.image_size}, patch {arch.patch_size}): they must match.")
    model = BEiT3(encoder=encoder, vision_vocab_size=tokenizer.vocab_size,
                  text_vocab_size=text.vocab_size)
    image_shape = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
    codes = tokenizer.vocab_size

    num_masked = num_masked_patches(image_mask, arch.num_patches)

    def draw_image_mask(key, batch_size):
        return masking.block_mask(
            key, batch_size, arch.grid, arch.grid, num_masked,
            min_num_patches=image_mask.min_num_patches,
            max_num_patches=image_mask.max_num_patches, min_aspect=image_mask.min_aspect,
            max_aspect=image_mask.max_aspect, exact=image_mask.exact)

    def image_labels(model_state, images, tokens):
        if tokens is None:  # not tokenized ahead of time: run the frozen tokenizer
            tokens = tokenizer.encode(model_state["tokenizer"], beit._images_01(images, data_cfg))
        return jax.lax.stop_gradient(tokens)

    def apply(params, rngs, train, *args, **kwargs):
        return model.apply({"params": params}, *args, train=train, rngs=rngs, **kwargs)

    def image_stream(params, model_state, batch, rngs, train, masks):
        images = batch["image"]
        mask = masks.get("image")
        if mask is None:
            mask = draw_image_mask(rngs["mask"], images.shape[0])
        labels = image_labels(model_state, images, batch.get("image_tokens"))
        logits, _ = apply(params, rngs, train, images, vision_mask=mask)
        metrics = _prediction_metrics(logits, labels, mask, codes)
        metrics["mask_ratio"] = jnp.mean(mask.astype(jnp.float32))
        return metrics["loss"], metrics, {"logits": logits, "labels": labels, "mask": mask}

    def text_metrics(logits, ids, padding, tm):
        labels = jnp.take_along_axis(ids, tm.positions, axis=1)
        metrics = _prediction_metrics(logits, labels, tm.valid, text.vocab_size)
        maskable = jnp.sum(maskable_tokens(ids, padding, text))
        metrics["mask_ratio"] = jnp.sum(tm.mask) / jnp.maximum(maskable, 1)
        return metrics, labels

    def text_stream(params, model_state, batch, rngs, train, masks):
        ids, padding = batch["text_ids"], batch["text_padding"]
        tm = masks.get("text")
        if tm is None:
            tm = mask_text(rngs["mask"], ids, padding, text.mask_ratio, text)
        _, logits = apply(params, rngs, train, text_ids=tm.inputs, text_padding_mask=padding,
                          text_positions=tm.positions)
        metrics, labels = text_metrics(logits, ids, padding, tm)
        return metrics["loss"], metrics, {"logits": logits, "labels": labels, "text_mask": tm}

    def pair_stream(params, model_state, batch, rngs, train, masks):
        images, ids = batch["pair_image"], batch["pair_text_ids"]
        padding = batch["pair_text_padding"]
        image_key, text_key = jax.random.split(rngs["mask"])
        tm = masks.get("pair_text")
        if tm is None:
            tm = mask_text(text_key, ids, padding, text.pair_mask_ratio, text)
        vision_mask = None
        if mask_pair_images:
            vision_mask = masks.get("pair_image")
            if vision_mask is None:
                vision_mask = draw_image_mask(image_key, images.shape[0])
        image_logits, text_logits = apply(
            params, rngs, train, images, tm.inputs, vision_mask=vision_mask,
            text_padding_mask=padding, text_positions=tm.positions,
            predict_image=mask_pair_images)
        text_m, labels = text_metrics(text_logits, ids, padding, tm)
        metrics = {f"text_{k}": v for k, v in text_m.items()}
        outputs = {"text_logits": text_logits, "text_labels": labels, "text_mask": tm}
        loss = text_m["loss"]
        if mask_pair_images:
            image_targets = image_labels(model_state, images, batch.get("pair_image_tokens"))
            image_m = _prediction_metrics(image_logits, image_targets, vision_mask, codes)
            image_m["mask_ratio"] = jnp.mean(vision_mask.astype(jnp.float32))
            metrics.update({f"image_{k}": v for k, v in image_m.items()})
            outputs.update(image_logits=image_logits, image_labels=image_targets,
                           image_mask=vision_mask)
            loss = loss + image_m["loss"]
        metrics["loss"] = loss
        return loss, metrics, outputs

    run_stream = {"image": image_stream, "text": text_stream, "pair": pair_stream}

    def init_fn(rng):
        model_rng, tok_rng = jax.random.split(rng)
        images = jnp.zeros((1, *image_shape), jnp.float32)
        params = model.init({"params": model_rng, **make_rngs(model_rng)}, images,
                            train=False)["params"]
        tok_params = tokenizer.module.init(tok_rng, images, method="encode")["params"]
        return params, {"tokenizer": tok_params}

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False, *,
                masks=None):
        """`masks` (tests): explicit masks by name instead of drawn ones: 'image' and
        'pair_image' [B, L] bool, 'text' and 'pair_text' TextMask."""
        check_batch(batch, image_shape, text)
        streams = [s for s in STREAMS if weights[s] > 0 and _present(batch, s)]
        if not streams:
            raise ValueError(f"the batch (keys {sorted(batch)}) holds no stream with a "
                             f"positive objective.loss_weights ({weights}).")
        loss, metrics, outputs = 0.0, {}, {}
        for stream in streams:
            # Each stream draws its own masks and drop-path patterns.
            index = STREAMS.index(stream)
            stream_rngs = {name: jax.random.fold_in(key, index) for name, key in rngs.items()}
            stream_loss, stream_metrics, outputs[stream] = run_stream[stream](
                params, model_state, batch, stream_rngs, train, masks or {})
            loss = loss + weights[stream] * stream_loss
            metrics.update({f"{stream}_{k}": v for k, v in stream_metrics.items()})
        metrics["loss"] = loss
        aux = {"metrics": metrics, "model_state": model_state}
        if with_outputs:
            aux["outputs"] = outputs
        return loss, aux

    def batch_fields(batch_size):
        sizes = split_batch(batch_size, mix)
        t = text.max_length
        fields = {}
        for stream, prefix in (("image", ""), ("pair", "pair_")):
            if sizes[stream]:
                fields[prefix + "image"] = BatchField((sizes[stream], *image_shape), jnp.uint8,
                                                      256)
        for stream, prefix in (("text", ""), ("pair", "pair_")):
            if sizes[stream]:
                fields[prefix + "text_ids"] = BatchField((sizes[stream], t), jnp.int32,
                                                         text.vocab_size)
                fields[prefix + "text_padding"] = BatchField((sizes[stream], t), jnp.bool_, 2)
        return fields

    return Objective(name="beit3", model=model, loss_fn=loss_fn, encoder_keys=("encoder",),
                     image_shape=image_shape, init_fn=init_fn,
                     stream_sizes_fn=lambda batch_size: split_batch(batch_size, mix),
                     batch_fields_fn=batch_fields, batch_multiple=sum(mix.values()),
                     check_text_tokenizer=lambda tokenizer: check_tokenizer(tokenizer, text),
                     forward_flops=forward_flops(arch, codes, text, mix, mask_pair_images))


def forward_flops(arch: multiway.MultiwayConfig, codes: int, text: TextConfig, mix: dict,
                  mask_pair_images: bool) -> dict:
    """Forward FLOPs per example of a mixed batch in the proportions of `mix` (objective.mix;
    the paper's 2048 + 2048 + 2048), texts at objective.text.max_length tokens.

    Per stream: the patch embedding, the encoder on all its tokens (each token goes through
    one modality's copy, so a Multiway layer costs what a ViT block does), the vision head on
    every patch (as computed) and the text head on text_mask_slots positions. The frozen
    tokenizer and the text embedding lookup are not counted."""
    patches, vision = arch.num_patches, arch.num_vision_tokens
    t = text.max_length

    def encoder(tokens):
        return flops.transformer_flops(tokens, arch.width, arch.depth, arch.mlp_dim)

    patch_embed = flops.dense_flops(patches, arch.patch_size ** 2 * arch.channels, arch.width)
    vision_head = flops.dense_flops(patches, arch.width, codes)

    def text_head(ratio):
        return flops.dense_flops(text_mask_slots(t, ratio), arch.width, text.vocab_size)

    parts = {
        "image": {"patch_embed": patch_embed, "encoder": encoder(vision),
                  "vision_head": vision_head},
        "text": {"encoder": encoder(t), "text_head": text_head(text.mask_ratio)},
        "pair": {"patch_embed": patch_embed, "encoder": encoder(vision + t),
                 "text_head": text_head(text.pair_mask_ratio),
                 **({"vision_head": vision_head} if mask_pair_images else {})},
    }
    total = sum(mix.values())
    return {f"{s}/{part}": value * mix[s] / total
            for s in STREAMS if mix[s] for part, value in parts[s].items()}


__all__ = ["BEiT3", "ImageMaskConfig", "TextConfig", "TextMask", "build", "forward_flops",
           "mask_text", "maskable_tokens", "needs", "text_mask_slots"]
