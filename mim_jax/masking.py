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


# The reference draws at most this many candidate blocks per step before it stops masking.
_BLOCK_ATTEMPTS = 10


def _check_block_args(batch_size, grid_h, grid_w, num_masking_patches, min_num_patches,
                      max_num_patches, min_aspect, max_aspect) -> None:
    def positive_int(name, value, upper=None):
        if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
                or (upper is not None and value > upper)):
            allowed = "a positive int" + (f" <= {upper}" if upper is not None else "")
            raise ValueError(f"{name}={value!r} must be {allowed}.")

    for name, value in (("batch_size", batch_size), ("grid_h", grid_h), ("grid_w", grid_w)):
        positive_int(name, value)
    positive_int("num_masking_patches", num_masking_patches, grid_h * grid_w)
    if max_num_patches is not None:
        positive_int("max_num_patches", max_num_patches)
    # Above the block budget is allowed, as in the reference: areas are then drawn from
    # [budget, min_num_patches] and only blocks adding <= budget patches are kept.
    if (isinstance(min_num_patches, bool) or not isinstance(min_num_patches, (int, float))
            or not min_num_patches > 0):
        raise ValueError(f"min_num_patches={min_num_patches!r} must be a number > 0.")
    if (isinstance(min_aspect, bool) or not isinstance(min_aspect, (int, float))
            or not min_aspect > 0):
        raise ValueError(f"min_aspect={min_aspect!r} must be a number > 0.")
    if max_aspect is not None and (isinstance(max_aspect, bool)
                                   or not isinstance(max_aspect, (int, float))
                                   or not max_aspect >= min_aspect):
        raise ValueError(f"max_aspect={max_aspect!r} must be None (1 / min_aspect) or a number "
                         f">= min_aspect={min_aspect}.")


def block_mask(key: jax.Array, batch_size: int, grid_h: int, grid_w: int,
               num_masking_patches: int, min_num_patches: float = 16,
               max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
               max_aspect: Optional[float] = None, exact: bool = False) -> jax.Array:
    """BEiT blockwise masking. Returns [B, grid_h * grid_w] bool, row-major, True = masked.

    Per sample, until num_masking_patches are masked: a step draws up to 10 rectangles
    (area ~ U(min_num_patches, budget), aspect log-uniform in [min_aspect, max_aspect],
    h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), top-left uniform) and keeps
    the first one smaller than the grid that masks between 1 and `budget` new patches, where
    budget = min(patches still to mask, max_num_patches). Masking stops early at the first
    step where no attempt is kept, so the count may end below the target, never above it.
    exact=True is BEiT v2: the shortfall is then filled with uniformly drawn unmasked patches
    (v2 also has a branch removing a surplus, which the budget rule makes unreachable).
    """
    _check_block_args(batch_size, grid_h, grid_w, num_masking_patches, min_num_patches,
                      max_num_patches, min_aspect, max_aspect)
    target = num_masking_patches
    max_block = target if max_num_patches is None else max_num_patches
    log_aspect = (np.log(min_aspect), np.log(1.0 / min_aspect if max_aspect is None
                                              else max_aspect))
    rows = jnp.arange(grid_h)[None, :, None]
    cols = jnp.arange(grid_w)[None, None, :]

    def add_block(mask, key, budget):
        # The attempts of one step all see the same mask (it changes only when one is kept),
        # so they are drawn and tested together and the first acceptable one is applied.
        # That is the reference's sequential loop, without an inner loop on device.
        # Drawn flat: a 2-D draw per sample becomes 3-D under vmap, which XLA:CPU compiles
        # several times slower.
        u_area, u_aspect, u_top, u_left = jax.random.uniform(
            key, (4 * _BLOCK_ATTEMPTS,)).reshape(4, _BLOCK_ATTEMPTS)
        # lo + (hi - lo) * u, like random.uniform: still valid when budget < min_num_patches.
        area = min_num_patches + (budget - min_num_patches) * u_area
        aspect = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
        # jnp.round rounds halves to even, as Python's round() does.
        h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        fits = (h < grid_h) & (w < grid_w)
        # Uniform over 0..grid - size inclusive, as random.randint (the minimum guards against
        # u * n rounding up to n in float32).
        top = jnp.minimum(jnp.floor(u_top * (grid_h - h + 1)), grid_h - h).astype(jnp.int32)
        left = jnp.minimum(jnp.floor(u_left * (grid_w - w + 1)), grid_w - w).astype(jnp.int32)
        top, left, h, w = (x[:, None, None] for x in (top, left, h, w))
        block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        new = jnp.sum(block & ~mask, axis=(1, 2))
        ok = fits & (new > 0) & (new <= budget)
        first = jnp.argmax(ok)  # the first acceptable attempt, if any
        kept = ok[first]
        return mask | (block[first] & kept), jnp.where(kept, new[first], 0)

    def one_sample(key):
        k_blocks, k_fill = jax.random.split(key)

        def keep_going(state):
            _, count, _, stalled = state
            return (count < target) & ~stalled

        def step(state):
            mask, count, i, _ = state
            budget = jnp.minimum(target - count, max_block)
            mask, delta = add_block(mask, jax.random.fold_in(k_blocks, i), budget)
            return mask, count + delta, i + 1, delta == 0

        init = (jnp.zeros((grid_h, grid_w), bool), jnp.int32(0), jnp.int32(0), jnp.bool_(False))
        mask, count, _, _ = jax.lax.while_loop(keep_going, step, init)
        mask = mask.reshape(-1)
        if exact:
            # Top-(target - count) of fixed uniform noise over the unmasked patches, one per
            # iteration: a uniform random subset, as v2's choice without replacement. The
            # shortfall is small, and this is several times faster than a sort on CPU.
            noise = jax.random.uniform(k_fill, mask.shape)

            def fill_one(state):
                mask, count = state
                pick = jnp.argmax(jnp.where(mask, -1.0, noise))
                return mask.at[pick].set(True), count + 1

            mask, _ = jax.lax.while_loop(lambda s: s[1] < target, fill_one, (mask, count))
        return mask

    return jax.vmap(one_sample)(jax.random.split(key, batch_size))


def spark_num_active(cells: int, mask_ratio: float) -> int:
    """Visible cells per sample: round(cells x (1 - r)) with Python's round, as the SparK
    reference (7 x 7 cells at 0.6 -> 20)."""
    return round(cells * (1 - mask_ratio))


def spark_mask(key: jax.Array, batch_size: int, grid_h: int, grid_w: int,
               mask_ratio: float) -> jax.Array:
    """SparK: [B, grid_h, grid_w] bool, True = ACTIVE (visible), on the backbone's deepest
    grid (stride 32 at 224 px: 7 x 7). Exactly spark_num_active cells are kept per sample:
    per-sample uniform noise -> argsort -> the first ones are kept, as the reference."""
    check_mask_ratio(mask_ratio)
    cells = grid_h * grid_w
    keep = spark_num_active(cells, mask_ratio)
    if not 0 < keep < cells:
        raise ValueError(f"mask_ratio={mask_ratio} keeps {keep} of the {grid_h}x{grid_w} cells; "
                         "at least one must be kept and one masked.")
    order = jnp.argsort(jax.random.uniform(key, (batch_size, cells)), axis=1)
    rows = jnp.arange(batch_size)[:, None]
    active = jnp.zeros((batch_size, cells), bool).at[rows, order[:, :keep]].set(True)
    return active.reshape(batch_size, grid_h, grid_w)
