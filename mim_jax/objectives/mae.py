"""MAE (He et al. 2022): encode visible patches only, light decoder, MSE on masked pixels."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import flops, masking, models
from mim_jax.models import activations, attention, vit
from mim_jax.objectives.base import Objective


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, L, p*p*C] with per-patch (row, col, channel) order, as the reference."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Inverse of patchify for square images."""
    b, num, _ = patches.shape
    p, g = patch_size, int(round(num**0.5))
    x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


def patch_stats(target: jax.Array, eps: float = 1e-6):
    """Per-patch mean and std with UNBIASED variance (ddof=1), as the reference's norm_pix_loss."""
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    return mean, jnp.sqrt(var + eps)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array,
               norm_pix_loss: bool) -> jax.Array:
    """Mean over masked patches (mask 1) of the per-patch mean squared error."""
    if norm_pix_loss:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEDecoder(nn.Module):
    num_patches: int
    patch_dim: int  # p*p*C
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False
    dot_general: Callable = jax.lax.dot_general
    attention_fn: Callable = attention.xla_attention
    activation: Callable = activations.gelu

    @nn.compact
    def __call__(self, latent, ids_restore):
        """latent: [B, 1+K, D_enc] (CLS first); ids_restore: [B, L] -> [B, L, p*p*C]."""
        dense = lambda features, name: nn.Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=vit.xavier_uniform(), dot_general=self.dot_general)
        x = dense(self.width, "decoder_embed")(latent)
        b, n_vis = x.shape[0], x.shape[1] - 1
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width),
                                self.param_dtype)
        tokens = jnp.concatenate(
            [x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype),
                                        (b, self.num_patches - n_vis, self.width))], axis=1)
        tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)  # unshuffle
        x = jnp.concatenate([x[:, :1], tokens], axis=1)
        grid = int(round(self.num_patches**0.5))
        pos = np.concatenate([np.zeros((1, self.width), np.float32),
                              vit.sincos_2d(self.width, grid, grid)])
        x = x + jnp.asarray(pos, x.dtype)[None]
        x = vit.Transformer(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=int(self.width * self.mlp_ratio),
            dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, scan=self.scan,
            dot_general=self.dot_general, attention_fn=self.attention_fn,
            activation=self.activation, name="transformer")(x)
        x = nn.LayerNorm(epsilon=vit.LAYER_NORM_EPS, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="decoder_norm")(x)
        return dense(self.patch_dim, "decoder_pred")(x)[:, 1:]


class MAE(nn.Module):
    encoder: vit.ViT
    decoder: MAEDecoder
    mask_ratio: float = 0.75

    def __call__(self, images, *, train: bool = False, noise=None):
        """-> (pred [B, L, p*p*C], RandomMask). The mask comes from the 'mask' RNG stream
        unless explicit `noise` [B, L] is given (to reproduce the reference's mask)."""
        cfg = self.encoder.config
        key = None if noise is not None else self.make_rng("mask")
        m = masking.random_masking(key, images.shape[0], cfg.num_patches, self.mask_ratio, noise)
        latent = self.encoder(images, ids_keep=m.ids_keep, train=train)
        return self.decoder(latent, m.ids_restore), m


def build(config) -> Objective:
    obj_cfg, data_cfg = config.objective, config.data
    masking.check_mask_ratio(obj_cfg.mask_ratio, "objective.mask_ratio")
    if config.model.get("name", "vit") != "vit":
        raise ValueError(f"model.name={config.model.name!r}: MAE drops masked tokens, which "
                         "needs a ViT encoder; allowed: ['vit'].")
    encoder = models.vit_from_config(config.model, data_cfg.image_size, data_cfg.channels)
    arch = encoder.config
    for field in ("decoder_width", "decoder_depth", "decoder_heads"):
        if obj_cfg[field] <= 0:
            raise ValueError(f"objective.{field}={obj_cfg[field]!r} must be a positive integer.")
    if obj_cfg.decoder_width % obj_cfg.decoder_heads:
        raise ValueError(f"objective.decoder_width={obj_cfg.decoder_width} is not divisible by "
                         f"objective.decoder_heads={obj_cfg.decoder_heads}.")
    decoder = MAEDecoder(
        num_patches=arch.num_patches, patch_dim=arch.patch_size**2 * arch.channels,
        width=obj_cfg.decoder_width, depth=obj_cfg.decoder_depth, num_heads=obj_cfg.decoder_heads,
        mlp_ratio=obj_cfg.get("decoder_mlp_ratio", 4.0), dtype=encoder.dtype,
        param_dtype=encoder.param_dtype, remat=encoder.remat, scan=encoder.scan,
        dot_general=encoder.dot_general, attention_fn=encoder.attention_fn,
        activation=encoder.activation)
    model = MAE(encoder=encoder, decoder=decoder, mask_ratio=obj_cfg.mask_ratio)
    norm_pix = bool(obj_cfg.norm_pix_loss)
    p, c = arch.patch_size, arch.channels

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False, *,
                noise=None):
        images = batch["image"]
        pred, m = model.apply({"params": params}, images, train=train, noise=noise, rngs=rngs)
        target = patchify(images.astype(jnp.float32), p)
        loss = masked_mse(pred, target, m.mask, norm_pix)
        aux = {"metrics": {"loss": loss, "mask_ratio": jnp.mean(m.mask)},
               "model_state": model_state}
        if with_outputs:
            recon, loss_target = pred.astype(jnp.float32), target
            if norm_pix:  # show pixels: undo the per-patch normalisation with the target's stats
                mean, std = patch_stats(target)
                recon, loss_target = recon * std + mean, (target - mean) / std
            mask_patches = jnp.broadcast_to(m.mask[..., None], pred.shape[:2] + (p * p,))
            aux["outputs"] = {"reconstruction": unpatchify(recon, p, c),
                              "mask": unpatchify(mask_patches, p, 1),
                              "prediction": pred, "patch_mask": m.mask,
                              "target": loss_target, "loss_mask": m.mask[..., None]}
        return loss, aux

    return Objective(name="mae", model=model, loss_fn=loss_fn, encoder_keys=("encoder",),
                     image_shape=(arch.image_size, arch.image_size, arch.channels),
                     forward_flops=forward_flops(arch, obj_cfg), predicts_pixels=True)


def forward_flops(arch: vit.ViTConfig, obj_cfg) -> dict:
    """Forward FLOPs per image of MAE, split by part.

    The patch embedding runs on every patch (tokens are dropped after it), the encoder on the
    visible patches + CLS, the decoder on all patches + CLS; the decoder's embed projection sees
    the encoder output (visible + CLS) and its prediction head every decoder token.
    """
    visible = masking.num_visible(arch.num_patches, obj_cfg.mask_ratio) + 1
    full = arch.num_patches + 1
    width = obj_cfg.decoder_width
    mlp_dim = int(width * obj_cfg.get("decoder_mlp_ratio", 4.0))
    patch_dim = arch.patch_size**2 * arch.channels
    return {
        "patch_embed": flops.patch_embed_flops(arch),
        "encoder": flops.transformer_flops(visible, arch.width, arch.depth, arch.mlp_dim),
        "decoder_embed": flops.dense_flops(visible, arch.width, width),
        "decoder": flops.transformer_flops(full, width, obj_cfg.decoder_depth, mlp_dim),
        "decoder_pred": flops.dense_flops(full, width, patch_dim),
    }
