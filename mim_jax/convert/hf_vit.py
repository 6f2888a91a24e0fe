"""Hugging Face transformers ViT checkpoints -> mim_jax ViT parameters, and the helpers the
BEiT converters (hf_beit.py) share with it.

* ViTForMaskedImageModeling (SimMIM with a ViT encoder) -> the SimMIM objective's tree
  {'encoder': ViT params, 'decoder': {'kernel': (1, 1, D, stride**2 * channels), 'bias'}}, the
  decoder being the head's 1x1 conv (`decoder.0`); its output channels keep torch's
  PixelShuffle order, which is the order our pixel_shuffle reads. A bare ViTModel gives only
  'encoder'. The encoder is our ViT with pos_embed='learned', cls_token=True, qkv_bias='qkv'.

Key names are those of transformers 5.x (`vit.layers.N.attention.q_proj`, ...). Checkpoints
saved by 4.x (most Hub files) use `encoder.layer.N.attention.attention.query`,
`intermediate.dense`, ...; transformers renames those on load and so do we (hf_mae's renames,
the two checkpoints share them).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

import numpy as np

from mim_jax.convert import common, hf_mae, mae_layout
from mim_jax.models import vit

VIT = "Hugging Face ViT"


def check_heads(num_heads) -> int:
    if not isinstance(num_heads, (int, np.integer)) or isinstance(num_heads, bool) \
            or num_heads <= 0:
        raise ValueError(f"num_heads={num_heads!r} must be a positive integer (checkpoints do "
                         f"not store the head count; HF config: num_attention_heads).")
    return int(num_heads)


def prefix_of(state: Mapping[str, Any], name: str) -> str:
    return f"{name}." if any(k.startswith(f"{name}.") for k in state) else ""


def layer_count(state: Mapping[str, Any], layers: str, what: str) -> int:
    depth = common.layer_depth(state, layers)
    if depth == 0:
        raise ValueError(f"{what} state dict has no encoder layers (keys '{layers}<i>.…').")
    return depth


def check_positions(plan: common.Plan, params: dict, num_heads: int) -> None:
    """Learned positions [1, 1 + grid**2, D] and relative tables [(2 grid - 1)**2 + 3, heads]
    must describe one square patch grid with a CLS token; the tables' head axis also catches
    a wrong num_heads, which the other weights cannot."""
    grids = {}
    for path, leaf in common.plan_leaves(plan):
        value = params
        for name in path:
            value = value[name]
        key = leaf.keys[0]
        if path[-1] == "pos_embed":
            n = value.shape[1] - 1 if value.ndim == 3 and value.shape[0] == 1 else 0
            if n < 1 or math.isqrt(n) ** 2 != n:
                raise ValueError(f"{key} has shape {value.shape}; expected [1, 1 + grid**2, "
                                 f"width] (CLS position first, square patch grid).")
            grids[key] = math.isqrt(n)
        elif path[-2:] == ("rel_pos_bias", "table"):
            rows = value.shape[0] if value.ndim == 2 else 0
            side = (math.isqrt(max(rows - 3, 0)) + 1) // 2
            if rows < 4 or (2 * side - 1) ** 2 + 3 != rows:
                raise ValueError(f"{key} has shape {value.shape}; expected [(2 * grid - 1)**2 "
                                 f"+ 3, num_heads] (square patch grid plus 3 CLS entries).")
            if value.shape[1] != num_heads:
                raise ValueError(f"{key} has {value.shape[1]} heads but num_heads={num_heads}.")
            grids[key] = side
    if len(set(grids.values())) > 1:
        raise ValueError(f"position tables disagree on the patch grid side: {grids}.")


def stack_if_scan(params: dict, depth: int, scan: bool) -> dict:
    if scan:  # model.scan=True keeps the blocks stacked on a leading depth axis
        stacked = vit.stack_block_params(params["encoder"]["transformer"], depth)
        params["encoder"]["transformer"] = {"blocks": numpy_tree(stacked["blocks"])}
    return params


def numpy_tree(tree):
    if isinstance(tree, Mapping):
        return {k: numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


# ---------------------------------------------------------------- ViT (SimMIM)

def _plan(prefix: str, depth: int, num_heads: int, *, mask_token: bool,
          decoder: bool) -> common.Plan:
    emb = f"{prefix}embeddings."
    encoder: common.Plan = {
        "patch_embed": common.patch_conv(f"{emb}patch_embeddings.projection"),
        "cls_token": common.tensor(f"{emb}cls_token"),
        "pos_embed": common.tensor(f"{emb}position_embeddings"),
        "transformer": {f"block_{i}": hf_mae.vit_block(f"{prefix}layers.{i}.", num_heads)
                        for i in range(depth)},
        "norm": common.layernorm(f"{prefix}layernorm"),
    }
    if mask_token:
        encoder["mask_token"] = common.tensor(f"{emb}mask_token")
    plan = {"encoder": encoder}
    if decoder:
        plan["decoder"] = common.patch_conv("decoder.0")
    return plan


def simmim_params_to_hf_vit(params: Mapping, *, image_size: int) -> Dict[str, np.ndarray]:
    """Our SimMIM {'encoder'[, 'decoder']} with a plain ViT (q/k/v biases, CLS token,
    learned or sin-cos positions; scanned or not) -> a ViTForMaskedImageModeling state dict
    (a ViTModel's, prefix '', for an encoder alone). Sin-cos positions are written as the
    table they are (transformers' ViT learns its positions, so it takes any table)."""
    encoder, depth, heads = mae_layout.unscanned(params["encoder"], "encoder")
    if "pos_embed" not in encoder:
        width = np.shape(encoder["cls_token"])[-1]
        patch = np.shape(encoder["patch_embed"]["kernel"])[0]
        encoder["pos_embed"] = mae_layout.sincos_table(width, (image_size // patch) ** 2)
    tree = dict(params, encoder=encoder)
    plan = _plan("vit." if "decoder" in params else "", depth, heads,
                 mask_token="mask_token" in encoder, decoder="decoder" in params)
    return common.dump(plan, tree, VIT)


def simmim_params_from_hf_vit(state_dict: Mapping[str, Any], *, num_heads: int,
                              scan: bool = False, strict: bool = True) -> dict:
    """ViTForMaskedImageModeling (or bare ViTModel) state dict -> {'encoder'[, 'decoder']}.

    Values may be torch tensors or numpy arrays; the result is float32 numpy. The encoder gets
    'mask_token' only if the checkpoint has one (ViTModel(use_mask_token=False) has none);
    'decoder' is present only with `decoder.*` keys. num_heads is the HF config's
    num_attention_heads (not stored in checkpoints). scan=True stacks the blocks as
    model.scan=True expects. Missing keys raise ValueError; unexpected ones (e.g. a ViTModel's
    pooler) too unless strict=False.
    """
    num_heads = check_heads(num_heads)
    state = hf_mae.current_names(state_dict)
    prefix = prefix_of(state, "vit")
    depth = layer_count(state, f"{prefix}layers.", VIT)
    plan = _plan(prefix, depth, num_heads, mask_token=f"{prefix}embeddings.mask_token" in state,
                 decoder=any(k.startswith("decoder.") for k in state))
    common.check_keys(state, common.plan_keys(plan), strict, VIT)
    params = common.load(plan, state)
    check_positions(plan, params, num_heads)
    if "decoder" in params:
        kernel = params["decoder"]["kernel"]
        patch, _, channels, width = params["encoder"]["patch_embed"]["kernel"].shape
        want = (1, 1, width, patch**2 * channels)
        if kernel.shape != want:
            raise ValueError(
                f"decoder.0 has kernel {kernel.shape[:2]} mapping {kernel.shape[2]} -> "
                f"{kernel.shape[3]} channels; the SimMIM objective needs 1x1 from {want[2]} -> "
                f"{want[3]} (width -> patch_size**2 * channels: the HF config's encoder_stride "
                f"must equal its patch_size={patch}).")
    return stack_if_scan(params, depth, scan)
