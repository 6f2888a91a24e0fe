"""SparK (Tian et al., ICLR 2023): BERT-style masked pretraining of an unmodified ConvNet.

The image, zeroed on masked cells of the backbone's deepest grid, goes through the sparse
(masked) ConvNet; at each of its scales, from the deepest, the features are normalised over the
visible positions, the masked positions are filled with that scale's learned mask token and
projected to the decoder's width ("densify"); a UNet-like light decoder fuses them by addition
while upsampling to full resolution. The loss is the mean over masked cells of the per-cell MSE
against per-cell normalised pixels. BatchNorm statistics (encoder, densify, decoder) are the
objective's model_state.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import masking, models
from mim_jax.models import initializers, sparse
from mim_jax.objectives.base import Objective, make_rngs
from mim_jax.objectives.mae import patch_stats, patchify, unpatchify

BACKBONES = ("convnext", "resnet")
DENSIFY_NORMS = ("bn", "ln", "none")
# PyTorch BatchNorm defaults (momentum 0.1 there is 0.9 here), as the reference's BN layers;
# sparse.MaskedBatchNorm also updates the running variance with the unbiased one, as torch.
_BN = dict(momentum=0.9, epsilon=1e-5)


class Densify(nn.Module):
    """One scale: norm over visible positions, mask token at masked ones, projection."""
    out_width: int
    kernel: int  # 0: identity projection (the reference's deepest scale when widths match)
    norm: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats, active, *, train: bool):
        """feats [B, h, w, C]; active [B, h', w'] bool (True = visible), h a multiple of h'."""
        width = feats.shape[-1]
        if self.norm == "bn":  # statistics over visible positions only (SparseBatchNorm2d)
            feats = sparse.MaskedBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                           name="norm", **_BN)(feats, active, train=train)
        elif self.norm == "ln":  # per position, so the masked positions do not matter
            feats = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="norm")(feats)
        # trunc_normal(std .02, a=-.02, b=.02), as the reference's mask tokens.
        token = self.param("mask_token", initializers.beit_trunc_normal(), (width,),
                           self.param_dtype)
        visible = sparse.upsample_mask(active, feats.shape[1], feats.shape[2])
        feats = jnp.where(visible, feats, token.astype(feats.dtype))
        if not self.kernel:
            return feats
        k = self.kernel
        # PyTorch's default Conv2d init: the reference never re-initialises these projections.
        kernel_init = initializers.torch_default_kernel()
        bias_init = initializers.torch_default_bias(k * k * width)
        return nn.Conv(self.out_width, (k, k), padding=k // 2, dtype=self.dtype,
                       param_dtype=self.param_dtype, kernel_init=kernel_init,
                       bias_init=bias_init, name="proj")(feats)


# Which tap of a 4x4, stride-2, padding-1 transposed conv (PyTorch's) feeds output phase r
# (0: even rows, 1: odd) from input offset t of a 2-wide window: even outputs 2m read inputs
# m-1 (tap 3) and m (tap 1), odd outputs 2m+1 read m (tap 2) and m+1 (tap 0).
_PHASE_TAPS = np.array([[3, 1], [2, 0]])


class Upsample2x(nn.Module):
    """PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1) as one dense 2x2 conv with 4x
    the output channels (one group per output phase) and a depth-to-space: the same function
    and the same parameters as flax's nn.ConvTranspose(transpose_kernel=True, padding 2)
    ('kernel' [4, 4, out, in], 'bias' [out]), without the zero-dilated input XLA's transposed
    conv computes on (4x the multiply-adds, and a slow path on the CPU)."""
    features: int
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        out = self.features
        kernel = self.param("kernel", self.kernel_init, (4, 4, out, c), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (out,), self.param_dtype)
        taps = _PHASE_TAPS
        # [row phase, row tap, col phase, col tap, out, in] -> HWIO with (phase, out) channels
        k = kernel[taps[:, :, None, None], taps[None, None, :, :]]
        k = k.transpose(1, 3, 5, 0, 2, 4).reshape(2, 2, c, 4 * out).astype(self.dtype)
        z = jax.lax.conv_general_dilated(
            jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0))), k, (1, 1),
            "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        z = z.reshape(b, h + 1, w + 1, 2, 2, out)
        # Odd phases read a window one step further on: rows / columns 1.. of z.
        phase = lambda r, q: z[:, r:r + h, q:q + w, r, q]
        y = jnp.stack([jnp.stack([phase(0, 0), phase(0, 1)], axis=3),
                       jnp.stack([phase(1, 0), phase(1, 1)], axis=3)], axis=2)
        return y.reshape(b, 2 * h, 2 * w, out) + bias.astype(self.dtype)


class UNetBlock(nn.Module):
    """2x upsampling (ConvTranspose 4x4, stride 2, PyTorch padding 1), then
    conv3x3-BN-ReLU6-conv3x3-BN (no activation after the second BN, as the reference)."""
    out_width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        width = x.shape[-1]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # kaiming_normal(fan_out, relu), as the reference's ConvTranspose2d.
        x = Upsample2x(features=width, name="up", **common)(x)
        conv = lambda features, name: nn.Conv(
            features, (3, 3), padding=1, use_bias=False, name=name,
            kernel_init=nn.initializers.normal(0.02), **common)
        norm = lambda name, y: sparse.MaskedBatchNorm(name=name, **_BN, **common)(
            y, train=train)
        x = jax.nn.relu6(norm("bn1", conv(width, "conv1")(x)))
        return norm("bn2", conv(self.out_width, "conv2")(x))


class LightDecoder(nn.Module):
    """Widths width, width/2, ...: one UNetBlock per 2x upsampling to full resolution; the
    densified scale i (0 = deepest) is added to the input of block i, or after the last block
    for a full-resolution scale (backbones of total stride < 32)."""
    width: int
    num_blocks: int  # log2(total stride)
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, to_dec: Sequence[jax.Array], *, train: bool):
        x = 0.0
        for i in range(self.num_blocks):
            if i < len(to_dec):
                x = x + to_dec[i]
            x = UNetBlock(out_width=self.width // 2 ** (i + 1), dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"block_{i}")(x, train=train)
        if len(to_dec) > self.num_blocks:
            x = x + to_dec[self.num_blocks]
        return nn.Conv(self.channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=nn.initializers.normal(0.02), name="proj")(x)


class SparK(nn.Module):
    encoder: Any  # backbone(images, active=[B, h, w] bool, train=) -> maps, shallow to deep
    levels: Tuple[Tuple[int, int], ...]  # (stride, width) of each map, shallow to deep
    decoder_width: int
    densify_norm: str
    channels: int
    # Visible cells per sample (the mask keeps a fixed count): a backbone that can
    # (gathers_visible, ConvNeXt) runs its per-position layers on the visible positions only.
    visible_cells: Optional[int] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def cell(self) -> int:
        return self.levels[-1][0]

    @nn.compact
    def __call__(self, images, active, *, train: bool = False):
        """images [B, H, W, C], active [B, H/cell, W/cell] bool (True = visible) ->
        the decoder's output [B, H, W, C] (per-cell normalised pixels)."""
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        masked = sparse.apply_mask(images, active)
        extra = {}
        if self.visible_cells and getattr(self.encoder, "gathers_visible", False):
            extra["visible_cells"] = self.visible_cells
        feats = list(self.encoder(masked, active=active, train=train, **extra))[::-1]
        to_dec, width = [], self.decoder_width
        for i, f in enumerate(feats):
            deepest_identity = i == 0 and f.shape[-1] == width
            kernel = 0 if deepest_identity else (1 if i == 0 else 3)
            to_dec.append(Densify(out_width=width, kernel=kernel, norm=self.densify_norm,
                                  name=f"densify_{i}", **common)(f, active, train=train))
            width //= 2
        return LightDecoder(width=self.decoder_width, num_blocks=int(math.log2(self.cell)),
                            channels=self.channels, name="decoder", **common)(to_dec,
                                                                               train=train)


def masked_cell_loss(rec: jax.Array, images: jax.Array, active: jax.Array):
    """The reference loss: per cell (the deepest grid's, p x p pixels), normalise the pixels by
    their mean and sqrt(unbiased variance + 1e-6); the MSE of `rec` [B, H, W, C] to that,
    averaged over the cell, then over the masked cells (active False).

    -> (loss, (prediction [B, L, p*p*C], target, masked [B, L] float, mean, std))."""
    b, cell = images.shape[0], images.shape[1] // active.shape[1]
    pred = patchify(rec.astype(jnp.float32), cell)
    pixels = patchify(images.astype(jnp.float32), cell)
    mean, std = patch_stats(pixels)
    target = (pixels - mean) / std
    masked = (~active).reshape(b, -1).astype(jnp.float32)
    per_cell = jnp.mean(jnp.square(pred - target), axis=-1)
    loss = jnp.sum(per_cell * masked) / (jnp.sum(masked) + 1e-8)
    return loss, (pred, target, masked, mean, std)


def backbone_levels(encoder, image_size: int, channels: int) -> Tuple[Tuple[int, int], ...]:
    """(stride, width) of each feature map the backbone returns, from an abstract call."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)

    def call(key, x):
        return encoder.init_with_output({"params": key, **make_rngs(key)}, x, active=None,
                                        train=False)[0]
    maps = jax.eval_shape(call, jax.random.key(0), images)
    levels = tuple((image_size // m.shape[1], m.shape[-1]) for m in maps)
    strides = [s for s, _ in levels]
    if any(b != 2 * a for a, b in zip(strides, strides[1:])) or strides[-1] & (strides[-1] - 1):
        raise ValueError(f"model: the backbone's feature strides {strides} must double from "
                         "level to level up to a power of two.")
    return levels


def validate(config) -> None:
    obj, data, model = config.objective, config.data, config.model
    masking.check_mask_ratio(obj.mask_ratio, "objective.mask_ratio")
    name = model.get("name")
    if name not in BACKBONES:
        raise ValueError(f"model.name={name!r}: SparK pretrains a ConvNet; allowed: "
                         f"{list(BACKBONES)}.")
    if obj.densify_norm not in DENSIFY_NORMS:
        raise ValueError(f"objective.densify_norm={obj.densify_norm!r}; allowed: "
                         f"{list(DENSIFY_NORMS)}.")
    if not isinstance(obj.get("gather_visible", True), bool):
        raise ValueError(f"objective.gather_visible={obj.gather_visible!r} must be true or "
                         "false.")
    width = obj.decoder_width
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"objective.decoder_width={width!r} must be a positive integer.")
    stem = model.get("stem_stride") or 4
    # An invalid stem_stride is the ResNet config's to report; 32 keeps this check meaningful.
    stride = 8 * stem if name == "resnet" and stem in (1, 2, 4) else 32
    if data.image_size % stride:
        raise ValueError(f"data.image_size={data.image_size} must be a multiple of {stride} "
                         f"(the total stride of model.name={name!r}"
                         + (f" with stem_stride={stem}" if name == "resnet" else "") + ").")


def build(config, encoder=None) -> Objective:
    """`encoder`: a backbone module to use instead of config.model's (tests)."""
    validate(config)
    obj_cfg, data_cfg = config.objective, config.data
    size, channels = data_cfg.image_size, data_cfg.channels
    if encoder is None:
        encoder = models.backbone_from_config(config.model, size, channels)
    levels = backbone_levels(encoder, size, channels)
    cell = levels[-1][0]
    if obj_cfg.decoder_width >> int(math.log2(cell)) < 1:
        raise ValueError(f"objective.decoder_width={obj_cfg.decoder_width} must be at least "
                         f"{cell} (it halves at each of the decoder's {int(math.log2(cell))} "
                         "upsampling blocks).")
    grid = size // cell
    keep = masking.spark_num_active(grid * grid, obj_cfg.mask_ratio)
    if not 0 < keep < grid * grid:
        raise ValueError(f"objective.mask_ratio={obj_cfg.mask_ratio} keeps {keep} of the "
                         f"{grid}x{grid} cells of {cell} px (data.image_size={size}); at least "
                         "one must be kept and one masked.")
    model = SparK(encoder=encoder, levels=levels, decoder_width=obj_cfg.decoder_width,
                  densify_norm=obj_cfg.densify_norm, channels=channels,
                  visible_cells=keep if obj_cfg.get("gather_visible", True) else None,
                  dtype=getattr(encoder, "dtype", jnp.float32),
                  param_dtype=getattr(encoder, "param_dtype", jnp.float32))
    image_shape = (size, size, channels)

    def init_fn(rng):
        variables = model.init({"params": rng, **make_rngs(rng)},
                               jnp.zeros((1, *image_shape), jnp.float32),
                               jnp.ones((1, grid, grid), bool), train=False)
        return variables["params"], {"batch_stats": variables.get("batch_stats", {})}

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False, *,
                active=None):
        """`active` [B, grid, grid] bool (True = visible) replaces the drawn mask."""
        images = batch["image"]
        if active is None:
            active = masking.spark_mask(rngs["mask"], images.shape[0], grid, grid,
                                        obj_cfg.mask_ratio)
        variables = {"params": params, "batch_stats": model_state["batch_stats"]}
        if train:
            rec, updates = model.apply(variables, images, active, train=True, rngs=rngs,
                                       mutable=["batch_stats"])
            model_state = dict(model_state, batch_stats=updates["batch_stats"])
        else:
            rec = model.apply(variables, images, active, train=False, rngs=rngs)
        loss, (pred, target, masked, mean, std) = masked_cell_loss(rec, images, active)
        aux = {"metrics": {"loss": loss, "mask_ratio": jnp.mean(masked)},
               "model_state": model_state}
        if with_outputs:
            pixel_active = sparse.upsample_mask(active, size, size)
            # The reference's visualisation: the prediction in pixel space (each cell
            # un-normalised with its own statistics), the input on visible cells.
            recon = jnp.where(pixel_active, images.astype(jnp.float32),
                              unpatchify(pred * std + mean, cell, channels))
            aux["outputs"] = {"reconstruction": recon,
                              "mask": 1.0 - pixel_active.astype(jnp.float32),
                              "prediction": pred, "target": target,
                              "loss_mask": masked[..., None]}
        return loss, aux

    return Objective(name="spark", model=model, loss_fn=loss_fn, encoder_keys=("encoder",),
                     image_shape=image_shape,
                     init_args=lambda b: (jnp.ones((b, grid, grid), bool),),
                     error_metric="mse", init_fn=init_fn, predicts_pixels=True)
