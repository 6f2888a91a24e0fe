"""Vision Transformer encoder (pure linen), shared by every ViT-based objective.

One implementation serves MAE (visible-token subset via `ids_keep`), SimMIM and BEiT
(masked patch embeddings replaced by a learned token via `token_mask`). Variants are named
by string like big_vision ("B/16", "L/16", "Ti/4"), with explicit overrides on top.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mim_jax.models import activations, attention, initializers, remat as remat_lib

# width, depth, mlp_dim, num_heads (ViT paper / DeiT sizes).
VARIANTS = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}
_VARIANT_RE = re.compile(r"^(Ti|S|B|L|H)/(\d+)$")

LAYER_NORM_EPS = 1e-6
# Reference init (official MAE): xavier-uniform on every Linear, computed on the 2-D
# (fan_in, fan_out) view even when our kernels keep head axes separate.
xavier_uniform = nn.initializers.xavier_uniform
# Init styles of the references (mim_jax.models.initializers):
#   'xavier': MAE. xavier-uniform kernels, zero biases; the patch conv's bias keeps torch's
#             default (the reference re-initialises only its weight).
#   'beit':   BEiT and SimMIM-ViT. Kernels and tokens from a normal of std 0.02 cut at +-1 std,
#             zero biases (the objective then applies rescale_beit_init).
#   'torch':  PyTorch's default Linear init, kernels and biases U(+-1/sqrt(fan_in)): layers a
#             reference creates after its init has run (BEiT v2's CLS-pretraining head).
INIT_STYLES = ("xavier", "beit", "torch")
beit_trunc_normal = initializers.beit_trunc_normal


def kernel_init(style: str, in_axis=-2, out_axis=-1):
    """The weight initialiser of an init style, for a kernel with these fan axes."""
    if style == "beit":
        return beit_trunc_normal()
    if style == "xavier":
        return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis,
                                                out_axis=out_axis)
    if style == "torch":
        return initializers.torch_default_kernel(out_axis)
    raise ValueError(f"init_style={style!r}; allowed: {list(INIT_STYLES)}.")


def bias_init(style: str, fan_in: int):
    """The bias initialiser of an init style for a layer with `fan_in` inputs."""
    if style == "torch":
        return initializers.torch_default_bias(fan_in)
    return nn.initializers.zeros


def parse_variant(variant: str) -> dict:
    """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
    match = _VARIANT_RE.match(variant) if isinstance(variant, str) else None
    if match is None:
        raise ValueError(
            f"variant={variant!r} is not a ViT variant; allowed: '<size>/<patch>' with size in "
            f"{sorted(VARIANTS)} and an integer patch size, e.g. 'B/16', 'L/16', 'H/14', 'Ti/4'.")
    size, patch = match.groups()
    return dict(VARIANTS[size], patch_size=int(patch))


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos table [grid_h*grid_w, dim], row-major, as in the MAE reference.

    The reference meshgrids (w, h), so the first half of the channels encodes the column
    index and the second half the row index; we keep that order for weight compatibility.
    """
    if dim % 4:
        raise ValueError(f"width={dim} must be divisible by 4 for 2-D sin-cos position embeddings.")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return emb.astype(np.float32)


def check_images(images, image_size: int, channels: int) -> None:
    """Raises ValueError, one line, unless `images` is [batch, image_size, image_size,
    channels] (NHWC): the shape every backbone's config fixes."""
    expected = (image_size, image_size, channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected [batch, "
                         f"{expected[0]}, {expected[1]}, {expected[2]}] (NHWC).")


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample ('drop_path' RNG stream)."""

    @nn.compact
    def __call__(self, x, rate, deterministic: bool):
        if deterministic:
            return x
        keep_prob = 1.0 - rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = jax.random.bernoulli(self.make_rng("drop_path"), keep_prob, shape)
        return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


def relative_position_index(grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
    """BEiT-style index into a relative-position table for all token pairs.

    Patch pairs index (2h-1)(2w-1) relative offsets; with a CLS token three extra entries
    hold CLS->patch, patch->CLS and CLS->CLS, as in the BEiT / SimMIM-ViT reference.
    """
    coords = np.stack(np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[..., 0] += grid_h - 1
    rel[..., 1] += grid_w - 1
    rel[..., 0] *= 2 * grid_w - 1
    patch_index = rel.sum(-1)
    if not cls_token:
        return patch_index.astype(np.int32)
    num_rel = (2 * grid_h - 1) * (2 * grid_w - 1)
    n = grid_h * grid_w + 1
    index = np.zeros((n, n), np.int64)
    index[1:, 1:] = patch_index
    index[0, :] = num_rel
    index[:, 0] = num_rel + 1
    index[0, 0] = num_rel + 2
    return index.astype(np.int32)


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset, added to the attention logits."""
    grid: int
    num_heads: int
    cls_token: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        index = relative_position_index(self.grid, self.grid, self.cls_token)
        size = (2 * self.grid - 1) ** 2 + (3 if self.cls_token else 0)
        # Zero init, as the BEiT reference: training starts from plain dot-product attention.
        table = self.param("table", nn.initializers.zeros, (size, self.num_heads),
                           self.param_dtype)
        return table[index].transpose(2, 0, 1)[None]  # [1, heads, N, N]


class QKVProjection(nn.Module):
    """One fused projection to q, k, v [B, N, 3, heads, head_dim]: a single large matmul is
    faster than three on every backend. Params: kernel (D, 3, heads, head_dim), bias."""
    num_heads: int
    head_dim: int
    use_bias: Any = True  # True, False, or 'qv' (BEiT: q and v biases, k bias fixed at zero)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_style: str = "xavier"
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, x):
        if self.use_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias={self.use_bias!r}; allowed: True, False, 'qv'.")
        shape = (3, self.num_heads, self.head_dim)
        # xavier-uniform on the 2-D (D, 3D) view, as the reference's fused Linear.
        kernel = self.param("kernel", kernel_init(self.init_style, 0, (1, 2, 3)),
                            (x.shape[-1], *shape), self.param_dtype)
        # [B, N, D] x [D, 3, heads, head_dim] -> [B, N, 3, heads, head_dim]
        y = self.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                             (((2,), (0,)), ((), ())))
        if self.use_bias:
            # A Linear's bias follows the style; BEiT's separate q / v biases start at zero.
            init = (bias_init(self.init_style, x.shape[-1]) if self.use_bias is True
                    else nn.initializers.zeros)
            bias = self.param("bias", init, shape, self.param_dtype)
            if self.use_bias == "qv":  # the k slot exists in the layout but is never used
                bias = bias * jnp.asarray([1.0, 0.0, 1.0], bias.dtype)[:, None, None]
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    num_heads: int
    qkv_bias: Any = True  # True, False, or 'qv' (BEiT: q and v biases, k bias fixed at zero)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_style: str = "xavier"
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention

    @nn.compact
    def __call__(self, x, bias=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width={width} is not divisible by num_heads={self.num_heads}.")
        head_dim = width // self.num_heads
        qkv = QKVProjection(num_heads=self.num_heads, head_dim=head_dim, use_bias=self.qkv_bias,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            init_style=self.init_style, dot_general=self.dot_general,
                            name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = self.attention_fn(q, k, v, bias=bias)
        return nn.DenseGeneral(
            features=width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=self.dot_general,
            # DenseGeneral initialises on the flattened 2-D (D, D) view: default fan axes.
            name="proj", kernel_init=kernel_init(self.init_style),
            bias_init=bias_init(self.init_style, width))(out)


class Block(nn.Module):
    """Pre-norm transformer block; `drop_rate` may be a traced scalar (scan over layers)."""
    num_heads: int
    mlp_dim: int
    qkv_bias: Any = True
    layer_scale_init: Optional[float] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # A relative position bias of this block's own (grid size), as SimMIM-ViT/BEiT fine-tuning.
    rel_pos_grid: Optional[int] = None
    rel_pos_cls: bool = True
    # Static switch: with stochastic depth off no 'drop_path' RNG is needed or drawn.
    use_drop_path: bool = False
    init_style: str = "xavier"
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, x, drop_rate=0.0, deterministic: bool = True, attn_bias=None):
        no_drop = deterministic or not self.use_drop_path
        if self.rel_pos_grid is not None:
            own = RelativePositionBias(grid=self.rel_pos_grid, num_heads=self.num_heads,
                                       cls_token=self.rel_pos_cls, param_dtype=self.param_dtype,
                                       name="rel_pos_bias")()
            attn_bias = own if attn_bias is None else attn_bias + own
        width = x.shape[-1]
        norm = lambda name: nn.LayerNorm(
            epsilon=LAYER_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        dense = lambda features, fan_in, name: nn.Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=kernel_init(self.init_style),
            bias_init=bias_init(self.init_style, fan_in), dot_general=self.dot_general)

        y = Attention(num_heads=self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, init_style=self.init_style,
                      dot_general=self.dot_general, attention_fn=self.attention_fn,
                      name="attn")(norm("norm1")(x), attn_bias)
        y = self._scale(y, "ls1", width)
        x = x + DropPath(name="drop_path1")(y, drop_rate, no_drop)

        y = dense(self.mlp_dim, width, "fc1")(norm("norm2")(x))
        y = self.activation(y)
        y = self._scale(dense(width, self.mlp_dim, "fc2")(y), "ls2", width)
        return x + DropPath(name="drop_path2")(y, drop_rate, no_drop)

    def _scale(self, y, name, width):
        if self.layer_scale_init is None:
            return y
        gamma = self.param(name, nn.initializers.constant(self.layer_scale_init), (width,),
                           self.param_dtype)
        return y * gamma.astype(y.dtype)


class Transformer(nn.Module):
    """A stack of `depth` blocks with optional remat and scan; used by encoders and decoders.

    Drop-path rates rise linearly from 0 to `drop_path_rate` over depth (the reference rule).
    With `scan=True` the block parameters are stacked on a leading depth axis under 'blocks'
    (faster compile for deep models); otherwise they are 'block_0' ... 'block_{depth-1}'.
    """
    depth: int
    num_heads: int
    mlp_dim: int
    drop_path_rate: float = 0.0
    qkv_bias: Any = True
    layer_scale_init: Optional[float] = None
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    rel_pos_grid: Optional[int] = None  # per-block relative position bias
    rel_pos_cls: bool = True
    init_style: str = "xavier"
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    # Drop-path rates follow linspace(0, drop_path_rate, rate_depth)[rate_offset:][:depth]
    # (None: depth): a head stacked on top of an encoder continues its rule (BEiT v2's CLS head).
    rate_depth: Optional[int] = None
    rate_offset: int = 0

    @nn.compact
    def __call__(self, x, deterministic: bool = True, attn_bias=None, capture: Optional[int] = None):
        """Returns the last block's tokens or, with `capture`=k, (them, block k's output)."""
        n = self.rate_depth or self.depth
        rates = np.linspace(0.0, self.drop_path_rate, n) if n > 1 else np.zeros(1)
        rates = rates[self.rate_offset:self.rate_offset + self.depth]
        if capture is not None and not 1 <= capture <= self.depth:
            raise ValueError(f"capture={capture} must be a block number in [1, {self.depth}].")
        block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, qkv_bias=self.qkv_bias,
                            layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                            param_dtype=self.param_dtype, use_drop_path=self.drop_path_rate > 0,
                            rel_pos_grid=self.rel_pos_grid, rel_pos_cls=self.rel_pos_cls,
                            init_style=self.init_style, dot_general=self.dot_general,
                            attention_fn=self.attention_fn, activation=self.activation)
        block_cls = remat_lib.wrap(Block, self.remat, static_argnums=(3,))  # deterministic
        if self.scan:
            def body(module, carry, rate):
                out = module(carry, rate, deterministic, attn_bias)
                return out, (out if capture is not None else None)

            scanned = nn.scan(body, variable_axes={"params": 0},
                              split_rngs={"params": True, "drop_path": True},
                              length=self.depth)
            x, states = scanned(block_cls(**block_kwargs, name="blocks"), x,
                                jnp.asarray(rates, jnp.float32))
            return x if capture is None else (x, states[capture - 1])
        captured = None
        for i in range(self.depth):
            x = block_cls(**block_kwargs, name=f"block_{i}")(x, float(rates[i]), deterministic,
                                                             attn_bias)
            if i + 1 == capture:
                captured = x
        return x if capture is None else (x, captured)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Resolved ViT hyper-parameters (variant string + overrides)."""
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


def resolve_vit_config(variant: str, image_size: int, channels: int = 3, *, patch_size=None,
                       width=None, depth=None, num_heads=None, mlp_dim=None) -> ViTConfig:
    """Variant string plus explicit overrides -> ViTConfig, validated with named errors."""
    base = parse_variant(variant)
    overrides = dict(patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
                     mlp_dim=mlp_dim)
    base.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ViTConfig(image_size=image_size, channels=channels, **base)
    for name in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "channels"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"image_size={cfg.image_size} is not divisible by patch_size={cfg.patch_size}; "
            f"allowed image sizes are multiples of {cfg.patch_size}.")
    if cfg.width % cfg.num_heads:
        raise ValueError(f"width={cfg.width} is not divisible by num_heads={cfg.num_heads}.")
    return cfg


class ViT(nn.Module):
    """ViT encoder over patch tokens (+ optional CLS), ending in a LayerNorm.

    Call with images [B, H, W, C] and at most one of:
      ids_keep   [B, K] int: keep only these patch tokens (MAE); positions are added first.
      token_mask [B, L] bool: replace these patch embeddings by the learned mask token
                 (SimMIM/BEiT; needs use_mask_token=True).
    Returns tokens [B, (1 if cls) + K or L, width].
    """
    config: ViTConfig
    cls_token: bool = True
    pos_embed: str = "sincos"  # 'sincos' (fixed, MAE) | 'learned' | 'none'
    use_mask_token: bool = False
    qkv_bias: Any = True
    layer_scale_init: Optional[float] = None
    # Relative position bias: 'none', 'shared' (one for all blocks, BEiT pretraining /
    # SimMIM-ViT) or 'per_layer'.
    rel_pos_bias: str = "none"
    # False: return the last block's tokens un-normalised, for classifiers that pool first and
    # normalise after (fc_norm), as the references' global-pool fine-tuning does.
    final_norm: bool = True
    drop_path_rate: float = 0.0
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # 'xavier' (MAE), 'beit' (BEiT, SimMIM; see also rescale_beit_init) or 'torch': INIT_STYLES.
    init_style: str = "xavier"
    dot_general: Callable = lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    def setup(self):
        cfg = self.config
        if self.init_style not in INIT_STYLES:
            raise ValueError(f"init_style={self.init_style!r}; allowed: {list(INIT_STYLES)}.")
        if self.pos_embed not in ("sincos", "learned", "none"):
            raise ValueError(f"pos_embed={self.pos_embed!r}; allowed: 'sincos', 'learned', 'none'.")
        if self.rel_pos_bias not in ("none", "shared", "per_layer"):
            raise ValueError(f"rel_pos_bias={self.rel_pos_bias!r}; allowed: 'none', 'shared', "
                             "'per_layer'.")
        if self.rel_pos_bias == "shared":
            self.shared_rel_pos = RelativePositionBias(
                grid=cfg.grid, num_heads=cfg.num_heads, cls_token=self.cls_token,
                param_dtype=self.param_dtype, name="rel_pos_bias")
        # The reference initialises the patch conv as a flattened Linear (fan_in p*p*C, fan_out D).
        patch_fan_in = cfg.patch_size * cfg.patch_size * cfg.channels
        self.patch_embed = nn.Conv(
            cfg.width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed",
            kernel_init=kernel_init(self.init_style, (0, 1, 2), 3),
            bias_init=(initializers.torch_default_bias(patch_fan_in)
                       if self.init_style in ("xavier", "torch") else nn.initializers.zeros))
        token_init = (beit_trunc_normal() if self.init_style == "beit"
                      else nn.initializers.normal(0.02))
        if self.cls_token:
            self.cls = self.param("cls_token", token_init, (1, 1, cfg.width), self.param_dtype)
        if self.use_mask_token:
            self.mask_token = self.param("mask_token", token_init, (1, 1, cfg.width),
                                         self.param_dtype)
        if self.pos_embed == "learned":
            self.pos = self.param("pos_embed", token_init,
                                  (1, int(self.cls_token) + cfg.num_patches, cfg.width),
                                  self.param_dtype)
        elif self.pos_embed == "sincos":
            table = sincos_2d(cfg.width, cfg.grid, cfg.grid)
            if self.cls_token:  # the CLS position is all zeros in the reference
                table = np.concatenate([np.zeros((1, cfg.width), np.float32), table])
            self.pos = jnp.asarray(table)[None]
        self.blocks = Transformer(
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
            drop_path_rate=self.drop_path_rate, qkv_bias=self.qkv_bias,
            layer_scale_init=self.layer_scale_init, remat=self.remat, scan=self.scan,
            dtype=self.dtype, param_dtype=self.param_dtype,
            rel_pos_grid=cfg.grid if self.rel_pos_bias == "per_layer" else None,
            rel_pos_cls=self.cls_token, init_style=self.init_style, dot_general=self.dot_general,
            attention_fn=self.attention_fn, activation=self.activation, name="transformer")
        self.norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="norm")

    def embed(self, images, token_mask=None):
        """Patch embedding (+ mask token) + positions -> [B, L, D] patch tokens (no CLS)."""
        cfg = self.config
        check_images(images, cfg.image_size, cfg.channels)
        x = self.patch_embed(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, cfg.width)
        if token_mask is not None:
            if not self.use_mask_token:
                raise ValueError("token_mask was given but use_mask_token=False.")
            w = token_mask[..., None].astype(x.dtype)
            x = x * (1 - w) + self.mask_token.astype(x.dtype) * w
        if self.pos_embed != "none":
            x = x + self.pos[:, int(self.cls_token):].astype(x.dtype)
        return x

    def relative_position_bias(self):
        """The shared relative position bias [1, heads, N, N], or None (for heads that run
        extra blocks over this encoder's tokens, like BEiT v2's CLS head)."""
        return self.shared_rel_pos() if self.rel_pos_bias == "shared" else None

    def __call__(self, images, *, ids_keep=None, token_mask=None, train: bool = False,
                 capture: Optional[int] = None):
        """Tokens [B, (1+)L, D]. With `capture`=k: (last block's tokens, block k's tokens), both
        before the final norm (BEiT v2's CLS head; apply `self.norm` where needed)."""
        if ids_keep is not None and token_mask is not None:
            raise ValueError("pass ids_keep (drop tokens) or token_mask (replace tokens), not both.")
        if ids_keep is not None and self.rel_pos_bias != "none":
            raise ValueError("a relative position bias needs every patch token; ids_keep drops "
                             "tokens (MAE): use rel_pos_bias='none'.")
        attn_bias = self.shared_rel_pos() if self.rel_pos_bias == "shared" else None
        x = self.embed(images, token_mask)
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
        if self.cls_token:
            cls = self.cls.astype(x.dtype)
            if self.pos_embed != "none":
                cls = cls + self.pos[:, :1].astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        x = self.blocks(x, deterministic=not train, attn_bias=attn_bias, capture=capture)
        if capture is not None:
            return x
        return self.norm(x) if self.final_norm else x


def stack_block_params(params: dict, depth: int, prefix: str = "block_") -> dict:
    """Unscanned block params ('block_i') -> the stacked 'blocks' layout used with scan=True."""
    blocks = [params[f"{prefix}{i}"] for i in range(depth)]
    rest = {k: v for k, v in params.items() if not k.startswith(prefix)}
    rest["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return rest


def unstack_block_params(params: dict, prefix: str = "block_") -> dict:
    """Inverse of stack_block_params."""
    stacked = params["blocks"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"{prefix}{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return out



def rescale_beit_init(blocks: dict, first_layer: int = 1) -> dict:
    """BEiT's init fix-up: the attention output projection and fc2 kernels of layer i (counted
    from `first_layer`) divided by sqrt(2 i), so the residual stream's variance does not grow
    with depth. `blocks` is a Transformer's params ('block_k' or scanned 'blocks')."""
    def scaled(block, factor):
        col = lambda x: x * jnp.asarray(factor, x.dtype).reshape(
            np.shape(factor) + (1,) * (x.ndim - np.ndim(factor)))
        attn = dict(block["attn"], proj=dict(block["attn"]["proj"],
                                             kernel=col(block["attn"]["proj"]["kernel"])))
        return dict(block, attn=attn, fc2=dict(block["fc2"], kernel=col(block["fc2"]["kernel"])))

    if "blocks" in blocks:  # scanned: one factor per entry of the leading depth axis
        depth = blocks["blocks"]["fc2"]["kernel"].shape[0]
        layers = np.arange(first_layer, first_layer + depth)
        return dict(blocks, blocks=scaled(blocks["blocks"], 1.0 / np.sqrt(2.0 * layers)))
    return {k: (scaled(v, 1.0 / np.sqrt(2.0 * (first_layer + int(k.split("_")[1]))))
                if k.startswith("block_") else v) for k, v in blocks.items()}
