"""Hugging Face transformers ViTMAE checkpoints <-> mim_jax MAE parameters.

Key names are those of transformers 5.x modules (`vit.layers.N.attention.q_proj`, ...).
Checkpoints saved by older versions (and most files on the Hub) use the 4.x names
(`vit.encoder.layer.N.attention.attention.query`, `...intermediate.dense`, ...); transformers
itself renames those when loading, and so do we, so both are accepted. Export writes 5.x names.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from mim_jax.convert import common, mae_layout

# 4.x -> 5.x names inside a layer, applied in order ("attention.output.dense" before
# "output.dense", which in 4.x is the second MLP layer).
_LEGACY_RENAMES = (
    (re.compile(r"^(vit\.)?encoder\.layer\.(\d+)\."), r"\1layers.\2."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
)


def current_names(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """ViT-family state dict with transformers 4.x layer names renamed to 5.x names."""
    return common.rename_keys(state_dict, _LEGACY_RENAMES)[0]


def vit_block(prefix: str, num_heads: int) -> common.Plan:
    """Plan of one transformers ViT / ViTMAE layer (5.x names) as our Block."""
    attn = f"{prefix}attention."
    return common.block(
        norm1=f"{prefix}layernorm_before",
        qkv=common.qkv_separate(f"{attn}q_proj", f"{attn}k_proj", f"{attn}v_proj", num_heads),
        proj=f"{attn}o_proj", norm2=f"{prefix}layernorm_after",
        fc1=f"{prefix}mlp.fc1", fc2=f"{prefix}mlp.fc2", num_heads=num_heads)


def _layout(prefix: str) -> mae_layout.MAELayout:
    """prefix 'vit.' for ViTMAEForPreTraining, '' for a bare ViTMAEModel."""
    emb = f"{prefix}embeddings."

    def encoder(depth, heads):
        return {
            "patch_embed": common.patch_conv(f"{emb}patch_embeddings.projection"),
            "cls_token": common.tensor(f"{emb}cls_token"),
            "transformer": {f"block_{i}": vit_block(f"{prefix}layers.{i}.", heads)
                            for i in range(depth)},
            "norm": common.layernorm(f"{prefix}layernorm"),
        }

    def decoder(depth, heads):
        return {
            "decoder_embed": common.linear("decoder.decoder_embed"),
            "mask_token": common.tensor("decoder.mask_token"),
            "transformer": {f"block_{i}": vit_block(f"decoder.decoder_layers.{i}.", heads)
                            for i in range(depth)},
            "decoder_norm": common.layernorm("decoder.decoder_norm"),
            "decoder_pred": common.linear("decoder.decoder_pred"),
        }

    return mae_layout.MAELayout(
        name="Hugging Face ViTMAE", encoder=encoder, encoder_layers=f"{prefix}layers.",
        encoder_pos=f"{emb}position_embeddings", decoder=decoder,
        decoder_layers="decoder.decoder_layers.", decoder_pos="decoder.decoder_pos_embed")


def mae_params_from_hf(state_dict: Mapping[str, Any], *, num_heads: int,
                       decoder_num_heads: Optional[int] = None, scan: bool = False,
                       strict: bool = True, expected: Optional[Mapping] = None) -> dict:
    """ViTMAEForPreTraining (or bare ViTMAEModel) state dict -> mim_jax MAE parameters.

    Values may be torch tensors or numpy arrays; the result is float32 numpy. A state dict
    without `decoder.*` keys (e.g. a ViTMAEModel) gives only the 'encoder' subtree. Head
    counts are not stored in checkpoints, so they are arguments (HF config:
    num_attention_heads / decoder_num_attention_heads). scan=True stacks the blocks as
    model.scan=True expects. Missing keys raise ValueError; unexpected ones too unless
    strict=False. Position embeddings are checked against our fixed sin-cos table (with a
    tolerance that fits a float16 / bfloat16 checkpoint). Every tensor's shape is checked
    against `expected` (the target model's parameter tree, e.g. from jax.eval_shape) when
    given, else against the sizes the checkpoint implies; all mismatches are listed at once.
    """
    state_dict = current_names(state_dict)
    prefix = "vit." if any(k.startswith("vit.") for k in state_dict) else ""
    with_decoder = any(k.startswith("decoder.") for k in state_dict)
    return mae_layout.import_mae(state_dict, _layout(prefix), num_heads=num_heads,
                                 decoder_num_heads=decoder_num_heads, with_decoder=with_decoder,
                                 scan=scan, strict=strict, expected=expected)


def encoder_params_to_hf(encoder_params: Mapping, *, image_size: int,
                         prefix: str = "") -> Dict[str, np.ndarray]:
    """Our encoder parameters -> ViTMAEModel state dict (prefix='vit.' for the encoder part of
    ViTMAEForPreTraining), including the fixed position embeddings for `image_size`, so that
    `load_state_dict(..., strict=True)` works. Accepts params['encoder'] or {'encoder': ...}
    (Objective.encoder_params), scanned or not."""
    if set(encoder_params) == {"encoder"}:
        encoder_params = encoder_params["encoder"]
    return mae_layout.export_encoder(encoder_params, _layout(prefix), image_size)


def mae_params_to_hf(params: Mapping, *, image_size: int) -> Dict[str, np.ndarray]:
    """Our MAE parameters {'encoder', 'decoder'} -> ViTMAEForPreTraining state dict."""
    return mae_layout.export_mae(params, _layout("vit."), image_size)
