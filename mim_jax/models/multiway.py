"""BEiT-3's Multiway Transformer encoder (pure linen): one pre-LN transformer over image
patches, text tokens or both, whose layers hold one copy of some sub-layers per modality.

Vision tokens (CLS + patches) come first, text tokens after them; a token goes through the
copy of its modality ("vision" or "text"), the split being the number of vision tokens. The
switches (`MultiwayConfig`):

  multiway_attention  True: the attention LayerNorm, q/k/v/out projections and Sub-LN's inner
                      LayerNorm exist per modality (torchscale's multiway=True, the released
                      BEiT-3 models); False: one attention shared by both (the paper's text).
                      The feed-forward side (its LayerNorm and FFN) is always per modality.
  vl_ffn_layers       the top k layers also hold a vision-language FFN (and its LayerNorm)
                      that every token of an image + text input goes through; single-modality
                      inputs keep their own FFN there (the VLMo routing the paper follows).
  sub_ln              Magneto's Sub-LN: a LayerNorm after the attention (before the output
                      projection) and one after the FFN's activation (before fc2).

Numerics follow torchscale 0.3.0's BEiT3: learned positions in separate vision and text tables
whose first used row is 2 (fairseq's convention; rows 0 and 1 are never read), padded text
tokens zeroed after the embedding and masked out as keys, a final LayerNorm per modality, exact
GELU, q scaled by head_dim**-0.5. Dropout is not implemented (0 in the released configs).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from mim_jax.models import activations, attention, initializers, remat as remat_lib
from mim_jax.models.vit import DropPath, check_images

# fairseq reserves positions 0 and 1 (padding index + 1), so the first token reads row 2.
POSITION_OFFSET = 2
# A finite stand-in for torchscale's -inf on padded keys: the softmax weight is exactly 0 in
# float32 either way, and a fully padded row stays finite instead of NaN.
_MASKED_LOGIT = -1e9

MODALITIES = ("vision", "text")
# Initialisation of the references (see `_linear_inits`):
#   'torchscale': torchscale's BEiT3 as built: torch's default Linear / Conv init (kernel and
#                 bias uniform in +-1/sqrt(fan_in)), and with Sub-LN the v, out, fc1 and fc2
#                 weights and biases multiplied by sqrt(log(2 * depth)).
#   'unilm':      unilm's BEiT3Wrapper, which re-draws every Linear after torchscale's init:
#                 kernels from a normal of std 0.02 cut at +-1 std, zero biases, so no Sub-LN
#                 gain survives. The patch conv, embeddings and tokens keep torchscale's init.
# Both: text embedding N(0, width**-0.5), position tables N(0, 1), CLS / mask tokens zero,
# LayerNorms 1 / 0.
INIT_STYLES = ("torchscale", "unilm")


@dataclasses.dataclass(frozen=True)
class MultiwayConfig:
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    image_size: int = 224
    channels: int = 3
    vocab_size: int = 64010
    # Rows of the text position table; the first POSITION_OFFSET rows are unused, so texts
    # hold at most max_text_positions - 2 tokens (torchscale's max_source_positions).
    max_text_positions: int = 1024
    multiway_attention: bool = True
    vl_ffn_layers: int = 0
    sub_ln: bool = True
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_vision_tokens(self) -> int:
        return self.num_patches + 1  # CLS first

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


# The released BEiT-3 models (unilm beit3/modeling_utils.py: torchscale's decoupled Multiway
# Magneto) and the paper's giant model (shared attention, VL FFN in the top three layers).
PRESETS = {
    "base": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
    "large": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=16),
    "giant": dict(width=1408, depth=40, num_heads=16, mlp_dim=6144, patch_size=14,
                  multiway_attention=False, vl_ffn_layers=3, sub_ln=False),
}


def preset(name: str, **overrides) -> MultiwayConfig:
    """A checked MultiwayConfig from a preset ('base', 'large', 'giant') plus overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}; allowed: {sorted(PRESETS)}.")
    return check_config(MultiwayConfig(**{**PRESETS[name], **overrides}))


def check_config(cfg: MultiwayConfig) -> MultiwayConfig:
    for field in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size",
                  "channels", "vocab_size"):
        value = getattr(cfg, field)
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{field}={value!r} must be a positive integer.")
    if cfg.width % cfg.num_heads:
        raise ValueError(f"width={cfg.width} is not divisible by num_heads={cfg.num_heads}.")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size={cfg.image_size} is not a multiple of "
                         f"patch_size={cfg.patch_size}.")
    if cfg.max_text_positions <= POSITION_OFFSET:
        raise ValueError(f"max_text_positions={cfg.max_text_positions} must exceed "
                         f"{POSITION_OFFSET} (the unused first rows).")
    if not 0 <= cfg.vl_ffn_layers <= cfg.depth:
        raise ValueError(f"vl_ffn_layers={cfg.vl_ffn_layers} must be in [0, depth={cfg.depth}].")
    if cfg.layer_norm_eps <= 0:
        raise ValueError(f"layer_norm_eps={cfg.layer_norm_eps} must be positive.")
    return cfg


def subln_gain(depth: int) -> float:
    """Magneto's init gain of an encoder-only Sub-LN stack (torchscale's Encoder)."""
    return math.sqrt(math.log(2 * depth))


def _scaled(init, factor):
    """`init`'s draw multiplied by `factor` (a scalar or an array broadcast to the shape)."""
    if isinstance(factor, (int, float)) and factor == 1:
        return init

    def scaled_init(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * jnp.asarray(factor, dtype)
    return scaled_init


def _linear_inits(style: str, fan_in: int, out_axis, gain=1.0):
    """(kernel_init, bias_init) of a Linear under an init style; `gain` (a scalar, or an
    array broadcast against the trailing axes of kernel and bias alike) multiplies both in
    torchscale's style only."""
    if style == "unilm":
        return initializers.beit_trunc_normal(), nn.initializers.zeros
    if style == "torchscale":
        return (_scaled(initializers.torch_default_kernel(out_axis), gain),
                _scaled(initializers.torch_default_bias(fan_in), gain))
    raise ValueError(f"init_style={style!r}; allowed: {list(INIT_STYLES)}.")


class Multiway(nn.Module):
    """One copy of a layer per modality, as children 'vision', 'text' (and 'vl' with
    `vl=True`). The first `split` tokens (axis 1) go through 'vision', the rest through
    'text'; with `vl`, an input holding both modalities goes through 'vl' whole.
    `make(name)` builds a copy."""
    make: Callable[[str], nn.Module]
    vl: bool = False

    @nn.compact
    def __call__(self, x, split: int):
        names = MODALITIES + (("vl",) if self.vl else ())
        experts = {name: self.make(name) for name in names}
        n = x.shape[1]
        if self.vl and 0 < split < n:
            routes = {"vl": x}
        else:
            routes = {"vision": x[:, :split], "text": x[:, split:]}
            routes = {name: part for name, part in routes.items() if part.shape[1]}
        if self.is_initializing():  # every copy gets parameters, whatever the init input
            for name in names:
                if name not in routes:
                    experts[name](x[:, :0])
        outs = [experts[name](part) for name, part in routes.items()]
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _route(name: str, make, x, split: int, *, shared: bool = False, vl: bool = False):
    """`make(name)` applied to all tokens (`shared`) or a Multiway of it named `name`; call
    inside a compact method (the modules become the caller's children)."""
    if shared:
        return make(name)(x)
    return Multiway(make, vl=vl, name=name)(x, split)


class QKV(nn.Module):
    """Fused q, k, v projection [B, N, D] -> [B, N, 3, heads, head_dim]; kernel
    (D, 3, heads, head_dim), bias (3, heads, head_dim) (one matmul instead of three)."""
    num_heads: int
    head_dim: int
    kernel_init: Callable
    bias_init: Callable
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, x):
        shape = (3, self.num_heads, self.head_dim)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], *shape), self.param_dtype)
        bias = self.param("bias", self.bias_init, shape, self.param_dtype)
        y = self.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                             (((x.ndim - 1,), (0,)), ((), ())))
        return y + bias.astype(self.dtype)


class _LayerArgs(nn.Module):
    """Fields every layer part shares, and the builders for its LayerNorms and Linears."""
    sub_ln: bool = True
    eps: float = 1e-5
    init_style: str = "torchscale"
    gain: float = 1.0  # Sub-LN's init gain on v, out, fc1, fc2 (torchscale style)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general

    # Not wrapped as module methods: the layers they build belong to whichever module calls
    # the builder (a Multiway's copies), not to this one.
    @nn.nowrap
    def norm(self, name):
        return nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)

    @nn.nowrap
    def dense(self, features, fan_in, name, gain=1.0):
        kernel_init, bias_init = _linear_inits(self.init_style, fan_in, -1, gain)
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=kernel_init, bias_init=bias_init,
                        dot_general=self.dot_general, name=name)


class SelfAttention(_LayerArgs):
    """Softmax self-attention over all tokens; projections (and Sub-LN's inner LayerNorm) per
    modality when `multiway`. Takes the normalised tokens, returns the residual branch."""
    num_heads: int = 12
    multiway: bool = True
    attention_fn: Callable = attention.xla_attention

    @nn.compact
    def __call__(self, x, split: int, bias=None):
        b, n, width = x.shape
        head_dim = width // self.num_heads
        # torchscale draws q, k, v separately (fan_in = width each); the gain is v's alone,
        # on the q / k / v axis of kernel (D, 3, H, Dh) and bias (3, H, Dh).
        v_gain = np.array([1.0, 1.0, self.gain], np.float32)[:, None, None]
        kernel_init, bias_init = _linear_inits(self.init_style, width, (1, 2, 3), v_gain)
        qkv = _route("qkv", lambda name: QKV(
            num_heads=self.num_heads, head_dim=head_dim, kernel_init=kernel_init,
            bias_init=bias_init, dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=self.dot_general, name=name), x, split, shared=not self.multiway)
        out = self.attention_fn(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias)
        out = out.reshape(b, n, width)
        if self.sub_ln:
            out = _route("inner_norm", self.norm, out, split, shared=not self.multiway)
        return _route("proj", lambda name: self.dense(width, width, name, self.gain), out, split,
                      shared=not self.multiway)


class FeedForward(_LayerArgs):
    """fc1 -> GELU -> (Sub-LN LayerNorm) -> fc2."""
    mlp_dim: int = 3072
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        y = self.dense(self.mlp_dim, width, "fc1", self.gain)(x)
        # torchscale evaluates the activation in float32 whatever the compute dtype.
        y = self.activation(y.astype(jnp.float32)).astype(y.dtype)
        if self.sub_ln:
            y = self.norm("norm")(y)
        return self.dense(width, self.mlp_dim, "fc2", self.gain)(y)


class MultiwayLayer(_LayerArgs):
    """Pre-LN layer: x + attention(LN(x)), then x + FFN(LN(x)), LN and FFN per modality."""
    num_heads: int = 12
    mlp_dim: int = 3072
    multiway_attention: bool = True
    vl_ffn: bool = False
    use_drop_path: bool = False
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, x, split: int, bias=None, drop_rate=0.0, deterministic: bool = True):
        no_drop = deterministic or not self.use_drop_path
        parts = dict(sub_ln=self.sub_ln, eps=self.eps, init_style=self.init_style,
                     gain=self.gain, dtype=self.dtype, param_dtype=self.param_dtype,
                     dot_general=self.dot_general)
        h = _route("attn_norm", self.norm, x, split, shared=not self.multiway_attention)
        h = SelfAttention(num_heads=self.num_heads, multiway=self.multiway_attention,
                          attention_fn=self.attention_fn, name="attn", **parts)(h, split, bias)
        x = x + DropPath(name="drop_path1")(h, drop_rate, no_drop)
        h = _route("ffn_norm", self.norm, x, split, vl=self.vl_ffn)
        h = _route("ffn", lambda name: FeedForward(mlp_dim=self.mlp_dim,
                                                   activation=self.activation, name=name,
                                                   **parts), h, split, vl=self.vl_ffn)
        return x + DropPath(name="drop_path2")(h, drop_rate, no_drop)


class MultiwayEncoder(nn.Module):
    """BEiT-3's encoder. Call with images, text or both:

      images            [B, H, W, C] (NHWC); becomes CLS + patch tokens.
      vision_mask       [B, num_patches] bool: patches replaced by the learned mask token.
      text_ids          [B, T] int token ids, T <= max_text_positions - 2.
      text_padding_mask [B, T] bool, True at padding (torchscale's text_padding_position).

    Returns torchscale BEiT3's outputs: {'encoder_out': [B, N, width] after the final
    LayerNorm (with final_norm), vision tokens first; 'encoder_padding_mask': [B, N] bool
    (False on vision tokens); 'multiway_split_position': -1 (vision only), 0 (text only) or
    the number of vision tokens}. `init` creates every parameter whichever inputs it is given.
    """
    config: MultiwayConfig
    drop_path_rate: float = 0.0
    init_style: str = "torchscale"  # INIT_STYLES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu
    # False: no final LayerNorm; 'encoder_out' is the last layer's output (unilm's
    # BEiT3ForImageClassification, normalize_output=False, which normalises after pooling).
    final_norm: bool = True
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    # Images give CLS + patches: the evaluators pool the CLS token or the patches' mean.
    has_cls_token = True

    def setup(self):
        cfg = check_config(self.config)
        if self.init_style not in INIT_STYLES:
            raise ValueError(f"init_style={self.init_style!r}; allowed: {list(INIT_STYLES)}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate!r} must be in [0, 1).")
        # The unilm wrapper leaves Conv2d alone: torch's default init in both styles.
        fan_in = cfg.patch_size ** 2 * cfg.channels
        self.patch_embed = nn.Conv(
            cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed",
            kernel_init=initializers.torch_default_kernel(3),
            bias_init=initializers.torch_default_bias(fan_in))
        zeros, param = nn.initializers.zeros, self.param
        self.cls_token = param("cls_token", zeros, (1, 1, cfg.width), self.param_dtype)
        self.mask_token = param("mask_token", zeros, (1, 1, cfg.width), self.param_dtype)
        self.vision_pos_embed = param(
            "vision_pos_embed", nn.initializers.normal(1.0),
            (POSITION_OFFSET + cfg.num_vision_tokens, cfg.width), self.param_dtype)
        self.text_embed = param("text_embed", nn.initializers.normal(cfg.width ** -0.5),
                                (cfg.vocab_size, cfg.width), self.param_dtype)
        self.text_pos_embed = param("text_pos_embed", nn.initializers.normal(1.0),
                                    (cfg.max_text_positions, cfg.width), self.param_dtype)
        gain = subln_gain(cfg.depth) if cfg.sub_ln and self.init_style == "torchscale" else 1.0
        # `split` slices the tokens and `deterministic` picks the code path: both stay static.
        layer_cls = remat_lib.wrap(MultiwayLayer, self.remat, static_argnums=(2, 5))
        self.layers = [
            layer_cls(
                num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                multiway_attention=cfg.multiway_attention,
                vl_ffn=i >= cfg.depth - cfg.vl_ffn_layers, sub_ln=cfg.sub_ln,
                eps=cfg.layer_norm_eps, init_style=self.init_style, gain=gain,
                use_drop_path=self.drop_path_rate > 0, dtype=self.dtype,
                param_dtype=self.param_dtype, dot_general=self.dot_general,
                attention_fn=self.attention_fn, activation=self.activation, name=f"layer_{i}")
            for i in range(cfg.depth)]
        if self.final_norm:
            self.norm = Multiway(lambda name: nn.LayerNorm(
                epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                name=name), name="norm")

    def embed_vision(self, images, vision_mask=None):
        """[B, H, W, C] -> CLS + patch embeddings with positions [B, 1 + L, width]."""
        cfg = self.config
        check_images(images, cfg.image_size, cfg.channels)
        x = self.patch_embed(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.width)
        if vision_mask is not None:
            if tuple(vision_mask.shape) != x.shape[:2]:
                raise ValueError(f"vision_mask has shape {tuple(vision_mask.shape)}; expected "
                                 f"[batch, {cfg.num_patches}] (one flag per patch).")
            w = vision_mask[..., None].astype(x.dtype)
            x = x * (1 - w) + self.mask_token.astype(x.dtype) * w
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.vision_pos_embed[POSITION_OFFSET:].astype(x.dtype)

    def embed_text(self, text_ids):
        """[B, T] ids -> token embeddings with positions [B, T, width]."""
        cfg = self.config
        limit = cfg.max_text_positions - POSITION_OFFSET
        if text_ids.ndim != 2 or text_ids.shape[1] > limit:
            raise ValueError(f"text_ids has shape {tuple(text_ids.shape)}; expected [batch, "
                             f"tokens] with at most {limit} tokens (max_text_positions - "
                             f"{POSITION_OFFSET}).")
        x = jnp.take(self.text_embed, text_ids, axis=0).astype(self.dtype)
        positions = self.text_pos_embed[POSITION_OFFSET:POSITION_OFFSET + text_ids.shape[1]]
        return x + positions.astype(x.dtype)

    def __call__(self, images=None, text_ids=None, *, vision_mask=None, text_padding_mask=None,
                 train: bool = False) -> dict:
        if images is None and text_ids is None:
            raise ValueError("pass images, text_ids or both.")
        if vision_mask is not None and images is None:
            raise ValueError("vision_mask was given without images.")
        if text_padding_mask is not None and text_ids is None:
            raise ValueError("text_padding_mask was given without text_ids.")
        cfg = self.config
        if self.is_initializing() and images is None:  # create the patch conv's parameters
            self.patch_embed(jnp.zeros((1, cfg.patch_size, cfg.patch_size, cfg.channels),
                                       self.dtype))
        tokens, padding = [], []
        if images is not None:
            tokens.append(self.embed_vision(images, vision_mask))
            padding.append(jnp.zeros(tokens[-1].shape[:2], bool))
        if text_ids is not None:
            tokens.append(self.embed_text(text_ids))
            if text_padding_mask is not None and \
                    tuple(text_padding_mask.shape) != tuple(text_ids.shape):
                raise ValueError(f"text_padding_mask has shape {tuple(text_padding_mask.shape)}; "
                                 f"expected that of text_ids {tuple(text_ids.shape)}.")
            padding.append(jnp.zeros(text_ids.shape, bool) if text_padding_mask is None
                           else text_padding_mask.astype(bool))
        x = jnp.concatenate(tokens, axis=1)
        padding = jnp.concatenate(padding, axis=1)
        split = tokens[0].shape[1] if images is not None else 0  # vision tokens come first

        bias = None
        if text_padding_mask is not None:
            # Zero the padded tokens' embeddings as torchscale does; mask them out as keys.
            x = x * (1 - padding[..., None].astype(x.dtype))
            bias = jnp.where(padding, _MASKED_LOGIT, 0.0).astype(jnp.float32)[:, None, None, :]
            bias = jnp.broadcast_to(bias, (x.shape[0], 1, x.shape[1], x.shape[1]))
        rates = np.linspace(0.0, self.drop_path_rate, cfg.depth)  # torchscale's rule
        for layer, rate in zip(self.layers, rates):
            x = layer(x, split, bias, float(rate), not train)
        if self.final_norm:
            x = self.norm(x, split)
        position = -1 if text_ids is None else split
        return {"encoder_out": x, "encoder_padding_mask": padding,
                "multiway_split_position": position}
