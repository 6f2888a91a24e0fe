"""BEiT v2's VQ-KD tokenizer (tok_cfg.name='vqkd'): a ViT encoder whose patch tokens go through
a Linear-Tanh-Linear "encode task layer" to the code dimension, are l2-normalised and replaced
by the nearest code of an l2-normalised codebook; a small ViT decoder (patch 1 over the token
grid, input channels = code dimension) and a Linear-Tanh-Linear "decode task layer" map the
codes to the teacher's feature width. Trained by mim_jax.objectives.vqkd; frozen, it gives
BEiT v2 its targets through `encode`.

The official model (unilm/beit2 modeling_vqkd.py, vqkd_encoder_base_decoder_{1,3}x768x12_*):
ViT-B/16 encoder with learned absolute positions, a CLS token, q/v biases (no k bias), no layer
scale, and a final LayerNorm over the patch tokens (its `fc_norm`: LayerNorm is per token, so
our ViT's final norm over all tokens followed by dropping the CLS is the same); decoder: the
same ViT at width 768 with 1 (or 3) blocks over the 14 x 14 code map; 8192 codes of dim 32.
It normalises [0, 1] images to [-1, 1] (its 'default' process_type, which BEiT v2 pretraining
uses): mean = std = 0.5 here. The mean / std live in the tokenizer config.

tok_cfg fields (all but `name` optional; defaults: the official base model):
  checkpoint   an official vqkd .pth file or a mim_jax VQ-KD run (workdir or checkpoints/STEP);
               an existing run brings its own recorded fields below, so BEiT needs only this
  image_size   input side; None = the images' own size (the pretraining size)
  patch_size, width, depth, num_heads, mlp_dim                       the encoder
  decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim       the decoder
  n_codes, code_dim    codebook size and code dimension
  teacher_dim  decoder output width; None = the teacher's width (set by the objective)
  mean, std    per-channel normalisation of [0, 1] images (one value per channel)
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mim_jax import models
from mim_jax.models import vit
from mim_jax.models.tokenizers import TokenizerSpec

FIELD = "objective.tokenizer"
DEFAULTS = dict(checkpoint=None, image_size=None, patch_size=16, width=768, depth=12,
                num_heads=12, mlp_dim=3072, decoder_width=768, decoder_depth=1,
                decoder_heads=12, decoder_mlp_dim=3072, n_codes=8192, code_dim=32,
                teacher_dim=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_INT_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "decoder_width",
               "decoder_depth", "decoder_heads", "decoder_mlp_dim", "n_codes", "code_dim")
# The reference initialises its task layers (and the whole VQ-KD ViT) with trunc_normal(0.02).
_TASK_INIT = nn.initializers.truncated_normal(0.02)


def l2norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, 1e-12), as torch.nn.functional.normalize (a zero row stays zero)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Ids of the nearest codes in Euclidean distance ([..., D] -> [...] int32). On unit vectors
    this is the highest cosine; |z|^2 is the same for every code, so it is left out."""
    scores = jnp.sum(jnp.square(codebook), -1) - 2.0 * jnp.einsum("...d,kd->...k", z, codebook)
    return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def get_field(tok_cfg, name: str):
    value = tok_cfg.get(name) if hasattr(tok_cfg, "get") else None
    return DEFAULTS[name] if value is None else value


def validate(tok_cfg, channels: int) -> dict:
    """The tokenizer block's values, checked with one-line messages naming the field."""
    cfg = {name: get_field(tok_cfg, name) for name in DEFAULTS}
    for name in _INT_FIELDS + (("image_size",) if cfg["image_size"] is not None else ()):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{FIELD}.{name}={value!r} must be a positive integer.")
    if cfg["n_codes"] < 2:
        raise ValueError(f"{FIELD}.n_codes={cfg['n_codes']} must be >= 2.")
    for width, heads in (("width", "num_heads"), ("decoder_width", "decoder_heads")):
        if cfg[width] % cfg[heads]:
            raise ValueError(f"{FIELD}.{width}={cfg[width]} is not divisible by "
                             f"{FIELD}.{heads}={cfg[heads]}.")
    for name in ("mean", "std"):
        value = cfg[name]
        ok = isinstance(value, (tuple, list)) and len(value) == channels and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not ok or (name == "std" and min(value) <= 0):
            raise ValueError(f"{FIELD}.{name}={value!r} must be {channels} number(s), one per "
                             f"channel{' (> 0)' if name == 'std' else ''}.")
    if cfg["teacher_dim"] is not None and (not isinstance(cfg["teacher_dim"], int)
                                           or cfg["teacher_dim"] < 1):
        raise ValueError(f"{FIELD}.teacher_dim={cfg['teacher_dim']!r} must be a positive "
                         "integer or None (the teacher's width).")
    return cfg


class TaskLayer(nn.Module):
    """Linear - Tanh - Linear (the reference's encode/decode_task_layer)."""
    hidden: int
    out: int
    dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=_TASK_INIT,
                                         dot_general=self.dot_general, name=name)
        return dense(self.out, "fc2")(jnp.tanh(dense(self.hidden, "fc1")(x)))


class VQKD(nn.Module):
    """params: encoder, encode_task_layer, codebook [n_codes, code_dim] and, with a decoder,
    decoder and decode_task_layer. Images given to `features` / __call__ are already
    normalised with mean / std; `encode` takes [0, 1] images."""
    encoder: vit.ViT
    decoder: Optional[vit.ViT]
    n_codes: int
    code_dim: int
    teacher_dim: int
    mean: Sequence[float]
    std: Sequence[float]
    image_size: int  # the encoder's input side
    dot_general: Callable = lax.dot_general  # the task layers'; the ViTs have their own

    def setup(self):
        width = self.encoder.config.width
        self.encode_task_layer = TaskLayer(hidden=width, out=self.code_dim,
                                           dtype=self.encoder.dtype, dot_general=self.dot_general)
        # Unit random codes (the reference's init without k-means; with k-means the trainer
        # replaces them on the first batch).
        self.codebook = self.param(
            "codebook", lambda key, shape: l2norm(jax.random.normal(key, shape)),
            (self.n_codes, self.code_dim))
        if self.decoder is not None:
            self.decode_task_layer = TaskLayer(hidden=self.decoder.config.width,
                                               out=self.teacher_dim, dtype=self.decoder.dtype,
                                               dot_general=self.dot_general)

    @property
    def grid(self) -> int:
        return self.encoder.config.grid

    def features(self, images, train: bool = False):
        """Normalised images [B, H, W, C] -> l2-normalised code-space features [B, L, D]."""
        tokens = self.encoder(images, train=train)
        if self.encoder.cls_token:
            tokens = tokens[:, 1:]
        z = self.encode_task_layer(tokens.astype(jnp.float32))  # the reference: no autocast
        return l2norm(z.astype(jnp.float32))

    def decode(self, codes, train: bool = False):
        """Quantised features [B, L, D] -> predicted teacher features [B, L, teacher_dim]."""
        b, n, d = codes.shape
        out = self.decoder(codes.reshape(b, self.grid, self.grid, d), train=train)
        if self.decoder.cls_token:
            out = out[:, 1:]
        return self.decode_task_layer(out)

    def __call__(self, images, train: bool = False):
        """For init: (features, token ids, decoder output or None)."""
        z = self.features(images, train)
        ids = nearest_codes(z, self.codebook)
        rec = self.decode(self.codebook[ids], train) if self.decoder is not None else None
        return z, ids, rec

    def preprocess(self, images):
        """[0, 1] images at any square size -> the encoder's normalised input."""
        if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"encode takes float images in [0, 1] of shape [B, H, W, C], got "
                             f"{images.dtype} {images.shape}.")
        b, h, w, c = images.shape
        channels = self.encoder.config.channels
        if (h, w) != (self.image_size,) * 2:
            images = jax.image.resize(images, (b, self.image_size, self.image_size, c),
                                      "bicubic", antialias=True)
        if c == 1 and channels != 1:  # grayscale data, RGB tokenizer
            images = jnp.repeat(images, channels, axis=-1)
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return (images.astype(jnp.float32) - mean) / std

    def encode(self, images):
        """float32 images in [0, 1], NHWC -> int32 token ids [B, grid * grid], row-major."""
        return nearest_codes(self.features(self.preprocess(images)), self.codebook)


def build_model(cfg: dict, image_size: int, channels: int, *, with_decoder: bool,
                teacher_dim: Optional[int] = None, dtype=jnp.float32,
                layers: Optional[dict] = None) -> VQKD:
    """A VQKD module from validated tokenizer values (see `validate`); `layers`: the
    dot_general, attention_fn and activation of its layers (models.layer_functions; None:
    the defaults)."""
    layers = layers or models.layer_functions({})
    size = cfg["image_size"] or image_size
    arch = vit.resolve_vit_config("B/16", size, channels, patch_size=cfg["patch_size"],
                                  width=cfg["width"], depth=cfg["depth"],
                                  num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"])
    # The reference's VQ-KD ViT: learned positions, CLS, q/v biases, no layer scale.
    common = dict(cls_token=True, pos_embed="learned", qkv_bias="qv", init_style="beit",
                  dtype=dtype, **layers)
    decoder = None
    if with_decoder:
        dec_arch = vit.resolve_vit_config(
            "B/16", arch.grid, cfg["code_dim"], patch_size=1, width=cfg["decoder_width"],
            depth=cfg["decoder_depth"], num_heads=cfg["decoder_heads"],
            mlp_dim=cfg["decoder_mlp_dim"])
        decoder = vit.ViT(config=dec_arch, **common)
    teacher_dim = teacher_dim or cfg["teacher_dim"] or 1
    return VQKD(encoder=vit.ViT(config=arch, **common), decoder=decoder,
                n_codes=cfg["n_codes"], code_dim=cfg["code_dim"], teacher_dim=teacher_dim,
                mean=tuple(float(v) for v in cfg["mean"]),
                std=tuple(float(v) for v in cfg["std"]), image_size=size,
                dot_general=layers["dot_general"])


def build(tok_cfg, image_size: int, channels: int) -> TokenizerSpec:
    """The frozen, encode-only tokenizer (no decoder: BEiT never uses it). For an existing
    mim_jax VQ-KD run, `tok_cfg` is the block that run recorded (mim_jax.pretrained passes it);
    grayscale data may feed an RGB tokenizer (channels repeated)."""
    tok_channels = len(get_field(tok_cfg, "mean") or ())
    if channels not in (tok_channels, 1):
        raise ValueError(f"{FIELD}.mean / std describe {tok_channels}-channel images; the data "
                         f"has {channels} channels.")
    cfg = validate(tok_cfg, tok_channels)
    module = build_model(cfg, image_size, tok_channels, with_decoder=False)
    return TokenizerSpec(name="vqkd", module=module, vocab_size=cfg["n_codes"],
                         grid=module.grid, config=cfg)
