"""Pieces shared by the ConvNets' "sparse" mode, SparK's (Tian et al. 2023) masked encoding.

SparK runs a dense ConvNet on the masked image and keeps it from seeing masked regions by
zeroing every conv / pooling output at masked positions and by normalising with statistics of
the visible positions only. `active` is a bool [B, h, w] on the backbone's deepest grid (stride
32 by default; True = visible); at a finer resolution a cell covers a square of positions, so
the mask is upsampled by repetition. Without a mask (active=None) everything here is the plain dense operation, which is
what fine-tuning runs.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def upsample_mask(active: jax.Array, height: int, width: int) -> jax.Array:
    """bool [B, h, w] -> bool [B, height, width, 1]: each cell repeated over its square."""
    b, h, w = active.shape
    if height % h or width % w:
        raise ValueError(f"a {height}x{width} map is not a whole multiple of the {h}x{w} mask "
                         f"grid; allowed: multiples of the grid's sides.")
    rh, rw = height // h, width // w
    up = jnp.broadcast_to(active[:, :, None, :, None], (b, h, rh, w, rw))
    return up.reshape(b, height, width, 1)


def apply_mask(x: jax.Array, active: Optional[jax.Array]) -> jax.Array:
    """x [B, H, W, C] with masked positions set to exactly zero; x itself when active is None.

    A select rather than a multiply: a masked value of inf or NaN must not leak through 0 * x.
    """
    if active is None:
        return x
    return jnp.where(upsample_mask(active, x.shape[1], x.shape[2]), x, jnp.zeros((), x.dtype))


def visible_positions(active: jax.Array, height: int, width: int,
                      visible_cells: int) -> jax.Array:
    """int32 [B, n]: the flat indices (row-major over height x width) of the visible positions
    of each sample, ascending, n = visible_cells x (positions per cell). Every sample must have
    exactly `visible_cells` visible cells (SparK's mask keeps a fixed count), which makes n
    static: per-position layers can then run on the visible rows only."""
    b, h, w = active.shape
    flat = upsample_mask(active, height, width).reshape(b, height * width)
    n = visible_cells * (height // h) * (width // w)
    # A stable sort of "masked" (False first) lists the visible positions in order.
    return jnp.argsort(~flat, axis=1, stable=True)[:, :n].astype(jnp.int32)


def gather_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, H, W, C], positions [B, n] -> the rows at those positions, [B, n, C]."""
    b, height, width, c = x.shape
    return jnp.take_along_axis(x.reshape(b, height * width, c), positions[..., None], axis=1)


def scatter_rows(rows: jax.Array, positions: jax.Array, height: int, width: int) -> jax.Array:
    """rows [B, n, C] placed at `positions` of a [B, height, width, C] map of zeros."""
    b, _, c = rows.shape
    out = jnp.zeros((b, height * width, c), rows.dtype)
    out = out.at[jnp.arange(b)[:, None], positions].set(rows, unique_indices=True)
    return out.reshape(b, height, width, c)


def check_active(active: Optional[jax.Array], images: jax.Array, stride: int) -> None:
    """The mask must be bool on the images' stride-`stride` grid (one cell per output pixel)."""
    if active is None:
        return
    want = (images.shape[0], images.shape[1] // stride, images.shape[2] // stride)
    if tuple(active.shape) != want or active.dtype != jnp.bool_:
        raise ValueError(f"active has shape {tuple(active.shape)} and dtype {active.dtype}; "
                         f"expected bool [batch, H/{stride}, W/{stride}] = {list(want)}.")


def check_inputs(images: jax.Array, channels: int, stride: int, active: Optional[jax.Array],
                 drop_path_rate: float) -> None:
    """What every ConvNet backbone checks before its forward: NHWC images whose sides are
    multiples of its total stride, the mask on that grid, a drop-path rate in [0, 1)."""
    if (images.ndim != 4 or images.shape[-1] != channels or images.shape[1] % stride
            or images.shape[2] % stride):
        raise ValueError(f"images has shape {tuple(images.shape)}; expected [batch, H, W, "
                         f"{channels}] (NHWC) with H and W multiples of {stride}.")
    check_active(active, images, stride)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate={drop_path_rate!r} must be in [0, 1).")


def stage_drop_rates(drop_path_rate: float, depths) -> list:
    """timm's stochastic-depth rule: rates rise linearly from 0 to drop_path_rate over all
    blocks; -> one tuple of per-block rates per stage."""
    rates = np.linspace(0.0, drop_path_rate, sum(depths))
    return [tuple(float(r) for r in stage) for stage in np.split(rates, np.cumsum(depths)[:-1])]


class MaskedBatchNorm(nn.Module):
    """BatchNorm over [B, H, W, C] whose batch statistics cover the visible positions only.

    Same parameters and collections as flax's nn.BatchNorm (params scale/bias, batch_stats
    mean/var), with torch's semantics so that converted timm / SparK weights and statistics
    behave as in the references:
      * the running variance is updated with the unbiased batch variance (n / (n - 1));
      * momentum is flax's (0.9 = torch's 0.1), eps 1e-5 by default;
      * the batch variance is the two-pass mean of squared deviations (no E[x^2] - E[x]^2
        cancellation).
    With a mask, positions that are not active take no part in the statistics and are zero
    in the output (the reference's SparseBatchNorm2d gathers the active positions, normalises
    them as a BatchNorm1d and scatters them back into zeros). Statistics are means over the
    whole (global) batch: under jit with a sharded batch they are synchronised across devices.
    """
    momentum: float = 0.9
    epsilon: float = 1e-5
    scale_init: Any = nn.initializers.ones
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, active: Optional[jax.Array] = None, *, train: bool = False):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        mask = None if active is None else upsample_mask(active, x.shape[1], x.shape[2])
        if train:
            mean, var, count = masked_moments(xf, mask)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = jax.lax.rsqrt(var + self.epsilon) * jnp.asarray(scale, jnp.float32)
        y = (xf - mean) * mul + jnp.asarray(bias, jnp.float32)
        if mask is not None:
            y = jnp.where(mask, y, 0.0)
        return y.astype(self.dtype)


def masked_moments(x: jax.Array, mask: Optional[jax.Array]):
    """Per-channel mean, biased variance and count over (B, H, W) of x [B, H, W, C] (float32),
    over the positions where mask [B, H, W, 1] is True, or all of them. A batch with no visible
    position yields zeros (count is clamped to 1) rather than NaN."""
    axes = (0, 1, 2)
    if mask is None:
        count = jnp.float32(x.shape[0] * x.shape[1] * x.shape[2])
        mean = jnp.sum(x, axes) / count
        var = jnp.sum(jnp.square(x - mean), axes) / count
        return mean, var, count
    m = mask.astype(x.dtype)
    count = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x * m, axes) / count
    var = jnp.sum(jnp.square((x - mean) * m), axes) / count
    return mean, var, count
