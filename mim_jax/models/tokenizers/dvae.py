"""OpenAI's DALL-E dVAE encoder as BEiT v1's frozen tokenizer (tok_cfg.name='dall_e').

The network (dall_e.encoder.Encoder): a 7x7 conv to n_hid channels; `group_count` groups of
`n_blk_per_group` residual blocks at widths n_hid * 1, 2, 4, 8, ..., each group but the last
followed by a 2x2 max-pool; then relu and a 1x1 conv to `vocab_size` logits. A block adds a
bottleneck residual path (relu-conv3x3-relu-conv3x3-relu-conv3x3-relu-conv1x1, width/4 inside)
scaled by 1 / (group_count * n_blk_per_group)**2 to its input (1x1-projected where the width
changes). BEiT's targets are the argmax over the logits of the logit-laplace-mapped image.

Two deliberate differences from the references:
- BEiT v1 feeds the tokenizer a second view of the same random crop, resized from the source
  image to 112 px by PIL (LANCZOS, 8-bit). Here `encode` resizes the pretraining-size batch on
  the device with jax.image.resize('lanczos3', antialiased) and clips the kernel's overshoot to
  [0, 1] as PIL's 8-bit output does: the tokenizer then needs no second input pipeline, at the
  cost of resampling an already resampled image (tokens can differ near ties).
- The reference always builds four groups and uses group_count only in the residual gain;
  here group_count is the number of groups. Both agree at 4, the only released value.
NHWC, float32 throughout (on CUDA the reference runs all convs but the last in float16).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.tokenizers import TokenizerSpec

LOGIT_LAPLACE_EPS = 0.1

# The reference draws conv weights from N(0, 1 / fan_in) (untruncated) and zeroes biases.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def map_pixels(x: jax.Array) -> jax.Array:
    """[0, 1] pixels -> [eps, 1 - eps], the domain of the dVAE's logit-laplace likelihood."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def resize(images: jax.Array, size: int) -> jax.Array:
    """[B, H, W, C] in [0, 1] -> [B, size, size, C]: antialiased lanczos3 like PIL's LANCZOS,
    clipped to [0, 1] as PIL's 8-bit output saturates the kernel's overshoot."""
    b, _, _, c = images.shape
    out = jax.image.resize(images, (b, size, size, c), "lanczos3", antialias=True)
    return jnp.clip(out, 0.0, 1.0)


def _conv(features: int, size: int, name: str) -> nn.Conv:
    pad = (size - 1) // 2  # the reference's symmetric "same" padding for odd kernels
    return nn.Conv(features, (size, size), padding=((pad, pad), (pad, pad)),
                   kernel_init=_KERNEL_INIT, name=name)


class EncoderBlock(nn.Module):
    features: int
    post_gain: float

    @nn.compact
    def __call__(self, x):
        hidden = self.features // 4
        shortcut = x if x.shape[-1] == self.features else _conv(self.features, 1, "id_path")(x)
        h = x
        for j, (width, size) in enumerate(((hidden, 3), (hidden, 3), (hidden, 3),
                                           (self.features, 1)), start=1):
            h = _conv(width, size, f"conv_{j}")(nn.relu(h))
        return shortcut + self.post_gain * h


class EncoderGroup(nn.Module):
    features: int
    num_blocks: int
    post_gain: float
    pool: bool

    @nn.compact
    def __call__(self, x):
        for i in range(1, self.num_blocks + 1):
            x = EncoderBlock(features=self.features, post_gain=self.post_gain,
                             name=f"block_{i}")(x)
        return nn.max_pool(x, (2, 2), strides=(2, 2)) if self.pool else x


class DVAEEncoder(nn.Module):
    n_hid: int = 256
    group_count: int = 4
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192
    input_size: int = 112  # side of the square image the tokens are computed from

    @property
    def grid(self) -> int:
        return self.input_size // 2 ** (self.group_count - 1)

    @nn.compact
    def __call__(self, x):
        """Logit-laplace-mapped images [B, H, W, input_channels] -> logits [B, h, w, vocab]."""
        if x.ndim != 4 or x.shape[-1] != self.input_channels:
            raise ValueError(f"DVAEEncoder takes [B, H, W, {self.input_channels}] images, got "
                             f"shape {x.shape}.")
        post_gain = 1.0 / (self.group_count * self.n_blk_per_group) ** 2
        x = _conv(self.n_hid, 7, "input")(x)
        for g in range(1, self.group_count + 1):
            x = EncoderGroup(features=self.n_hid * 2 ** (g - 1),
                             num_blocks=self.n_blk_per_group, post_gain=post_gain,
                             pool=g < self.group_count, name=f"group_{g}")(x)
        return _conv(self.vocab_size, 1, "output")(nn.relu(x))

    def encode(self, images):
        """float32 images in [0, 1], [B, H, W, C] (C = 1 or input_channels) at any square size
        -> int32 token ids [B, grid * grid], row-major."""
        if (images.ndim != 4 or images.shape[1] != images.shape[2]
                or not jnp.issubdtype(images.dtype, jnp.floating)):
            raise ValueError(f"encode takes square float images in [0, 1], [B, H, H, C], got "
                             f"{images.dtype} {images.shape}.")
        b, h, w, c = images.shape
        if (h, w) != (self.input_size, self.input_size):
            images = resize(images, self.input_size)
        if c == 1 and self.input_channels != 1:  # grayscale data, RGB tokenizer
            images = jnp.repeat(images, self.input_channels, axis=-1)
        logits = self(map_pixels(images))
        return jnp.argmax(logits, axis=-1).reshape(b, -1).astype(jnp.int32)


# ---------------------------------------------------------------- config

_DEFAULTS = dict(input_size=112, n_hid=256, group_count=4, n_blk_per_group=2, vocab_size=8192)


def _int_field(tok_cfg, name: str, minimum: int, multiple: int = 1, why: str = "") -> int:
    value = tok_cfg.get(name, _DEFAULTS[name])
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or value % multiple):
        rule = f" and a multiple of {multiple} ({why})" if multiple > 1 else ""
        raise ValueError(f"objective.tokenizer.{name}={value!r} is not allowed; it must be an "
                         f"integer >= {minimum}{rule}.")
    return value


def build(tok_cfg, image_size: int, channels: int) -> TokenizerSpec:
    group_count = _int_field(tok_cfg, "group_count", 1)
    n_blk_per_group = _int_field(tok_cfg, "n_blk_per_group", 1)
    vocab_size = _int_field(tok_cfg, "vocab_size", 2)
    n_hid = _int_field(tok_cfg, "n_hid", 4, 4, "blocks narrow to a quarter of their width")
    stride = 2 ** (group_count - 1)
    input_size = _int_field(tok_cfg, "input_size", stride, stride,
                            f"the pooling between {group_count} groups")
    if channels not in (1, 3):
        raise ValueError(f"the DALL-E tokenizer takes RGB or grayscale images, not {channels} "
                         f"channels.")
    checkpoint = tok_cfg.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ValueError(f"objective.tokenizer.checkpoint={checkpoint!r} is not allowed; it must "
                         f"be the path of a DALL-E encoder state dict file.")
    module = DVAEEncoder(n_hid=n_hid, group_count=group_count, n_blk_per_group=n_blk_per_group,
                         vocab_size=vocab_size, input_size=input_size)
    del image_size  # encode resizes whatever size it gets; BEiT checks the grids agree
    return TokenizerSpec(name="dall_e", module=module, vocab_size=vocab_size, grid=module.grid,
                         config=dict(checkpoint=checkpoint, group_count=group_count,
                                     n_blk_per_group=n_blk_per_group))
