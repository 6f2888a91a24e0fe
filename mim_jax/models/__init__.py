"""Backbones: build them from the `config.model` block of an experiment config."""
from __future__ import annotations

import jax.numpy as jnp

from mim_jax.models import vit

_DTYPES = ("float32", "bfloat16", "float16")


def dtype_from_name(name: str, field: str):
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r} is not a supported dtype; allowed: {list(_DTYPES)}.")
    return jnp.dtype(name)


def vit_from_config(model_cfg, image_size: int, channels: int, **extra) -> vit.ViT:
    """A ViT from config.model (variant + overrides); `extra` are objective-specific options."""
    if model_cfg.get("name", "vit") != "vit":
        raise ValueError(f"model.name={model_cfg.name!r} is not a known backbone; allowed: ['vit'].")
    arch = vit.resolve_vit_config(
        model_cfg.variant, image_size, channels,
        **{k: model_cfg.get(k) for k in ("patch_size", "width", "depth", "num_heads", "mlp_dim")})
    impl = model_cfg.get("attention_impl")
    if impl not in (None, "xla", "cudnn"):
        raise ValueError(f"model.attention_impl={impl!r}; allowed: None, 'xla', 'cudnn'.")
    rate = model_cfg.get("drop_path_rate", 0.0)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"model.drop_path_rate={rate!r} must be in [0, 1).")
    return vit.ViT(
        config=arch, drop_path_rate=rate,
        remat=model_cfg.get("remat", False), scan=model_cfg.get("scan", False),
        dtype=dtype_from_name(model_cfg.get("dtype", "float32"), "model.dtype"),
        param_dtype=dtype_from_name(model_cfg.get("param_dtype", "float32"), "model.param_dtype"),
        attention_impl=impl, **extra)
