"""Swin Transformer encoder (Liu et al. 2021) in linen, as SimMIM (Xie et al. 2022) uses it.

Feature maps stay NHWC throughout: windows, shifts and patch merging are reshapes, transposes
and rolls. Variants are strings ("T", "S", "B", "L") with explicit overrides on top; the output
is the final-stage map [B, H/32, W/32, C] (patch 4, four stages) that the SimMIM head decodes.
Behaviour follows the official microsoft/Swin-Transformer code and transformers' SwinModel
(the parity reference) where they agree:
  * a window >= a stage's resolution is clipped to it and that stage does not shift; its bias
    table is sized for the clipped window as in the official code (transformers keeps the
    configured size and cannot run windows larger than the resolution);
  * no padding (transformers pads): every stage resolution must be a multiple of its window;
  * the shift mask adds -100 (not -inf) between regions, exactly like both references;
  * no absolute position embedding and no dropout: SimMIM uses neither (ape=False, drop_rate=0).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mim_jax.models import activations, attention, initializers, remat as remat_lib
from mim_jax.models.vit import DropPath, check_images

VARIANTS = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, used by both references
SHIFT_MASK_VALUE = -100.0  # additive logit bias between tokens from different shift regions

# timm's trunc_normal_(std=.02): a plain normal in effect (mim_jax.models.initializers).
trunc_normal = initializers.timm_trunc_normal()


# ---------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Resolved Swin hyper-parameters (variant string + overrides); square images only."""
    image_size: int
    patch_size: int
    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int
    mlp_ratio: float = 4.0
    channels: int = 3
    layer_norm_eps: float = LAYER_NORM_EPS

    def __post_init__(self):
        """Named errors for every inconsistent field, also when built directly."""
        for name in ("depths", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not value:
                raise ValueError(f"{name}={value!r} must be a non-empty sequence of positive "
                                 f"ints, one per stage.")
            object.__setattr__(self, name, tuple(value))  # hashable: the config is a module field
        for name in ("image_size", "patch_size", "embed_dim", "window_size", "channels",
                     "depths", "num_heads"):
            value = getattr(self, name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                    raise ValueError(f"{name}={value!r} must be positive integer(s).")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths={self.depths} and num_heads={self.num_heads} must have the "
                             f"same length (one entry per stage).")
        if not self.mlp_ratio > 0 or int(self.mlp_ratio * self.embed_dim) <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must be positive.")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r} must be positive.")
        if self.image_size % self.stride:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size*2**(num_stages-1)"
                f"={self.stride}; allowed image sizes are multiples of {self.stride}.")
        resolutions = [self.stage_resolution(s) for s in range(self.num_stages)]
        for stage, (res, heads) in enumerate(zip(resolutions, self.num_heads)):
            if res % self.stage_window(stage):
                raise ValueError(
                    f"window_size={self.window_size} does not divide the {res}x{res} tokens of "
                    f"stage {stage} (image_size={self.image_size}); allowed: a window dividing "
                    f"every stage resolution {resolutions} (or at least as large: it is then "
                    f"clipped), e.g. 6 at 192 px, 7 at 224 px.")
            if self.stage_dim(stage) % heads:
                raise ValueError(f"num_heads={self.num_heads}: stage {stage} width "
                                 f"{self.stage_dim(stage)} is not divisible by {heads} heads.")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def stride(self) -> int:
        return self.patch_size * 2**(self.num_stages - 1)

    @property
    def feature_size(self) -> int:
        """Side of the output feature map."""
        return self.image_size // self.stride

    @property
    def num_features(self) -> int:
        return self.stage_dim(self.num_stages - 1)

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def stage_resolution(self, stage: int) -> int:
        return self.grid // 2**stage

    def stage_window(self, stage: int) -> int:
        return min(self.window_size, self.stage_resolution(stage))

    def stage_shift(self, stage: int) -> int:
        """Shift of the odd blocks; 0 when one window covers the whole stage."""
        return 0 if self.stage_resolution(stage) <= self.window_size else self.window_size // 2


def resolve_swin_config(variant: str, image_size: int, channels: int = 3, *, patch_size=None,
                        embed_dim=None, depths=None, num_heads=None, window_size=None,
                        mlp_ratio=None, layer_norm_eps=None) -> SwinConfig:
    """Variant string plus explicit overrides -> SwinConfig (validated with named errors).

    Defaults beyond the variant: patch_size 4, window_size 7 (the Swin paper at 224 px; SimMIM
    uses 6 at 192 px), mlp_ratio 4, layer_norm_eps 1e-5.
    """
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not a Swin variant; allowed: "
                         f"{list(VARIANTS)}.")
    base = dict(VARIANTS[variant], patch_size=4, window_size=7, mlp_ratio=4.0,
                layer_norm_eps=LAYER_NORM_EPS)
    overrides = dict(patch_size=patch_size, embed_dim=embed_dim, depths=depths,
                     num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                     layer_norm_eps=layer_norm_eps)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SwinConfig(image_size=image_size, channels=channels, **base)


# ---------------------------------------------------------------- windows (pure numpy / reshapes)

def relative_position_index(window: int) -> np.ndarray:
    """[N, N] index into the ((2W-1)^2, heads) bias table for the N = W*W tokens of a window
    (row-major), entry (dh + W-1) * (2W-1) + (dw + W-1) for the offset (dh, dw) = i - j."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shift_region_ids(size: int, window: int, shift: int) -> np.ndarray:
    """[size, size] region labels of the cyclically shifted map: along each axis positions
    [0, size-W), [size-W, size-shift) and [size-shift, size) are regions 0, 1, 2."""
    idx = np.arange(size)
    region = (idx >= size - window).astype(np.int32) + (idx >= size - shift)
    return region[:, None] * 3 + region[None, :]


def shifted_window_mask(size: int, window: int, shift: int) -> Optional[np.ndarray]:
    """Additive [num_windows, N, N] attention mask for a shifted stage (None without shift):
    SHIFT_MASK_VALUE between tokens of one window that come from different regions, else 0."""
    if shift == 0:
        return None
    ids = window_partition(shift_region_ids(size, window, shift)[None, :, :, None], window)
    ids = ids[0, :, :, 0]  # [num_windows, N]
    different = ids[:, :, None] != ids[:, None, :]
    return np.where(different, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x, window: int):
    """[B, H, W, C] -> [B, num_windows, W*W, C], windows and their tokens row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows, window: int, height: int, width: int):
    """Inverse of window_partition."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.reshape(b, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


# ---------------------------------------------------------------- modules

class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""
    num_heads: int
    window_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention

    @nn.compact
    def __call__(self, windows, shift_mask=None):
        """windows [B, nW, N, C]; shift_mask None or [nW, N, N] additive."""
        b, num_windows, n, width = windows.shape
        head_dim = width // self.num_heads
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=trunc_normal,
                     bias_init=nn.initializers.zeros, dot_general=self.dot_general)
        # Fused q/k/v kernel (C, 3, heads, head_dim): the layout shared with the ViT converters.
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name="qkv", **dense)(windows)
        qkv = qkv.reshape(b * num_windows, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        window = self.window_size
        table = self.param("relative_position_bias_table", trunc_normal,
                           ((2 * window - 1) ** 2, self.num_heads), self.param_dtype)
        index = relative_position_index(window).reshape(-1)
        bias = jnp.asarray(table, jnp.float32)[index].reshape(n, n, self.num_heads)
        bias = bias.transpose(2, 0, 1)[None]  # [1, heads, N, N]
        if shift_mask is not None:
            # Per-window masks: broadcast over the batch so the bias matches the flattened
            # (batch * windows) leading axis that the attention sees.
            bias = bias[None] + jnp.asarray(shift_mask)[None, :, None]  # [1, nW, heads, N, N]
            bias = jnp.broadcast_to(bias, (b,) + bias.shape[1:])
            bias = bias.reshape(b * num_windows, self.num_heads, n, n)
        out = self.attention_fn(q, k, v, bias=bias)
        out = out.reshape(b, num_windows, n, self.num_heads, head_dim)
        return nn.DenseGeneral(width, axis=(-2, -1), name="proj", **dense)(out)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block on a [B, H, W, C] map."""
    num_heads: int
    window_size: int
    shift_size: int = 0
    mlp_ratio: float = 4.0
    layer_norm_eps: float = LAYER_NORM_EPS
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        b, h, w, c = x.shape
        # Stochastic depth off -> no 'drop_path' RNG is needed or drawn, even when training.
        no_drop = deterministic or self.drop_rate == 0.0
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        dense = lambda features, name: nn.Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=trunc_normal, bias_init=nn.initializers.zeros,
            dot_general=self.dot_general)

        y, s = norm("norm1")(x), self.shift_size
        if s:  # cyclic shift up-left; the mask keeps wrapped-around neighbours apart
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        mask = shifted_window_mask(h, self.window_size, s)
        y = WindowAttention(num_heads=self.num_heads, window_size=self.window_size,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            dot_general=self.dot_general, attention_fn=self.attention_fn,
                            name="attn")(window_partition(y, self.window_size), mask)
        y = window_reverse(y, self.window_size, h, w)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + DropPath(name="drop_path1")(y, self.drop_rate, no_drop)

        y = dense(int(self.mlp_ratio * c), "fc1")(norm("norm2")(x))
        y = self.activation(y)
        y = dense(c, "fc2")(y)
        return x + DropPath(name="drop_path2")(y, self.drop_rate, no_drop)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat (4C) -> LayerNorm -> Linear to 2C, no bias."""
    layer_norm_eps: float = LAYER_NORM_EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        # Reference concat order (0::2,0::2), (1::2,0::2), (0::2,1::2), (1::2,1::2): the row
        # offset varies fastest, so the column offset is the outer axis after the transpose.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
        x = x.reshape(b, h // 2, w // 2, 4 * c)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=trunc_normal, dot_general=self.dot_general,
                        name="reduction")(x)


class SwinStage(nn.Module):
    """`depth` blocks, regular and shifted windows alternating, then optional patch merging."""
    depth: int
    num_heads: int
    window_size: int
    shift_size: int
    drop_rates: Tuple[float, ...]
    mlp_ratio: float = 4.0
    layer_norm_eps: float = LAYER_NORM_EPS
    downsample: bool = True
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        block_cls = remat_lib.wrap(SwinBlock, self.remat, static_argnums=(2,))  # deterministic
        for j in range(self.depth):
            x = block_cls(num_heads=self.num_heads, window_size=self.window_size,
                          shift_size=self.shift_size if j % 2 else 0, mlp_ratio=self.mlp_ratio,
                          layer_norm_eps=self.layer_norm_eps, drop_rate=self.drop_rates[j],
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          dot_general=self.dot_general, attention_fn=self.attention_fn,
                          activation=self.activation, name=f"block_{j}")(x, deterministic)
        if self.downsample:
            # torch's default eps, as in both references, whatever layer_norm_eps says.
            x = PatchMerging(layer_norm_eps=LAYER_NORM_EPS, dtype=self.dtype,
                             param_dtype=self.param_dtype, dot_general=self.dot_general,
                             name="downsample")(x)
        return x


class Swin(nn.Module):
    """Swin encoder: images [B, H, W, C] -> final feature map [B, H/stride, W/stride, C_final].

    token_mask [B, L] bool (L = (H/patch)^2, row-major) replaces those patch embeddings by the
    learned mask token after the patch norm (SimMIM; needs use_mask_token=True). Drop-path rates
    rise linearly from 0 to drop_path_rate over all blocks of all stages; with train=True and a
    positive rate the 'drop_path' RNG stream is used.

    Parameters: patch_embed (Conv), patch_norm, [mask_token (1, 1, C)], stage_{i}/block_{j}
    (norm1, attn/{qkv, proj, relative_position_bias_table}, norm2, fc1, fc2),
    stage_{i}/downsample/{norm, reduction} for every stage but the last, norm.
    """
    config: SwinConfig
    drop_path_rate: float = 0.0
    use_mask_token: bool = False
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    @property
    def num_features(self) -> int:
        return self.config.num_features

    @property
    def stride(self) -> int:
        return self.config.stride

    @nn.compact
    def __call__(self, images, *, token_mask=None, train: bool = False):
        cfg = self.config
        check_images(images, cfg.image_size, cfg.channels)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate!r} must be in [0, 1).")
        p, b = cfg.patch_size, images.shape[0]
        # The reference keeps torch's default init for the patch conv (no Conv2d branch in its
        # _init_weights).
        kernel_init = initializers.torch_default_kernel()
        bias_init = initializers.torch_default_bias(p * p * cfg.channels)
        x = nn.Conv(cfg.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=kernel_init, bias_init=bias_init,
                    name="patch_embed")(images.astype(self.dtype))
        # The references' patch norm uses torch's default eps whatever layer_norm_eps says.
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="patch_norm")(x)
        if self.use_mask_token:
            mask_token = self.param("mask_token", trunc_normal, (1, 1, cfg.embed_dim),
                                    self.param_dtype)
        if token_mask is not None:
            if not self.use_mask_token:
                raise ValueError("token_mask was given but use_mask_token=False.")
            if tuple(token_mask.shape) != (b, cfg.num_patches):
                raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}; expected "
                                 f"[batch, num_patches] = [{b}, {cfg.num_patches}].")
            m = token_mask.reshape(b, cfg.grid, cfg.grid, 1).astype(x.dtype)
            x = x * (1 - m) + mask_token.astype(x.dtype) * m

        rates = np.linspace(0.0, self.drop_path_rate, sum(cfg.depths))  # over all blocks
        per_stage = np.split(rates, np.cumsum(cfg.depths)[:-1])
        for stage, depth in enumerate(cfg.depths):
            x = SwinStage(
                depth=depth, num_heads=cfg.num_heads[stage], window_size=cfg.stage_window(stage),
                shift_size=cfg.stage_shift(stage), mlp_ratio=cfg.mlp_ratio,
                layer_norm_eps=cfg.layer_norm_eps,
                drop_rates=tuple(float(r) for r in per_stage[stage]),
                downsample=stage < cfg.num_stages - 1, remat=self.remat, dtype=self.dtype,
                param_dtype=self.param_dtype, dot_general=self.dot_general,
                attention_fn=self.attention_fn, activation=self.activation,
                name=f"stage_{stage}")(x, not train)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="norm")(x)
