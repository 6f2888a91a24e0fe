"""Hugging Face transformers ViT and BEiT checkpoints -> mim_jax ViT parameters.

* ViTForMaskedImageModeling (SimMIM with a ViT encoder) -> the SimMIM objective's tree
  {'encoder': ViT params, 'decoder': {'kernel': (1, 1, D, stride**2 * channels), 'bias'}}, the
  decoder being the head's 1x1 conv (`decoder.0`); its output channels keep torch's
  PixelShuffle order, which is the order our pixel_shuffle reads. A bare ViTModel gives only
  'encoder'. The encoder is our ViT with pos_embed='learned', cls_token=True, qkv_bias='qkv'.
* BeitModel / BeitForMaskedImageModeling encoders -> {'encoder': ViT params} for our ViT with
  qkv_bias='qv', cls_token=True and, as the checkpoint has them, learned absolute positions
  (pos_embed='learned', else 'none'), a shared or per-layer relative position bias
  (rel_pos_bias='shared' / 'per_layer') and layer scale (layer_scale_init set). BEiT's own
  pretraining head (`lm_head`, visual-token logits) and the classifier are not imported.

Key names are those of transformers 5.x (`vit.layers.N.attention.q_proj`, `beit.layers.N.lambda_1`,
`shared_position_bias.relative_position_bias_table`). Checkpoints saved by 4.x (most Hub files)
use `encoder.layer.N.attention.attention.query`, `intermediate.dense`, ...,
`encoder.relative_position_bias` and `attention.attention.relative_position_bias`;
transformers renames those on load and so do we (the ViT part of the renames is hf_mae's, the
two checkpoints share it). 4.x BEiT files may also hold `relative_position_index` buffers; they
are not imported (ours are computed) but must equal ours.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping

import numpy as np

from mim_jax.convert import common, hf_mae
from mim_jax.models import vit

VIT = "Hugging Face ViT"
BEIT = "Hugging Face BEiT"

# BEiT-only 4.x -> 5.x names, applied before the ViT renames of hf_mae (whose layer rename
# only knows the 'vit.' prefix).
_BEIT_LEGACY_RENAMES = tuple((re.compile(old), new) for old, new in (
    (r"^(beit\.)?encoder\.layer\.(\d+)\.", r"\1layers.\2."),
    (r"^(beit\.)?encoder\.relative_position_bias\.", r"\1shared_position_bias."),
    (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
))
_INDEX_SUFFIX = ".relative_position_index"


def _check_heads(num_heads) -> int:
    if not isinstance(num_heads, (int, np.integer)) or isinstance(num_heads, bool) \
            or num_heads <= 0:
        raise ValueError(f"num_heads={num_heads!r} must be a positive integer (checkpoints do "
                         f"not store the head count; HF config: num_attention_heads).")
    return int(num_heads)


def _prefix(state: Mapping[str, Any], name: str) -> str:
    return f"{name}." if any(k.startswith(f"{name}.") for k in state) else ""


def _depth(state: Mapping[str, Any], layers: str, what: str) -> int:
    depth = common.layer_depth(state, layers)
    if depth == 0:
        raise ValueError(f"{what} state dict has no encoder layers (keys '{layers}<i>.…').")
    return depth


def _check_positions(plan: common.Plan, params: dict, num_heads: int) -> None:
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


def _stack_if(params: dict, depth: int, scan: bool) -> dict:
    if scan:  # model.scan=True keeps the blocks stacked on a leading depth axis
        stacked = vit.stack_block_params(params["encoder"]["transformer"], depth)
        params["encoder"]["transformer"] = {"blocks": _numpy_tree(stacked["blocks"])}
    return params


def _numpy_tree(tree):
    if isinstance(tree, Mapping):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


# ---------------------------------------------------------------- ViT (SimMIM)

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
    num_heads = _check_heads(num_heads)
    state = hf_mae.current_names(state_dict)
    prefix = _prefix(state, "vit")
    emb = f"{prefix}embeddings."
    depth = _depth(state, f"{prefix}layers.", VIT)
    encoder: common.Plan = {
        "patch_embed": common.patch_conv(f"{emb}patch_embeddings.projection"),
        "cls_token": common.tensor(f"{emb}cls_token"),
        "pos_embed": common.tensor(f"{emb}position_embeddings"),
        "transformer": {f"block_{i}": hf_mae.vit_block(f"{prefix}layers.{i}.", num_heads)
                        for i in range(depth)},
        "norm": common.layernorm(f"{prefix}layernorm"),
    }
    if f"{emb}mask_token" in state:
        encoder["mask_token"] = common.tensor(f"{emb}mask_token")
    plan = {"encoder": encoder}
    if any(k.startswith("decoder.") for k in state):
        plan["decoder"] = common.patch_conv("decoder.0")
    common.check_keys(state, common.plan_keys(plan), strict, VIT)
    params = common.load(plan, state)
    _check_positions(plan, params, num_heads)
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
    return _stack_if(params, depth, scan)


# ---------------------------------------------------------------- BEiT

def _current_beit_names(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    renamed, _ = common.rename_keys(state_dict, _BEIT_LEGACY_RENAMES)
    return hf_mae.current_names(renamed)


def _check_index_buffers(state: Dict[str, Any]) -> None:
    """Stored 4.x relative_position_index buffers must equal ours (BEiT's indexing with the
    three CLS entries last); they are then dropped."""
    for key in [k for k in state if k.endswith(_INDEX_SUFFIX)]:
        theirs = common.to_numpy(state.pop(key))
        side = math.isqrt(max(math.isqrt(theirs.size) - 1, 0))  # (N, N), N = side**2 + 1
        ours = vit.relative_position_index(side, side, cls_token=True) if side else np.zeros(0)
        if theirs.size != ours.size or not np.array_equal(theirs.reshape(-1), ours.reshape(-1)):
            raise ValueError(f"{key} (shape {theirs.shape}) is not the relative position index "
                             f"of a square patch grid with a CLS token that mim_jax computes.")


def _qv_bias(q: str, v: str, num_heads: int) -> common.Leaf:
    """BEiT's q and v biases (k has none) -> our (3, heads, head_dim) with a zero k slot, which
    qkv_bias='qv' never reads."""
    def to_ours(qb, vb):
        return np.stack([qb, np.zeros_like(qb), vb]).reshape(3, num_heads, -1)
    return common.Leaf((f"{q}.bias", f"{v}.bias"), to_ours,
                       lambda b: (b[0].reshape(-1), b[2].reshape(-1)))


def _beit_block(p: str, num_heads: int, state: Mapping[str, Any]) -> common.Plan:
    attn = f"{p}attention."
    qkv = common.qkv_separate(f"{attn}q_proj", f"{attn}k_proj", f"{attn}v_proj", num_heads)
    qkv["bias"] = _qv_bias(f"{attn}q_proj", f"{attn}v_proj", num_heads)
    plan = common.block(norm1=f"{p}layernorm_before", qkv=qkv, proj=f"{attn}o_proj",
                        norm2=f"{p}layernorm_after", fc1=f"{p}mlp.fc1", fc2=f"{p}mlp.fc2",
                        num_heads=num_heads)
    if f"{p}lambda_1" in state or f"{p}lambda_2" in state:
        plan["ls1"], plan["ls2"] = common.tensor(f"{p}lambda_1"), common.tensor(f"{p}lambda_2")
    table = f"{p}relative_position_bias.relative_position_bias_table"
    if table in state:
        plan["rel_pos_bias"] = {"table": common.tensor(table)}
    return plan


def _beit_final_norm(state: Mapping[str, Any], prefix: str) -> str:
    """Our ViT ends in one LayerNorm over all tokens: BeitModel's `layernorm`
    (use_mean_pooling=False) or BeitForMaskedImageModeling's top-level one."""
    candidates = [p for p in dict.fromkeys((f"{prefix}layernorm", "layernorm"))
                  if f"{p}.weight" in state]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ValueError(f"{BEIT} state dict has two final LayerNorms ({candidates}, i.e. "
                         f"use_mean_pooling=False inside BeitForMaskedImageModeling); mim_jax's "
                         f"ViT applies one.")
    raise ValueError(
        f"{BEIT} state dict has no LayerNorm over the output tokens ({prefix}layernorm.weight): "
        f"a use_mean_pooling=True BeitModel only normalises the pooled feature "
        f"(pooler.layernorm), which mim_jax's ViT does not have.")


def vit_params_from_hf_beit(state_dict: Mapping[str, Any], *, num_heads: int,
                            scan: bool = False, strict: bool = True) -> dict:
    """BeitModel (use_mean_pooling=False) or BeitForMaskedImageModeling state dict ->
    {'encoder': ViT params}.

    Build the ViT with qkv_bias='qv', cls_token=True, use_mask_token if the checkpoint has
    'mask_token', pos_embed='learned' if it has `embeddings.position_embeddings` else 'none',
    rel_pos_bias='shared' (`shared_position_bias`) / 'per_layer' (`layers.N.
    relative_position_bias`) / 'none', and layer_scale_init set if it has `lambda_1/2` (the
    value only matters for a fresh init). num_heads is the HF config's num_attention_heads.
    BEiT's `lm_head` and a classifier are not part of the ViT: pass strict=False to skip them.
    """
    num_heads = _check_heads(num_heads)
    state = _current_beit_names(state_dict)
    _check_index_buffers(state)
    prefix = _prefix(state, "beit")
    emb = f"{prefix}embeddings."
    depth = _depth(state, f"{prefix}layers.", BEIT)
    encoder: common.Plan = {
        "patch_embed": common.patch_conv(f"{emb}patch_embeddings.projection"),
        "cls_token": common.tensor(f"{emb}cls_token"),
        "transformer": {f"block_{i}": _beit_block(f"{prefix}layers.{i}.", num_heads, state)
                        for i in range(depth)},
        "norm": common.layernorm(_beit_final_norm(state, prefix)),
    }
    for name, key in (("mask_token", f"{emb}mask_token"),
                      ("pos_embed", f"{emb}position_embeddings")):
        if key in state:
            encoder[name] = common.tensor(key)
    shared = f"{prefix}shared_position_bias.relative_position_bias_table"
    if shared in state:
        encoder["rel_pos_bias"] = {"table": common.tensor(shared)}
    plan = {"encoder": encoder}
    common.check_keys(state, common.plan_keys(plan), strict, BEIT)
    if scan and len({tuple(path for path, _ in common.plan_leaves(block))
                     for block in encoder["transformer"].values()}) > 1:
        raise ValueError(f"{BEIT} blocks differ in their parameters (layer scale or a relative "
                         f"position bias in some layers only); scan=True needs identical blocks.")
    params = common.load(plan, state)
    _check_positions(plan, params, num_heads)
    return _stack_if(params, depth, scan)
