"""Official facebookresearch/mae checkpoints (timm-style names) <-> mim_jax MAE parameters.

Two layouts occur: the full pretraining model (MaskedAutoencoderViT: encoder + mask_token,
decoder_* keys), and the released mae_pretrain_vit_*.pth files, which hold only the encoder.
Both are stored under a top-level 'model' key.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np
from mim_jax.convert import common, mae_layout


def _block(prefix: str, num_heads: int) -> common.Plan:
    return common.block(
        norm1=f"{prefix}norm1", qkv=common.qkv_fused(f"{prefix}attn.qkv", num_heads),
        proj=f"{prefix}attn.proj", norm2=f"{prefix}norm2",
        fc1=f"{prefix}mlp.fc1", fc2=f"{prefix}mlp.fc2", num_heads=num_heads)


def encoder_plan(depth: int, heads: int) -> common.Plan:
    """The encoder (no position table: MAE's is fixed, see mae_layout.check_sincos)."""
    return {
        "patch_embed": common.patch_conv("patch_embed.proj"),
        "cls_token": common.tensor("cls_token"),
        "transformer": {f"block_{i}": _block(f"blocks.{i}.", heads) for i in range(depth)},
        "norm": common.layernorm("norm"),
    }


def _decoder(depth: int, heads: int) -> common.Plan:
    return {
        "decoder_embed": common.linear("decoder_embed"),
        "mask_token": common.tensor("mask_token"),
        "transformer": {f"block_{i}": _block(f"decoder_blocks.{i}.", heads)
                        for i in range(depth)},
        "decoder_norm": common.layernorm("decoder_norm"),
        "decoder_pred": common.linear("decoder_pred"),
    }


LAYOUT = mae_layout.MAELayout(
    name="official MAE", encoder=encoder_plan, encoder_layers="blocks.", encoder_pos="pos_embed",
    decoder=_decoder, decoder_layers="decoder_blocks.", decoder_pos="decoder_pos_embed")


def mae_params_from_official(state_dict: Mapping[str, Any], *, num_heads: int,
                             decoder_num_heads: Optional[int] = None, scan: bool = False,
                             strict: bool = True, expected: Optional[Mapping] = None) -> dict:
    """Official MAE state dict -> mim_jax MAE parameters (float32 numpy).

    The full pretraining layout gives {'encoder', 'decoder'}; an encoder-only file
    (mae_pretrain_vit_*.pth) gives {'encoder'}. A top-level 'model' key is unwrapped.
    Official models use 12 heads for ViT-B, 16 for ViT-L/H and 16 in the decoder; checkpoints
    do not store them. Fine-tuned checkpoints carry extra keys (fc_norm, head): pass
    strict=False to ignore them. float16 / bfloat16 checkpoints are accepted (upcast to
    float32). Every tensor's shape is checked against `expected` (the target model's
    parameter tree, arrays or jax.ShapeDtypeStructs) when given, else against the sizes the
    checkpoint implies; all mismatches are listed in one ValueError.
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    with_decoder = any(k.startswith("decoder_") or k == "mask_token" for k in state_dict)
    return mae_layout.import_mae(state_dict, LAYOUT, num_heads=num_heads,
                                 decoder_num_heads=decoder_num_heads, with_decoder=with_decoder,
                                 scan=scan, strict=strict, expected=expected)


def mae_params_to_official(params: Mapping, *, image_size: int) -> Dict[str, np.ndarray]:
    """Our {'encoder', ['decoder']} parameters -> official MAE state dict (no 'model' wrapper),
    including the fixed pos_embed / decoder_pos_embed for `image_size`."""
    return mae_layout.export_mae(params, LAYOUT, image_size)
