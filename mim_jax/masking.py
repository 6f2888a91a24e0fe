"""Mask generators, as vectorized jnp ops that run on device inside the jitted step.

Every generator takes a PRNG key from the dedicated 'mask' stream and works on the whole batch
at once (no Python loop over samples, no host round-trip).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class RandomMask(NamedTuple):
    """MAE-style per-sample shuffle.

    ids_keep:    [B, K] int32, indices of the visible patches, in shuffled order.
    mask:        [B, L] float32, 1 = removed (masked), 0 = kept, in the original patch order.
    ids_restore: [B, L] int32, gather indices that undo the shuffle.
    """
    ids_keep: jax.Array
    mask: jax.Array
    ids_restore: jax.Array


def check_mask_ratio(mask_ratio: float, name: str = "mask_ratio") -> None:
    if not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"{name}={mask_ratio!r} must be a float in the open interval (0, 1).")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: int(L * (1 - r)) exactly as the reference (196, 0.75 -> 49)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(key: Optional[jax.Array], batch_size: int, num_patches: int,
                   mask_ratio: float, noise: Optional[jax.Array] = None) -> RandomMask:
    """Per-sample uniform noise -> argsort -> keep the first int(L*(1-r)) patches.

    Pass `noise` [B, L] instead of `key` to reproduce a given mask (e.g. the reference's).
    """
    check_mask_ratio(mask_ratio)
    len_keep = num_visible(num_patches, mask_ratio)
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}.")
    if noise is None:
        if key is None:
            raise ValueError("random_masking needs either a PRNG key or explicit noise.")
        noise = jax.random.uniform(key, (batch_size, num_patches))
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise has shape {noise.shape}; expected {(batch_size, num_patches)}.")
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    # argsort of a permutation is its inverse; a scatter of iota is cheaper than a second sort.
    rows = jnp.arange(batch_size)[:, None]
    ids_restore = jnp.zeros_like(ids_shuffle).at[rows, ids_shuffle].set(
        jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), ids_shuffle.shape))
    ids_keep = ids_shuffle[:, :len_keep]
    # Rank of each patch in the shuffle < len_keep <=> kept; this is the unshuffled binary mask.
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    return RandomMask(ids_keep=ids_keep, mask=mask, ids_restore=ids_restore)


def simmim_mask(key: jax.Array, batch_size: int, image_size: int, mask_patch_size: int,
                model_patch_size: int, mask_ratio: float) -> jax.Array:
    """SimMIM: mask ceil(r x cells) random cells of the mask-patch grid, upsampled to the
    model's patch grid. Returns [B, (image_size / model_patch_size)^2] bool, row-major.

    Exactly that many cells per sample (a random permutation, as the reference), drawn on
    device: per-sample noise -> argsort -> the first `count` cells are masked.
    """
    check_mask_ratio(mask_ratio)
    if mask_patch_size % model_patch_size:
        raise ValueError(f"mask_patch_size={mask_patch_size} is not a multiple of the model "
                         f"patch size {model_patch_size}.")
    if image_size % mask_patch_size:
        raise ValueError(f"mask_patch_size={mask_patch_size} does not divide "
                         f"image_size={image_size}.")
    cells_side = image_size // mask_patch_size
    cells = cells_side**2
    count = int(np.ceil(cells * mask_ratio))
    order = jnp.argsort(jax.random.uniform(key, (batch_size, cells)), axis=1)
    rows = jnp.arange(batch_size)[:, None]
    cell_mask = jnp.zeros((batch_size, cells), bool).at[rows, order[:, :count]].set(True)
    scale = mask_patch_size // model_patch_size
    grid = cell_mask.reshape(batch_size, cells_side, 1, cells_side, 1)
    grid = jnp.broadcast_to(grid, (batch_size, cells_side, scale, cells_side, scale))
    return grid.reshape(batch_size, (cells_side * scale) ** 2)
