"""Fit pretrained encoder parameters to an encoder built for fine-tuning.

Fine-tuning often changes what the parameter shapes depend on: the image size (learned
position embeddings, the Multiway encoder's vision positions, relative-position tables),
Swin's window size, a relative position bias that was shared by all blocks in pretraining and
is per block in fine-tuning (BEiT, SimMIM-ViT), or scan over layers. `fit_encoder_params`
handles those and refuses anything else with the list of parameter names that do not fit.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mim_jax.models import multiway, vit

# Relative-position tables: (2g-1)^2 offsets, then (ViT with CLS) 3 CLS entries.
_REL_POS_LEAVES = ("table", "relative_position_bias_table")


def resize_grid(values: np.ndarray, new_side: int) -> np.ndarray:
    """[side*side, C] values on a square grid -> [new_side*new_side, C], bicubic.

    jax.image.resize's cubic kernel (Keys, a=-0.5) differs slightly from torch's bicubic
    (a=-0.75) that the references use; the difference is far below fine-tuning noise.
    """
    side = int(round(math.sqrt(values.shape[0])))
    if side * side != values.shape[0]:
        raise ValueError(f"{values.shape[0]} entries do not form a square grid.")
    if side == new_side:
        return np.asarray(values)
    grid = jnp.asarray(values, jnp.float32).reshape(side, side, -1)
    out = jax.image.resize(grid, (new_side, new_side, grid.shape[-1]), method="cubic")
    return np.asarray(out.reshape(new_side * new_side, -1)).astype(values.dtype)


def resize_pos_embed(pos: np.ndarray, num_prefix: int, new_grid: int) -> np.ndarray:
    """[1, prefix + g*g, D] -> [1, prefix + new_grid^2, D]; the CLS entries stay as they are."""
    prefix, grid = pos[:, :num_prefix], pos[0, num_prefix:]
    return np.concatenate([prefix, resize_grid(grid, new_grid)[None]], axis=1)


def resize_rel_pos_table(table: np.ndarray, new_rows: int) -> np.ndarray:
    """[(2g-1)^2 (+3), heads] -> [new_rows, heads]; the 3 CLS entries (if any) are kept."""
    def split(rows):
        side = int(round(math.sqrt(rows)))
        if side * side == rows:
            return side, 0
        side = int(round(math.sqrt(rows - 3)))
        if side * side == rows - 3:
            return side, 3
        raise ValueError(f"a relative-position table of {rows} rows is neither (2g-1)^2 nor "
                         "(2g-1)^2 + 3.")
    old_side, old_extra = split(table.shape[0])
    new_side, new_extra = split(new_rows)
    if old_extra != new_extra:
        raise ValueError("cannot map a relative-position table with CLS entries to one without.")
    grid = resize_grid(table[:old_side * old_side], new_side)
    return np.concatenate([grid, table[old_side * old_side:]], axis=0)


def _flat(tree) -> Dict[Tuple[str, ...], object]:
    return traverse_util.flatten_dict(jax.tree.map(lambda x: x, dict(tree)))


def _match_block_layout(params: dict, target: dict) -> dict:
    """Stack or unstack ViT blocks so `params` uses `target`'s (scan) layout."""
    p_tr, t_tr = params.get("transformer"), target.get("transformer")
    if not isinstance(p_tr, dict) or not isinstance(t_tr, dict):
        return params
    if "blocks" in t_tr and "blocks" not in p_tr:
        depth = sum(k.startswith("block_") for k in p_tr)
        return dict(params, transformer=vit.stack_block_params(p_tr, depth))
    if "blocks" in p_tr and "blocks" not in t_tr:
        return dict(params, transformer=vit.unstack_block_params(p_tr))
    return params


def fit_encoder_params(pretrained, target) -> Tuple[dict, list]:
    """Pretrained encoder params -> params with exactly `target`'s tree and shapes.

    `target` may hold arrays or jax.ShapeDtypeStructs. Returns (params, notes) where notes
    say what was resized, converted or left unused. Raises ValueError listing every target
    parameter that is missing from the checkpoint or has a shape that cannot be adapted.
    """
    pretrained = _match_block_layout(dict(pretrained), dict(target))
    src, dst = _flat(pretrained), _flat(target)
    shared = src.get(("rel_pos_bias", "table"))
    out, notes, problems = {}, [], []
    for key, want in dst.items():
        name = "/".join(key)
        value = src.get(key)
        if value is None and key[-2:] == ("rel_pos_bias", "table") and shared is not None:
            value = np.asarray(shared)  # shared (pretraining) -> per-block (fine-tuning), as BEiT
            if len(want.shape) == value.ndim + 1:  # scanned blocks: one copy per block
                value = np.broadcast_to(value, (want.shape[0],) + value.shape)
            notes.append(f"{name}: copied from the shared relative position bias")
        if value is None:
            problems.append(f"{name} {tuple(want.shape)} is missing")
            continue
        value = np.asarray(value)
        if value.shape != tuple(want.shape):
            try:
                value = _resize(key, value, tuple(want.shape))
                notes.append(f"{name}: resized {np.shape(src.get(key, shared))} -> "
                             f"{tuple(want.shape)}")
            except ValueError as e:
                problems.append(f"{name}: checkpoint {value.shape} vs model "
                                f"{tuple(want.shape)} ({e})")
                continue
        out[key] = value.astype(want.dtype)
    unused = sorted("/".join(k) for k in src if k not in dst)
    if shared is not None and ("rel_pos_bias", "table") not in dst:
        unused = [u for u in unused if u != "rel_pos_bias/table"]
    if unused:
        notes.append("not used by the fine-tuning encoder: " + ", ".join(unused))
    if problems:
        raise ValueError("the checkpoint does not fit the model: " + "; ".join(problems))
    return traverse_util.unflatten_dict(out), notes


def _resize(key, value: np.ndarray, shape: tuple) -> np.ndarray:
    leaf = key[-1]
    if leaf == "pos_embed" and value.ndim == 3 and value.shape[-1] == shape[-1]:
        for prefix in (1, 0):  # with or without a CLS entry, whichever makes a square grid
            n_old, n_new = value.shape[1] - prefix, shape[1] - prefix
            if (prefix <= value.shape[1] and math.isqrt(n_old) ** 2 == n_old
                    and math.isqrt(n_new) ** 2 == n_new):
                return resize_pos_embed(value, prefix, math.isqrt(n_new))
        raise ValueError("position embeddings do not form a square grid")
    if leaf == "vision_pos_embed" and value.ndim == 2 and value.shape[-1] == shape[-1]:
        # The Multiway encoder's table: fairseq's unused rows and the CLS row stay, the patch
        # grid is resized (unilm's load_model_and_may_interpolate).
        prefix = multiway.POSITION_OFFSET + 1
        return resize_pos_embed(value[None], prefix, math.isqrt(shape[0] - prefix))[0]
    if leaf in _REL_POS_LEAVES and value.ndim == len(shape) and value.shape[-1] == shape[-1]:
        if value.ndim == 3:  # scanned blocks: one table per block on the leading axis
            return np.stack([resize_rel_pos_table(t, shape[1]) for t in value])
        return resize_rel_pos_table(value, shape[0])
    raise ValueError("only position embeddings and relative-position tables can be resized")
