"""Classification heads on a pretrained encoder: fine-tuning and linear probing.

Fine-tuning (MAE / BEiT / SimMIM recipe, and BEiT-3's BEiT3ForImageClassification): global
average pool of the patch tokens (or the CLS token) -> LayerNorm (fc_norm) -> linear head
initialised with std 2e-5.
Linear probe (MAE recipe): frozen features -> BatchNorm without affine (eps 1e-6) -> linear
head initialised with std 0.01.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

POOLS = ("gap", "cls")


def _head_init(std: float):
    # The references call trunc_normal_(std=s), which cuts at +/-2 in absolute value: for
    # s = 2e-5 or 0.01 that is a plain normal of std s.
    return nn.initializers.normal(std)


def pool_features(features: jax.Array, pool: str, has_cls: bool) -> jax.Array:
    """Encoder output -> [B, D]: ViT tokens [B, (1+)L, D], a feature map [B, h, w, D], or the
    Multiway encoder's output dict (its 'encoder_out' tokens)."""
    if isinstance(features, dict):
        features = features["encoder_out"]
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; allowed: {list(POOLS)}.")
    if features.ndim == 4:  # a ConvNet / Swin map: average over space (no CLS there)
        if pool == "cls":
            raise ValueError("pool='cls' needs an encoder with a CLS token; use pool='gap'.")
        return features.mean(axis=(1, 2))
    if pool == "cls":
        if not has_cls:
            raise ValueError("pool='cls' needs an encoder with a CLS token; use pool='gap'.")
        return features[:, 0]
    return features[:, int(has_cls):].mean(axis=1)


def encoder_has_cls(encoder: nn.Module) -> bool:
    """A ViT says so in its cls_token field, the Multiway encoder in has_cls_token (its
    cls_token is the token itself once the module is bound)."""
    if getattr(type(encoder), "has_cls_token", None) is not None:
        return bool(type(encoder).has_cls_token)
    return bool(getattr(encoder, "cls_token", False))


class Classifier(nn.Module):
    """encoder -> pool -> (fc_norm) -> head: the fine-tuning model."""
    encoder: nn.Module
    num_classes: int
    pool: str = "gap"
    fc_norm: bool = True
    fc_norm_eps: float = 1e-6  # the MAE / BEiT recipes; BEiT-3's is torch's default 1e-5
    head_init_std: float = 2e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        x = pool_features(self.encoder(images, train=train), self.pool,
                          encoder_has_cls(self.encoder))
        if self.fc_norm:
            x = nn.LayerNorm(epsilon=self.fc_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="fc_norm")(x)
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                        kernel_init=_head_init(self.head_init_std),
                        dot_general=self.dot_general, name="head")(x.astype(jnp.float32))


class ProbeHead(nn.Module):
    """BatchNorm without affine (eps 1e-6, torch momentum 0.1) -> linear: the MAE probe head."""
    num_classes: int
    head_init_std: float = 0.01

    @nn.compact
    def __call__(self, features, *, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                         epsilon=1e-6, momentum=0.9, name="bn")(features.astype(jnp.float32))
        return nn.Dense(self.num_classes, name="head",
                        kernel_init=_head_init(self.head_init_std))(x)
