"""ResNet (He et al. 2016) in linen, in timm's layout, with SparK's sparse (masked) mode.

Stem conv 7x7/2 + BN + ReLU + max-pool 3x3/2, then four stages of Bottleneck blocks (1x1 ->
3x3 -> 1x1, expansion 4, stride on the 3x3 conv as timm / torchvision "v1.5"), a 1x1 conv + BN
shortcut where the shape changes. NHWC throughout. Variants are depth strings ('50', '101',
'152', '200') with explicit overrides (depths, stem and stage widths) for small test models.

`__call__(images, active=None, train=False)` returns the four stage outputs (strides 4, 8, 16,
32), as SparK's encoder does. `stem_stride` 2 drops the stem's max-pool and 1 also its conv
stride (total stride 16 or 8 instead of 32: a useful mask grid on 32 px images). With `active`
(bool [B, H/stride, W/stride], True = visible) the network
is SparK's sparse encoder: the input and every pooling / BatchNorm output are zero at masked
positions and BatchNorm statistics come from visible positions only (sparse.MaskedBatchNorm),
so masked pixels can never change a visible output. Every conv here is followed by a masked
BatchNorm, which is what zeroes the conv's masked outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mim_jax.models import remat as remat_lib, sparse
from mim_jax.models.vit import DropPath

VARIANTS = {"50": (3, 4, 6, 3), "101": (3, 4, 23, 3), "152": (3, 8, 36, 3),
            "200": (3, 24, 36, 3)}
EXPANSION = 4
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # flax convention; torch's momentum 0.1
STRIDE = 32  # the default total stride (stem_stride 4)
STEM_STRIDES = (1, 2, 4)
# timm's init: kaiming-normal (fan_out, ReLU gain) convs; BN scale 1, bias 0.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _positive_ints(name: str, value, length: Optional[int] = None) -> Tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    bad = any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0
              for v in values)
    if bad or (length is not None and len(values) != length):
        what = f"{length} positive ints (one per stage)" if length else "a positive int"
        raise ValueError(f"{name}={value!r} must be {what}.")
    return tuple(int(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Resolved ResNet hyper-parameters; `widths` are the bottleneck widths (timm's
    `channels`), each stage outputting EXPANSION times as many channels."""
    depths: Tuple[int, ...]
    stem_width: int = 64
    widths: Tuple[int, ...] = (64, 128, 256, 512)
    channels: int = 3
    zero_init_last: bool = True  # timm: each block's last BN scale starts at 0
    # 4: conv 7x7/2 + max-pool 3x3/2 (timm); 2: no max-pool; 1: conv stride 1, no max-pool.
    stem_stride: int = 4

    def __post_init__(self):
        object.__setattr__(self, "depths", _positive_ints("depths", self.depths, 4))
        object.__setattr__(self, "widths", _positive_ints("widths", self.widths, 4))
        _positive_ints("stem_width", self.stem_width)
        _positive_ints("channels", self.channels)
        if isinstance(self.stem_stride, bool) or self.stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride={self.stem_stride!r}; allowed: {list(STEM_STRIDES)}.")

    @property
    def stride(self) -> int:
        """Total stride: of the last stage's map (three stride-2 stages after the stem)."""
        return 8 * self.stem_stride

    @property
    def stage_widths(self) -> Tuple[int, ...]:
        return tuple(EXPANSION * w for w in self.widths)


def resolve_resnet_config(variant: str, channels: int = 3, *, depths=None, stem_width=None,
                          widths=None, stem_stride=None) -> ResNetConfig:
    """Variant string plus explicit overrides -> ResNetConfig (validated with named errors)."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not a ResNet variant; allowed: "
                         f"{list(VARIANTS)}.")
    base = dict(depths=VARIANTS[variant], stem_width=64, widths=(64, 128, 256, 512),
                stem_stride=4)
    overrides = dict(depths=depths, stem_width=stem_width, widths=widths,
                     stem_stride=stem_stride)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ResNetConfig(channels=channels, **base)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN, + shortcut, ReLU."""
    width: int
    stride: int = 1
    downsample: bool = False
    drop_rate: float = 0.0
    zero_init_last: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, active=None, train: bool = False):
        conv = lambda features, k, stride, name: nn.Conv(
            features, (k, k), strides=(stride, stride), padding=[(k // 2, k // 2)] * 2,
            use_bias=False, kernel_init=conv_init, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)
        bn = lambda name, zero=False: sparse.MaskedBatchNorm(
            momentum=BN_MOMENTUM, epsilon=BN_EPS,
            scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        y = nn.relu(bn("bn1")(conv(self.width, 1, 1, "conv1")(x), active, train=train))
        y = nn.relu(bn("bn2")(conv(self.width, 3, self.stride, "conv2")(y), active, train=train))
        y = bn("bn3", self.zero_init_last)(conv(EXPANSION * self.width, 1, 1, "conv3")(y),
                                           active, train=train)
        y = DropPath(name="drop_path")(y, self.drop_rate, not train or self.drop_rate == 0.0)
        if self.downsample:
            x = conv(EXPANSION * self.width, 1, self.stride, "downsample_conv")(x)
            x = bn("downsample_bn")(x, active, train=train)
        return nn.relu(y + x)


class ResNetStage(nn.Module):
    """`depth` Bottlenecks; the first one strides and projects the shortcut when needed."""
    depth: int
    width: int
    stride: int
    in_width: int
    drop_rates: Tuple[float, ...]
    zero_init_last: bool = True
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, active=None, train: bool = False):
        block_cls = remat_lib.wrap(Bottleneck, self.remat, static_argnums=(3,))  # train
        for j in range(self.depth):
            stride = self.stride if j == 0 else 1
            project = j == 0 and (stride != 1 or self.in_width != EXPANSION * self.width)
            x = block_cls(width=self.width, stride=stride, downsample=project,
                          drop_rate=self.drop_rates[j], zero_init_last=self.zero_init_last,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"block_{j}")(x, active, train)
        return x


class ResNet(nn.Module):
    """ResNet encoder: images [B, H, W, C] (H, W multiples of 32) -> [f4, f8, f16, f32]
    (with stem_stride s < 4: multiples of 8s -> [f_s, f_2s, f_4s, f_8s]).

    active: None (dense) or bool [B, H/stride, W/stride], True = visible (SparK's sparse mode).
    last_stage_only=True returns only the last map [B, H/stride, W/stride, stage_widths[-1]], that
    classifier.Classifier pools. Drop-path rates rise linearly from 0 to drop_path_rate over
    all blocks (timm's rule) and use the 'drop_path' RNG stream when training.
    BatchNorm statistics live in the 'batch_stats' collection (mutable when train=True).

    Parameters: stem_conv, stem_bn, stage_{i}/block_{j}/{conv1, bn1, conv2, bn2, conv3, bn3,
    [downsample_conv, downsample_bn]}.
    """
    config: ResNetConfig
    drop_path_rate: float = 0.0
    last_stage_only: bool = False
    remat: Any = False  # False or a policy name: see mim_jax.models.remat
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def stage_widths(self) -> Tuple[int, ...]:
        return self.config.stage_widths

    @property
    def num_features(self) -> int:
        return self.config.stage_widths[-1]

    @property
    def stride(self) -> int:
        return self.config.stride

    @nn.compact
    def __call__(self, images, *, active=None, train: bool = False):
        cfg = self.config
        sparse.check_inputs(images, cfg.channels, self.stride, active, self.drop_path_rate)
        x = sparse.apply_mask(images.astype(self.dtype), active)
        conv_stride = 1 if cfg.stem_stride == 1 else 2
        x = nn.Conv(cfg.stem_width, (7, 7), strides=(conv_stride, conv_stride),
                    padding=[(3, 3), (3, 3)],
                    use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="stem_conv")(x)
        x = sparse.MaskedBatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="stem_bn")(
            x, active, train=train)
        x = nn.relu(x)
        if cfg.stem_stride == 4:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        x = sparse.apply_mask(x, active)

        rates, features = sparse.stage_drop_rates(self.drop_path_rate, cfg.depths), []
        in_width = cfg.stem_width
        for stage, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            x = ResNetStage(depth=depth, width=width, stride=2 if stage else 1,
                            in_width=in_width, drop_rates=rates[stage],
                            zero_init_last=cfg.zero_init_last, remat=self.remat,
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"stage_{stage}")(x, active, train)
            in_width = EXPANSION * width
            features.append(x)
        return features[-1] if self.last_stage_only else features
