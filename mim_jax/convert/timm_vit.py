"""timm VisionTransformer state dicts (`vit_*` models) -> a mim_jax ViT encoder with learned
positions. The official MAE files are in the same layout (MAE trained timm's model), so this
also reads their encoder; mae_params_from_official is the converter that checks their position
table is the fixed sin-cos one and reads the decoder.

Keys: patch_embed.proj, cls_token, pos_embed [1, 1 + grid**2, width], blocks.N.{norm1,
attn.qkv (fused, with bias), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm. A model that pools
before normalising (global_pool='avg') has fc_norm instead of norm; that norm belongs to the
classifier, so its encoder has no final norm. The position table is imported as stored; a
fixed sin-cos one is recognised later by convert.sizes.positions.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.convert import common, hf_vit, official_mae
from mim_jax.models import vit

NAME = "timm ViT"


def _implied_shapes(state: Mapping[str, Any], depth: int, num_heads: int,
                    final_norm: bool) -> dict:
    """Our encoder's parameter shapes for the sizes the file implies (width, channels and
    patch from the patch embedding, MLP width from block 0, grid from the position table)."""
    width, channels, patch, _ = np.shape(state["patch_embed.proj.weight"])
    if width % num_heads:
        raise ValueError(f"the file's width {width} is not divisible by num_heads={num_heads}.")
    grid = math.isqrt(np.shape(state["pos_embed"])[1] - 1)  # square: check_positions
    cfg = vit.ViTConfig(image_size=grid * int(patch), patch_size=int(patch), width=int(width),
                        depth=depth, num_heads=num_heads,
                        mlp_dim=int(np.shape(state["blocks.0.mlp.fc1.weight"])[0]),
                        channels=int(channels))
    model = vit.ViT(cfg, pos_embed="learned", final_norm=final_norm)
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def vit_params_from_timm(state_dict: Mapping[str, Any], *, num_heads: int,
                         strict: bool = True) -> dict:
    """timm VisionTransformer (or official MAE encoder) state dict -> {'encoder': ViT params}
    (float32 numpy) for our ViT with pos_embed='learned', cls_token=True, qkv_bias='qkv'.

    num_heads is not stored in the file (timm: model_args['num_heads']). A top-level 'model'
    key is unwrapped. Missing keys raise ValueError; unexpected ones (a classifier head, an
    MAE decoder) too unless strict=False. Every tensor's shape is checked against the model
    the file's own sizes imply; all mismatches are listed at once.
    """
    num_heads = hf_vit.check_heads(num_heads)
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    depth = hf_vit.layer_count(state_dict, "blocks.", NAME)
    encoder = official_mae.encoder_plan(depth, num_heads)
    encoder["pos_embed"] = common.tensor("pos_embed")
    final_norm = "norm.weight" in state_dict
    if not final_norm:
        del encoder["norm"]
    plan = {"encoder": encoder}
    common.check_keys(state_dict, common.plan_keys(plan), strict, NAME)
    table = {"encoder": {"pos_embed": encoder["pos_embed"]}}
    hf_vit.check_positions(table, common.load(table, state_dict), num_heads)
    shapes = {"encoder": _implied_shapes(state_dict, depth, num_heads, final_norm)}
    return common.load(plan, state_dict, expected=common.expected_shapes(shapes),
                       what=f"{NAME} state dict", target="the ViT its sizes imply")
