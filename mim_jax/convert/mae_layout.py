"""MAE checkpoint import/export shared by every checkpoint layout (Hugging Face, official).

A layout only names where the encoder/decoder parts live (as plans, see common.py); the steps
around it are the same for all of them: infer depths from the keys, strict key check, verify
the fixed position embeddings, convert, optionally stack blocks for model.scan=True, and the
reverse for export.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.convert import common
from mim_jax.models import vit


@dataclasses.dataclass(frozen=True)
class MAELayout:
    name: str  # for error messages
    encoder: Callable[[int, int], common.Plan]  # (depth, num_heads) -> plan of our encoder
    encoder_layers: str  # key prefix of encoder layer i is f"{encoder_layers}{i}."
    encoder_pos: str  # key of the fixed encoder position embedding
    decoder: Callable[[int, int], common.Plan]
    decoder_layers: str
    decoder_pos: str


# ---------------------------------------------------------------- fixed position embeddings

def sincos_table(width: int, num_patches: int) -> np.ndarray:
    """Our fixed table with the all-zero CLS row first: [1, 1 + num_patches, width]."""
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid; only square "
                         f"sin-cos position embeddings are supported.")
    table = vit.sincos_2d(width, grid, grid)
    return np.concatenate([np.zeros((1, width), np.float32), table])[None]


def check_sincos(value, key: str) -> None:
    """Position embeddings are computed constants in mim_jax, so they are verified instead of
    imported: a checkpoint with another table (learned, other channel order, interpolated)
    would silently change the model, so it is rejected. The tolerance follows the stored
    dtype: a float16 / bfloat16 checkpoint holds the same table rounded."""
    dtype, tolerance = common.dtype_name(value), common.rounding_tolerance(value)
    value = common.to_numpy(value)
    if value.ndim == 2:
        value = value[None]
    if value.ndim != 3 or value.shape[0] != 1 or value.shape[1] < 2:
        raise ValueError(f"{key} has shape {value.shape}; expected [1, 1 + num_patches, width].")
    expected = sincos_table(value.shape[2], value.shape[1] - 1)
    err = float(np.max(np.abs(value - expected)))
    if err > tolerance:  # rounding of the same table is below it; another layout is O(1)
        raise ValueError(
            f"{key} differs from the fixed 2-D sin-cos table with a zero CLS row that mim_jax "
            f"uses (max abs difference {err:.3g}, tolerance {tolerance:g} for "
            f"{dtype}); this checkpoint's position embedding layout is not "
            f"supported.")


# ---------------------------------------------------------------- import

def _check_heads(value, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer (checkpoints do not "
                         f"store the head count).")
    return int(value)


def _dim(state_dict, key: str, axis: int) -> int:
    shape = np.shape(state_dict[key])
    if len(shape) <= abs(axis):
        raise ValueError(f"{key} has shape {tuple(shape)}; it cannot define the model's size.")
    return int(shape[axis])


def _mlp_dim(state_dict, plan: common.Plan, depth: int) -> int:
    """The MLP width most blocks have: one odd block is then reported as the mismatch, rather
    than making every other block look wrong."""
    sizes = [_dim(state_dict, plan["transformer"][f"block_{i}"]["fc1"]["kernel"].keys[0], 0)
             for i in range(depth)]
    return collections.Counter(sizes).most_common(1)[0][0]


def _implied_model(state_dict, plans, depths, heads, layout: MAELayout):
    """Our MAE parameter shapes for the sizes the checkpoint implies (width, patch and channels
    from the patch embedding, depth from the layer keys, MLP width from most blocks, grid from
    the position table), from the real modules via jax.eval_shape: every tensor of the
    checkpoint is then checked against what our model will use."""
    enc_plan = plans["encoder"]
    width, channels, patch, _ = np.shape(state_dict[enc_plan["patch_embed"]["kernel"].keys[0]])
    num_patches = _dim(state_dict, layout.encoder_pos, -2) - 1
    grid = math.isqrt(num_patches)
    for part in plans:
        part_width = width if part == "encoder" else _dim(
            state_dict, plans[part]["decoder_embed"]["kernel"].keys[0], 0)
        if part_width % heads[part]:
            raise ValueError(f"the {part} width {part_width} (from the checkpoint) is not "
                             f"divisible by its given head count {heads[part]}.")
    cfg = vit.ViTConfig(image_size=grid * patch, patch_size=int(patch), width=int(width),
                        depth=depths["encoder"], num_heads=heads["encoder"],
                        mlp_dim=_mlp_dim(state_dict, enc_plan, depths["encoder"]),
                        channels=int(channels))
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    shapes = {"encoder": jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), images)["params"]}
    if "decoder" in plans:
        from mim_jax.objectives.mae import MAEDecoder  # not at import: objectives import us

        dec_width = _dim(state_dict, plans["decoder"]["decoder_embed"]["kernel"].keys[0], 0)
        dec_mlp = _mlp_dim(state_dict, plans["decoder"], depths["decoder"])
        decoder = MAEDecoder(num_patches=num_patches, patch_dim=patch * patch * channels,
                             width=dec_width, depth=depths["decoder"], num_heads=heads["decoder"],
                             mlp_ratio=dec_mlp / dec_width)
        latent = jax.ShapeDtypeStruct((1, 1 + num_patches, cfg.width), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, num_patches), jnp.int32)
        shapes["decoder"] = jax.eval_shape(decoder.init, jax.random.key(0), latent,
                                           ids)["params"]
    return shapes, cfg


def _unscanned_shapes(tree: Mapping) -> dict:
    """A target tree given with scan=True ('blocks' stacked on a leading depth axis) -> the
    per-block shapes the conversion produces before stacking."""
    tree = dict(tree)
    if "blocks" in tree.get("transformer", {}):
        tree["transformer"] = jax.eval_shape(vit.unstack_block_params, dict(tree["transformer"]))
    return tree


def import_mae(state_dict: Mapping[str, Any], layout: MAELayout, *, num_heads: int,
               decoder_num_heads: Optional[int], with_decoder: bool, scan: bool,
               strict: bool, expected: Optional[Mapping] = None) -> dict:
    """Checkpoint -> {'encoder': ..., ['decoder': ...]} float32 numpy parameter tree.

    Every tensor is checked at conversion time, and every mismatch is listed in one
    ValueError: against `expected` (the target model's parameter tree, arrays or
    jax.ShapeDtypeStructs, as {'encoder', ['decoder']} or the encoder alone) when given,
    otherwise against the model the checkpoint's own sizes imply.
    """
    keys = list(state_dict)
    parts = [("encoder", layout.encoder, layout.encoder_layers, layout.encoder_pos,
              _check_heads(num_heads, "num_heads"))]
    if with_decoder:
        parts.append(("decoder", layout.decoder, layout.decoder_layers, layout.decoder_pos,
                      _check_heads(decoder_num_heads, "decoder_num_heads")))
    plans, depths, heads, expected_keys = {}, {}, {}, []
    for part, plan_fn, layers, pos_key, part_heads in parts:
        depths[part] = common.layer_depth(keys, layers)
        if depths[part] == 0:
            raise ValueError(f"{layout.name} state dict has no {part} layers "
                             f"(keys '{layers}<i>.…').")
        plans[part] = plan_fn(depths[part], part_heads)
        heads[part] = part_heads
        expected_keys += common.plan_keys(plans[part]) + [pos_key]
    common.check_keys(keys, expected_keys, strict, layout.name)
    for _, _, _, pos_key, _ in parts:
        check_sincos(state_dict[pos_key], pos_key)
    target_tree, target = {}, "the target model"
    if expected is not None:
        if "encoder" not in expected:
            expected = {"encoder": expected}
        target_tree = {part: _unscanned_shapes(expected[part]) for part in plans
                       if part in expected}
    if set(plans) - set(target_tree):  # parts without a target: check them self-consistently
        implied, cfg = _implied_model(state_dict, plans, depths, heads, layout)
        target_tree.update({part: implied[part] for part in plans if part not in target_tree})
        if expected is None:
            target = (f"a ViT of width {cfg.width}, depth {cfg.depth}, MLP {cfg.mlp_dim}, "
                      f"patch {cfg.patch_size}, {cfg.channels} channels (the sizes this "
                      f"checkpoint implies)")
    params = common.load(plans, state_dict, expected=common.expected_shapes(target_tree),
                         what=f"{layout.name} state dict", target=target)
    if scan:  # model.scan=True keeps the blocks stacked on a leading depth axis
        for part, depth in depths.items():
            stacked = vit.stack_block_params(params[part]["transformer"], depth)
            params[part]["transformer"] = jax.tree.map(common.owned, stacked)
    return params


# ---------------------------------------------------------------- export

def unscanned(part_params: Mapping, what: str):
    """-> (params with block_i subtrees, depth, num_heads), whether or not they were scanned."""
    part_params = dict(part_params)
    transformer = part_params.get("transformer")
    if not isinstance(transformer, Mapping) or not transformer:
        raise ValueError(f"{what} parameters have no 'transformer' blocks.")
    if "blocks" in transformer:
        transformer = vit.unstack_block_params(dict(transformer))
    part_params["transformer"] = transformer
    depth = sum(1 for name in transformer if name.startswith("block_"))
    try:
        heads = int(np.shape(transformer["block_0"]["attn"]["qkv"]["kernel"])[2])  # (D,3,H,Dh)
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{what} parameters have no block_0/attn/qkv/kernel of shape "
                         f"(width, 3, heads, head_dim).") from err
    return part_params, depth, heads


def export_encoder(encoder_params: Mapping, layout: MAELayout,
                   image_size: int) -> Dict[str, np.ndarray]:
    params, depth, heads = unscanned(encoder_params, "encoder")
    out = common.dump(layout.encoder(depth, heads), params, "encoder")  # checks the tree
    patch, _, _, width = np.shape(params["patch_embed"]["kernel"])  # (p, p, C, D)
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size={image_size!r} must be a positive multiple of the patch "
                         f"size {patch}.")
    out[layout.encoder_pos] = sincos_table(width, (image_size // patch) ** 2)
    return out


def export_decoder(decoder_params: Mapping, layout: MAELayout,
                   num_patches: int) -> Dict[str, np.ndarray]:
    params, depth, heads = unscanned(decoder_params, "decoder")
    out = common.dump(layout.decoder(depth, heads), params, "decoder")  # checks the tree
    out[layout.decoder_pos] = sincos_table(np.shape(params["mask_token"])[-1], num_patches)
    return out


def export_mae(params: Mapping, layout: MAELayout, image_size: int) -> Dict[str, np.ndarray]:
    """{'encoder': ..., ['decoder': ...]} -> checkpoint dict (float32 numpy)."""
    unknown = sorted(set(params) - {"encoder", "decoder"})
    if "encoder" not in params or unknown:
        raise ValueError(f"expected MAE parameters with an 'encoder' and optionally a 'decoder' "
                         f"subtree; got top-level keys {sorted(params)}.")
    out = export_encoder(params["encoder"], layout, image_size)
    if "decoder" in params:
        patch = np.shape(params["encoder"]["patch_embed"]["kernel"])[0]
        out.update(export_decoder(params["decoder"], layout, (image_size // patch) ** 2))
    return out
