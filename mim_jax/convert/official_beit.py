"""Official microsoft/unilm BEiT and BEiT v2 checkpoints <-> the mim_jax BEiT objective's
parameters {'encoder', 'lm_head'[, 'cls_head']}.

The layout is that of the references' VisionTransformerForMaskedImageModeling(CLS), stored
under a top-level 'model' key: `patch_embed.proj`, `cls_token`, `mask_token`, optional
`pos_embed` (learned), a shared `rel_pos_bias.relative_position_bias_table` or per-layer
`blocks.N.attn.relative_position_bias_table`, `blocks.N.{norm1, attn.qkv (no bias), attn.q_bias,
attn.v_bias, attn.proj, gamma_1, gamma_2, norm2, mlp.fc1, mlp.fc2}`, `norm`, `lm_head` and, for
BEiT v2 with the CLS-pretraining head, `cls_pt_layers.N.*` (blocks of the same layout; the
head shares `norm` and `lm_head`, the reference's shared_lm_head=True). timm's BEiT has the
same layout; one that pools before normalising (global_pool='avg', fine-tuned files) has
`fc_norm`, a classifier's, instead of `norm`, and its encoder then has no final norm. The
`relative_position_index` buffers are checked against ours on import and written on export, so
the reference model's `load_state_dict(strict=True)` takes the exported dict.

Our encoder is then a ViT with cls_token=True, use_mask_token (if `mask_token`), pos_embed=
'learned' / 'none', rel_pos_bias='shared' / 'per_layer' / 'none', qkv_bias='qv' (or False when
the checkpoint has no q/v biases) and layer_scale_init set if it has gamma_1/2; objective.
cls_head_layers is the number of `cls_pt_layers`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import numpy as np

from mim_jax.convert import common, hf_beit, hf_vit

NAME = "official BEiT"
_HEAD = "cls_pt_layers."


def _names(layers: str):
    def names(i):
        p = f"{layers}{i}."
        return dict(q_bias=f"{p}attn.q_bias", v_bias=f"{p}attn.v_bias", ls1=f"{p}gamma_1",
                    ls2=f"{p}gamma_2", table=f"{p}attn.relative_position_bias_table")
    return names


def _block(p: str, f: hf_beit.BlockFeatures, heads: int) -> common.Plan:
    kernel = common.qkv_fused(f"{p}attn.qkv", heads)["kernel"]
    return hf_beit.block_plan(
        f, heads, qkv_kernel=kernel, q_bias=f"{p}attn.q_bias", v_bias=f"{p}attn.v_bias",
        norm1=f"{p}norm1", proj=f"{p}attn.proj", norm2=f"{p}norm2", fc1=f"{p}mlp.fc1",
        fc2=f"{p}mlp.fc2", ls1=f"{p}gamma_1", ls2=f"{p}gamma_2",
        table=f"{p}attn.relative_position_bias_table")


def layout_plan(f: hf_beit.Features, prefix: str = "") -> common.Plan:
    """The layout's plan; the encoder's keys start with `prefix` ('encoder.' in SimMIM files,
    official_simmim.py), the LM and CLS heads' never (only BEiT files have them)."""
    encoder: common.Plan = {
        "patch_embed": common.patch_conv(f"{prefix}patch_embed.proj"),
        "cls_token": common.tensor(f"{prefix}cls_token"),
        "transformer": {f"block_{i}": _block(f"{prefix}blocks.{i}.", f.blocks, f.num_heads)
                        for i in range(f.depth)},
    }
    if f.final_norm:
        encoder["norm"] = common.layernorm(f"{prefix}norm")
    if f.mask_token:
        encoder["mask_token"] = common.tensor(f"{prefix}mask_token")
    if f.pos_embed:
        encoder["pos_embed"] = common.tensor(f"{prefix}pos_embed")
    if f.shared_rel_pos:
        encoder["rel_pos_bias"] = {
            "table": common.tensor(f"{prefix}rel_pos_bias.relative_position_bias_table")}
    plan = {"encoder": encoder}
    if f.lm_head:
        plan["lm_head"] = common.linear("lm_head")
    if f.head_depth:
        plan["cls_head"] = {f"block_{i}": _block(f"{_HEAD}{i}.", f.head_blocks, f.num_heads)
                            for i in range(f.head_depth)}
    return plan


def encoder_features(state: Mapping[str, Any], num_heads: int, *, prefix: str = "",
                     what: str = NAME) -> hf_beit.Features:
    """The encoder options of an official-layout state dict whose encoder keys start with
    `prefix` (no heads: see beit_params_from_official for BEiT's)."""
    depth = hf_vit.layer_count(state, f"{prefix}blocks.", what)
    return hf_beit.Features(
        num_heads=num_heads, depth=depth,
        blocks=hf_beit.block_features(state, depth, _names(f"{prefix}blocks.")),
        mask_token=f"{prefix}mask_token" in state, pos_embed=f"{prefix}pos_embed" in state,
        shared_rel_pos=f"{prefix}rel_pos_bias.relative_position_bias_table" in state,
        lm_head=False, final_norm=f"{prefix}norm.weight" in state)


def is_official_beit(state_dict: Mapping[str, Any]) -> bool:
    """Whether a (possibly 'model'-wrapped) official state dict is BEiT's rather than MAE's:
    BEiT keys its q/v biases, layer scale, relative position tables and LM head, none of which
    an official MAE file has. Only top-level blocks count: files that hold such blocks inside
    an `encoder.` (official SimMIM, VQ-KD) are not BEiT files."""
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    return any(k.startswith(("rel_pos_bias.", "lm_head.", _HEAD)) or
               (k.startswith("blocks.") and
                k.endswith((".attn.q_bias", ".gamma_1", ".attn.relative_position_bias_table")))
               for k in state_dict)


def beit_params_from_official(state_dict: Mapping[str, Any], *, num_heads: int,
                              scan: bool = False, strict: bool = True,
                              expected: Optional[Mapping] = None) -> dict:
    """Official BEiT / BEiT v2 state dict -> {'encoder'[, 'lm_head'][, 'cls_head']} (float32
    numpy; each part only if the checkpoint has it). A top-level 'model' key is unwrapped.

    num_heads is not stored in checkpoints (12 for ViT-B, 16 for ViT-L). scan=True stacks the
    encoder blocks as model.scan=True expects. Missing keys raise ValueError; unexpected ones
    too unless strict=False (a fine-tuned file's fc_norm / head, say). Stored
    relative_position_index buffers must equal ours. Every tensor's shape is checked against
    `expected` (our parameter tree, e.g. jax.eval_shape of the objective's init) when given,
    else against the sizes the checkpoint implies; all mismatches are listed in one ValueError.
    """
    num_heads = hf_vit.check_heads(num_heads)
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    state = dict(state_dict)
    if strict and any(k.startswith(("cls_pt_norm.", "cls_pt_lm_head.")) for k in state):
        raise ValueError(f"{NAME} state dict has cls_pt_norm / cls_pt_lm_head (the reference's "
                         f"shared_lm_head=False); mim_jax's CLS head shares the final norm and "
                         f"LM head. Pass strict=False to import the rest without them.")
    hf_beit.check_index_buffers(state)
    head_depth = common.layer_depth(state, _HEAD)
    f = dataclasses.replace(
        encoder_features(state, num_heads), lm_head="lm_head.weight" in state,
        head_depth=head_depth,
        head_blocks=hf_beit.block_features(state, head_depth, _names(_HEAD)))
    if head_depth and not f.lm_head:
        raise ValueError(f"{NAME} state dict has a CLS head ({_HEAD}*) but no lm_head, through "
                         f"which its predictions go.")
    return hf_beit.import_params(state, layout_plan(f), f, what=NAME, scan=scan, strict=strict,
                                 expected=expected)


def beit_params_to_official(params: Mapping) -> Dict[str, np.ndarray]:
    """Our {'encoder'[, 'lm_head'][, 'cls_head']} (scanned or not) -> an official state dict
    (no 'model' wrapper): float32 weights plus the int64 relative_position_index buffers the
    reference registers, so its `load_state_dict(strict=True)` accepts it. Build the reference
    with use_abs_pos_emb, use_shared_rel_pos_bias / use_rel_pos_bias, init_values and
    qkv_bias as the parameters have them (and early_layers / head_layers for a CLS head)."""
    return export(params)


def export(params: Mapping, *, prefix: str = "", what: str = NAME) -> Dict[str, np.ndarray]:
    """beit_params_to_official with the encoder's keys under `prefix`."""
    out, f, params = hf_beit.export_params(params, lambda f: layout_plan(f, prefix), what)
    enc = params["encoder"]
    if f.shared_rel_pos:
        out[f"{prefix}rel_pos_bias.relative_position_index"] = hf_beit.index_buffer(
            np.asarray(enc["rel_pos_bias"]["table"]))
    groups = [(f"{prefix}blocks.", enc["transformer"], f.blocks)]
    if f.head_depth:
        groups.append((_HEAD, params["cls_head"], f.head_blocks))
    for layers, blocks, features in groups:
        if features.rel_pos_table:
            for name, block in blocks.items():
                out[f"{layers}{name.split('_')[1]}.attn.relative_position_index"] = \
                    hf_beit.index_buffer(np.asarray(block["rel_pos_bias"]["table"]))
    return out
