"""SimMIM (Xie et al. 2022): all patches through the encoder with masked ones replaced by a
learned token, a linear (1x1 conv) head with pixel shuffle, L1 on the masked pixels."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import flops, masking, models
from mim_jax.models import initializers, vit
from mim_jax.objectives.base import Objective


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """Depth-to-space [B, h, w, C*r*r] -> [B, h*r, w*r, C] with torch.nn.PixelShuffle's channel
    order: input channel c*r*r + i*r + j lands on output pixel (h*r + i, w*r + j), channel c."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


def upsample_mask(token_mask: jax.Array, grid: int, patch_size: int) -> jax.Array:
    """[B, grid*grid] patch mask -> [B, H, W, 1] pixel mask (1 = masked)."""
    b = token_mask.shape[0]
    m = token_mask.reshape(b, grid, 1, grid, 1, 1).astype(jnp.float32)
    m = jnp.broadcast_to(m, (b, grid, patch_size, grid, patch_size, 1))
    return m.reshape(b, grid * patch_size, grid * patch_size, 1)


def masked_l1(reconstruction, images, pixel_mask):
    """The reference loss: sum |x - y| over masked pixels / (masked pixels + 1e-5) / channels."""
    channels = images.shape[-1]
    l1 = jnp.abs(reconstruction.astype(jnp.float32) - images.astype(jnp.float32))
    return jnp.sum(l1 * pixel_mask) / (jnp.sum(pixel_mask) + 1e-5) / channels


class SimMIM(nn.Module):
    encoder: Any  # ViT (tokens [B, (1+)L, D]) or Swin (feature map [B, h, w, C])
    stride: int  # encoder output stride in pixels (16 for ViT-B/16, 32 for Swin)
    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, token_mask, *, train: bool = False):
        feats = self.encoder(images, token_mask=token_mask, train=train)
        if feats.ndim == 3:  # ViT tokens -> feature map
            side = images.shape[1] // self.stride
            feats = feats[:, feats.shape[1] - side * side:]  # drop CLS if present
            feats = feats.reshape(feats.shape[0], side, side, feats.shape[-1])
        # The reference never re-initialises its decoder: torch's default Conv2d init.
        x = nn.Conv(self.stride**2 * self.channels, (1, 1), dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=initializers.torch_default_kernel(),
                    bias_init=initializers.torch_default_bias(feats.shape[-1]),
                    name="decoder")(feats)
        return pixel_shuffle(x, self.stride)


def build(config) -> Objective:
    obj_cfg, data_cfg, model_cfg = config.objective, config.data, config.model
    masking.check_mask_ratio(obj_cfg.mask_ratio, "objective.mask_ratio")
    encoder = models.backbone_from_config(model_cfg, data_cfg.image_size, data_cfg.channels,
                                          use_mask_token=True)
    arch = encoder.config
    stride = arch.stride if hasattr(arch, "stride") else arch.patch_size
    grid = data_cfg.image_size // arch.patch_size
    mask_patch = obj_cfg.mask_patch_size
    if mask_patch % arch.patch_size or data_cfg.image_size % mask_patch:
        raise ValueError(
            f"objective.mask_patch_size={mask_patch} must be a multiple of the model patch size "
            f"{arch.patch_size} and divide data.image_size={data_cfg.image_size}.")
    model = SimMIM(encoder=encoder, stride=stride, channels=data_cfg.channels,
                   dtype=encoder.dtype, param_dtype=encoder.param_dtype)

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False, *,
                token_mask=None):
        images = batch["image"]
        if token_mask is None:
            token_mask = masking.simmim_mask(rngs["mask"], images.shape[0], data_cfg.image_size,
                                             mask_patch, arch.patch_size, obj_cfg.mask_ratio)
        recon = model.apply({"params": params}, images, token_mask, train=train, rngs=rngs)
        pixel_mask = upsample_mask(token_mask, grid, arch.patch_size)
        loss = masked_l1(recon, images, pixel_mask)
        aux = {"metrics": {"loss": loss, "mask_ratio": jnp.mean(token_mask.astype(jnp.float32))},
               "model_state": model_state}
        if with_outputs:
            aux["outputs"] = {"reconstruction": recon.astype(jnp.float32), "mask": pixel_mask,
                              "prediction": recon.astype(jnp.float32),
                              "target": images.astype(jnp.float32), "loss_mask": pixel_mask}
        return loss, aux

    objective = Objective(
        name="simmim", model=model, loss_fn=loss_fn, encoder_keys=("encoder",),
        image_shape=(data_cfg.image_size, data_cfg.image_size, data_cfg.channels),
        init_args=lambda b: (jnp.zeros((b, grid * grid), bool),), error_metric="l1",
        predicts_pixels=True, forward_flops=forward_flops(arch, model_cfg.get("cls_token", True)))
    if isinstance(encoder, vit.ViT) and encoder.init_style == "beit":
        # VisionTransformer.fix_init_weight: block i's attn.proj and fc2 weights / sqrt(2 i).
        def init_fn(rng):
            params = objective.init(rng)
            enc = params["encoder"]
            return dict(params, encoder=dict(
                enc, transformer=vit.rescale_beit_init(enc["transformer"]))), {}
        objective = dataclasses.replace(objective, init_fn=init_fn)
    return objective


def forward_flops(arch, cls_token: bool) -> dict:
    """The encoder on every patch (masked ones hold the mask token), then a 1x1 conv from the
    final feature map to stride^2 * C pixels per position."""
    out = flops.encoder_forward_flops(arch, cls_token)
    if hasattr(arch, "embed_dim"):  # Swin
        positions, width, stride = arch.feature_size**2, arch.num_features, arch.stride
    else:
        positions, width, stride = arch.num_patches, arch.width, arch.patch_size
    out["decoder"] = flops.dense_flops(positions, width, stride**2 * arch.channels)
    return out
