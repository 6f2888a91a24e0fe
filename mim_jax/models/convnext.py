"""ConvNeXt (Liu et al. 2022) in linen, in timm's layout, with SparK's sparse (masked) mode.

Stem conv 4x4/4 + LayerNorm; stages 1-3 start with LayerNorm + conv 2x2/2; blocks are
depthwise conv 7x7 -> LayerNorm -> Linear 4x -> GELU (exact) -> Linear -> layer scale (init
1e-6) -> drop path, added to the input. LayerNorm eps 1e-6 everywhere. NHWC throughout.
Variants 'T', 'S', 'B', 'L' with explicit overrides (depths, dims) for small test models.

`__call__(images, active=None, train=False)` returns the four stage outputs (strides 4, 8, 16,
32), as SparK's encoder does (no final norm: timm applies it in the head, after pooling). With
`active` (bool [B, H/32, W/32], True = visible) it is SparK's sparse ConvNeXt: the input, every
conv output, every LayerNorm output and every block's residual branch are zero at masked
positions (inside a block, where everything after the depthwise conv is per position, only the
branch's output needs masking). LayerNorm normalises each position over channels, so it needs no masked statistics,
only re-masking (it would turn a zero vector into its bias). The MLP's bias makes masked
positions non-zero inside a block; the branch is masked before it is added, as the reference
does, so masked positions stay exactly zero between layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from mim_jax.models import activations, remat as remat_lib, sparse
from mim_jax.models.resnet import _positive_ints
from mim_jax.models.swin import trunc_normal
from mim_jax.models.vit import DropPath

VARIANTS = {
    "T": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "S": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "B": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "L": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}
LAYER_NORM_EPS = 1e-6
LAYER_SCALE_INIT = 1e-6
STRIDE = 32


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """Resolved ConvNeXt hyper-parameters; `dims` are the four stage widths."""
    depths: Tuple[int, ...]
    dims: Tuple[int, ...]
    channels: int = 3
    layer_scale_init: float = LAYER_SCALE_INIT

    def __post_init__(self):
        object.__setattr__(self, "depths", _positive_ints("depths", self.depths, 4))
        object.__setattr__(self, "dims", _positive_ints("dims", self.dims, 4))
        _positive_ints("channels", self.channels)
        if not self.layer_scale_init > 0:
            raise ValueError(f"layer_scale_init={self.layer_scale_init!r} must be positive.")

    @property
    def stage_widths(self) -> Tuple[int, ...]:
        return self.dims


def resolve_convnext_config(variant: str, channels: int = 3, *, depths=None,
                            dims=None) -> ConvNeXtConfig:
    """Variant string plus explicit overrides -> ConvNeXtConfig (validated with named errors)."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not a ConvNeXt variant; allowed: "
                         f"{list(VARIANTS)}.")
    base = dict(VARIANTS[variant])
    base.update({k: v for k, v in dict(depths=depths, dims=dims).items() if v is not None})
    return ConvNeXtConfig(channels=channels, **base)


def _layer_norm(dtype, param_dtype, name):
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


class ConvNeXtBlock(nn.Module):
    dim: int
    drop_rate: float = 0.0
    layer_scale_init: float = LAYER_SCALE_INIT
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, x, active=None, train: bool = False, positions=None):
        """positions: None, or int32 [B, n] of the visible positions (sparse.visible_positions):
        everything after the depthwise conv is per position, so it then runs on the n visible
        rows only and is scattered back into zeros - the masked branch, without the work."""
        dense = lambda features, name: nn.Dense(
            features, kernel_init=trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=self.dot_general, name=name)
        y = nn.Conv(self.dim, (7, 7), padding=[(3, 3), (3, 3)], feature_group_count=self.dim,
                    kernel_init=trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="dwconv")(x)
        if positions is not None:
            height, width = y.shape[1], y.shape[2]
            y = sparse.gather_rows(y, positions)
        # Only the depthwise conv mixes positions and its input is masked; everything up to
        # the branch's final mask is per position, so one mask there is the reference's three.
        y = _layer_norm(self.dtype, self.param_dtype, "norm")(y)
        y = dense(self.dim, "fc2")(self.activation(dense(4 * self.dim, "fc1")(y)))
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init),
                           (self.dim,), self.param_dtype)
        y = y * jnp.asarray(gamma, y.dtype)
        if positions is not None:
            y = sparse.scatter_rows(y, positions, height, width)
        else:
            y = sparse.apply_mask(y, active)
        return x + DropPath(name="drop_path")(y, self.drop_rate,
                                              not train or self.drop_rate == 0.0)


class ConvNeXtStage(nn.Module):
    """[LayerNorm + conv 2x2/2 downsample] then `depth` blocks."""
    depth: int
    dim: int
    drop_rates: Tuple[float, ...]
    downsample: bool = True
    layer_scale_init: float = LAYER_SCALE_INIT
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, x, active=None, train: bool = False, visible_cells=None):
        if self.downsample:
            x = _layer_norm(self.dtype, self.param_dtype, "downsample_norm")(x)
            x = nn.Conv(self.dim, (2, 2), strides=(2, 2), padding="VALID",
                        kernel_init=trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="downsample_conv")(sparse.apply_mask(x, active))
            x = sparse.apply_mask(x, active)
        positions = None
        if active is not None and visible_cells:  # one gather index for the whole stage
            positions = sparse.visible_positions(active, x.shape[1], x.shape[2], visible_cells)
        block_cls = remat_lib.wrap(ConvNeXtBlock, self.remat, static_argnums=(3,))  # train
        for j in range(self.depth):
            x = block_cls(dim=self.dim, drop_rate=self.drop_rates[j],
                          layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, dot_general=self.dot_general,
                          activation=self.activation, name=f"block_{j}")(
                              x, active, train, positions)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt encoder: images [B, H, W, C] (H, W multiples of 32) -> [f4, f8, f16, f32].

    active: None (dense) or bool [B, H/32, W/32], True = visible (SparK's sparse mode).
    last_stage_only=True returns only f32, the map that classifier.Classifier pools (timm's
    head is pool -> LayerNorm eps 1e-6 -> Linear: Classifier with fc_norm=True). Drop-path
    rates rise linearly from 0 to drop_path_rate over all blocks ('drop_path' RNG stream).

    Parameters: stem_conv, stem_norm, stage_{i}/[downsample_norm, downsample_conv] (i > 0),
    stage_{i}/block_{j}/{dwconv, norm, fc1, fc2, gamma}.
    """
    config: ConvNeXtConfig
    drop_path_rate: float = 0.0
    last_stage_only: bool = False
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general
    activation: Callable = activations.gelu

    @property
    def stage_widths(self) -> Tuple[int, ...]:
        return self.config.stage_widths

    @property
    def num_features(self) -> int:
        return self.config.dims[-1]

    @property
    def stride(self) -> int:
        return STRIDE

    # SparK passes visible_cells: the blocks' per-position layers then skip masked positions.
    gathers_visible = True

    @nn.compact
    def __call__(self, images, *, active=None, train: bool = False,
                 visible_cells: Optional[int] = None):
        """visible_cells (with `active`): every sample's count of visible cells, the same for
        all (SparK's mask); the blocks' LayerNorm / MLP / layer scale then run on the visible
        positions only (sparse.visible_positions), with the same result as the dense masked
        branch and about 1 - visible fraction less of their work. None: dense masked branch."""
        cfg = self.config
        sparse.check_inputs(images, cfg.channels, STRIDE, active, self.drop_path_rate)
        x = sparse.apply_mask(images.astype(self.dtype), active)
        x = nn.Conv(cfg.dims[0], (4, 4), strides=(4, 4), padding="VALID",
                    kernel_init=trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="stem_conv")(x)
        x = sparse.apply_mask(_layer_norm(self.dtype, self.param_dtype, "stem_norm")(x), active)

        per_stage = sparse.stage_drop_rates(self.drop_path_rate, cfg.depths)
        features = []
        for stage, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            x = ConvNeXtStage(depth=depth, dim=dim,
                              drop_rates=per_stage[stage],
                              downsample=stage > 0, layer_scale_init=cfg.layer_scale_init,
                              remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
                              dot_general=self.dot_general, activation=self.activation,
                              name=f"stage_{stage}")(x, active, train, visible_cells)
            features.append(x)
        return features[-1] if self.last_stage_only else features
