"""On-device batch augmentations of the MAE / BEiT fine-tuning recipe: Mixup/CutMix and
RandomErasing, as jit-compatible jnp code (no TensorFlow, no host round-trip).

Behaviour follows timm's `timm/data/mixup.py` (class `Mixup`, mode='batch', correct_lam=True)
and `timm/data/random_erasing.py` (class `RandomErasing`); the recipe's values are
mixup 0.8, cutmix 1.0, switch_prob 0.5, prob 1.0, smoothing 0.1, reprob 0.25, remode 'pixel',
recount 1. Images are NHWC floats, already normalised by the dataset mean/std (timm erases
after normalisation, so N(0, 1) noise is "a random image" in that space).

Order in the recipe: timm erases per sample inside the dataset transform, and mixes the
collated batch afterwards, so call `random_erasing` first, then `mixup_cutmix`.

Shapes are static and all randomness comes from the key, so both functions run under jit;
boxes are masks built from iota comparisons instead of dynamic slices.

Deviations from timm (all deliberate, none change the distributions):
  * one key drives everything (timm draws from numpy's / Python's global RNGs), so the same
    key gives the same result, but not timm's numbers;
  * lam ~ Beta(a, a) is drawn in float32 as G1 / (G1 + G2) from jax's log-gamma sampler
    (timm: numpy's float64 beta), and the box arithmetic is float32: for the same lam value,
    floor(H * sqrt(1 - lam)) could differ only within float32 rounding of an integer;
  * random integers (centres, positions, counts) are floor(u * n) of a float32 uniform u, whose
    bias is below n * 2^-23;
  * "erase with probability p" is `u < p` (timm: skip when `u > p`), equal up to a null event;
  * the mix is over whatever batch the caller passes: the global batch under pjit (timm mixes
    each process's local batch with its own lam);
  * RandomErasing's num_splits (clean split for AugMix) and Mixup's 'pair' / 'elem' modes and
    cutmix_minmax are not implemented: the recipe does not use them.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

_ERASE_ATTEMPTS = 10  # timm's fixed number of tries to fit a box inside the image.


def one_hot_smoothed(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """[B] int labels -> [B, K] float32, off = smoothing / K, on = 1 - smoothing + off.

    timm's rule: the smoothing mass is spread over all K classes (the true one included), so
    each row sums to one.
    """
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    # `where`, not hot * (on - off) + off, so that the on/off values are exact in float32.
    hot = labels[:, None] == jnp.arange(num_classes)
    return jnp.where(hot, jnp.float32(on), jnp.float32(off))


def _uniform_int(u: jax.Array, n: jax.Array) -> jax.Array:
    """U{0, ..., n-1} from u ~ U[0, 1) (u has 23 random bits, so
    the bias is below n * 2^-23: negligible for image sides); the clip guards u * n rounding up."""
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def mix_params(key: jax.Array, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
               switch_prob: float = 0.5, prob: float = 1.0) -> Tuple[jax.Array, jax.Array]:
    """One (use_cutmix, lam) for the whole batch, as timm's `Mixup._params_per_batch`.

    With probability `prob` mix: cutmix with probability `switch_prob` when both alphas are
    positive (otherwise whichever one is), lam ~ Beta(alpha, alpha) of the chosen method.
    Not mixing gives (False, 1.0). Returns a bool[] and a float32[] (lam before cutmix's
    area correction).
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mix_params: one of mixup_alpha, cutmix_alpha must be > 0.")
    k_u, k_lam = jax.random.split(key)
    u = jax.random.uniform(k_u, (2,))
    apply = u[0] < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = u[1] < switch_prob
    else:
        use_cutmix = jnp.array(cutmix_alpha > 0)
    # Beta(a, a) = G1 / (G1 + G2) with G ~ Gamma(a), computed from log-gammas, which stay
    # accurate for a < 1. The gammas of both methods come from one vectorised draw, so a single
    # rejection loop is compiled (jax.random.beta per method would compile four); the unused
    # method's lam is discarded, so the choice does not shift the other's randomness.
    alphas = jnp.array([a for a in (mixup_alpha, cutmix_alpha) if a > 0], jnp.float32)
    log_g = jax.random.loggamma(k_lam, jnp.repeat(alphas, 2))  # [G1, G2] per active method
    lams = jnp.exp(log_g[0::2] - jnp.logaddexp(log_g[0::2], log_g[1::2]))
    lam = jnp.where(use_cutmix, lams[-1], lams[0])  # the [-1] / [0] pick is static for one method
    return apply & use_cutmix, jnp.where(apply, lam, 1.0).astype(jnp.float32)


def cutmix_bbox(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int,
                width: int) -> jax.Array:
    """timm's `rand_bbox` (margin 0) for a given centre: int32[4] (y_lo, y_hi, x_lo, x_hi).

    The uncut side is floor(side * sqrt(1 - lam)); the box spans centre -/+ cut // 2 (so an odd
    cut loses a pixel, as in timm), clipped to the image; rows/columns are half-open.
    """
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    return jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
                      jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)]
                     ).astype(jnp.int32)


def cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """`cutmix_bbox` with timm's centre: uniform over the pixels (so the box may be clipped)."""
    u = jax.random.uniform(key, (2,))
    return cutmix_bbox(lam, _uniform_int(u[0], height), _uniform_int(u[1], width), height, width)


def mix_targets(labels: jax.Array, lam: jax.Array, num_classes: int,
                smoothing: float = 0.0) -> jax.Array:
    """timm's `mixup_target`: lam * y + (1 - lam) * flip(y), y the smoothed one-hots [B, K]."""
    y = one_hot_smoothed(labels, num_classes, smoothing)
    return lam * y + (1.0 - lam) * y[::-1]


def box_mask(top: jax.Array, bottom: jax.Array, left: jax.Array, right: jax.Array,
             height: int, width: int) -> jax.Array:
    """bool[H, W], True on rows [top, bottom) x columns [left, right): a jit-friendly slice."""
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1,
                 return_lam: bool = False):
    """timm `Mixup(mode='batch', correct_lam=True)` on a [B, H, W, C] batch and [B] labels.

    Each sample i is mixed with sample B-1-i (the batch reversed), with one lam for the batch:
      mixup:  x * lam + flip(x) * (1 - lam);
      cutmix: a `cutmix_box` of flip(x) pasted into x, and lam := 1 - box_area / (H * W).
    targets = lam * y + (1 - lam) * flip(y), y = `one_hot_smoothed(labels, K, smoothing)`.

    Args:
      key: PRNG key (e.g. from the 'augment' stream).
      images: [B, H, W, C] float, B even (as timm asserts: an odd batch's middle sample would
        be mixed with itself).
      labels: [B] int class ids.
      num_classes: K, the width of the targets.
      mixup_alpha / cutmix_alpha: Beta parameters; a method is off when its alpha is 0.
      switch_prob: probability of cutmix when both methods are on.
      prob: probability of mixing the batch at all; otherwise images are returned unchanged
        and targets are the smoothed one-hots.
      label_smoothing: timm's smoothing of the one-hot targets.
      return_lam: also return the (corrected) float32 lam, for tests and logging.
    Returns:
      (images of the input dtype, targets float32 [B, K]) [+ lam].
    """
    b, h, w, _ = images.shape
    if b % 2:
        raise ValueError(f"mixup_cutmix: batch size {b} must be even (as in timm).")
    k_params, k_box = jax.random.split(key)
    use_cutmix, lam = mix_params(k_params, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                                 switch_prob=switch_prob, prob=prob)
    flipped = images[::-1]

    box = cutmix_box(k_box, lam, h, w)
    inside = box_mask(*box, h, w)
    cut_lam = 1.0 - ((box[1] - box[0]) * (box[3] - box[2])).astype(jnp.float32) / (h * w)
    cut = jnp.where(inside[None, :, :, None], flipped, images)
    blended = (images * lam + flipped * (1.0 - lam)).astype(images.dtype)

    # timm returns the batch untouched when lam == 1 (no mix drawn); `where` rather than
    # relying on x * 1 + y * 0 keeps it bit-exact even for non-finite pixels.
    out = jnp.where(lam == 1.0, images, jnp.where(use_cutmix, cut, blended))
    lam = jnp.where(use_cutmix, cut_lam, lam)

    targets = mix_targets(labels, lam, num_classes, label_smoothing)
    return (out, targets, lam) if return_lam else (out, targets)


def _erase_one(key, image, fills, *, prob, min_area, max_area, log_aspect, max_count):
    """RandomErasing of one [H, W, C] image with the fill of each box (see `random_erasing`)."""
    h, w, _ = image.shape
    # One uniform draw for all decisions: every jax.random call is its own threefry kernel,
    # and compiling those (not running them) is what they cost.
    per_box = 2 * _ERASE_ATTEMPTS + 2  # areas, aspects, top, left
    u = jax.random.uniform(key, (2 + max_count * per_box,))
    apply = u[0] < prob
    # timm: count ~ randint[1, max_count] per image, and each box's area is scaled by 1/count.
    count = 1 + _uniform_int(u[1], max_count)
    u_boxes = u[2:].reshape(max_count, per_box)
    for i in range(max_count):
        u_area, u_aspect = jnp.split(u_boxes[i, :-2], 2)
        # All attempts are drawn at once; the first one that fits is timm's accepted attempt.
        area = (min_area + (max_area - min_area) * u_area) * (h * w) / count
        aspect = jnp.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
        # jnp.round is round-half-to-even, like Python's round().
        eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        fits = (ew < w) & (eh < h)
        first = jnp.argmax(fits)  # index of the first True (0 when none, masked out below).
        eh, ew = eh[first], ew[first]
        # Python's randint(0, n) includes n: n + 1 positions.
        top = _uniform_int(u_boxes[i, -2], h - eh + 1)
        left = _uniform_int(u_boxes[i, -1], w - ew + 1)
        active = apply & fits.any() & (i < count)
        mask = box_mask(top, top + eh, left, left + ew, h, w) & active
        # Later boxes overwrite earlier ones where they overlap, as timm's in-place writes do.
        image = jnp.where(mask[:, :, None], fills[i], image)
    return image


def random_erasing(key: jax.Array, images: jax.Array, *, prob: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   max_aspect: Optional[float] = None, max_count: int = 1,
                   mode: str = "pixel") -> jax.Array:
    """timm `RandomErasing`, independently per sample of a [B, H, W, C] normalised batch.

    With probability `prob` a sample gets `count` boxes (count = max_count when it is 1, else
    uniform in [1, max_count]). Each box makes up to 10 attempts of
    area ~ U(min_area, max_area) * H * W / count and aspect ~ exp(U(log min_aspect,
    log max_aspect)), with h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect));
    the first attempt with h < H and w < W is placed at top ~ U{0..H-h}, left ~ U{0..W-w}
    (no box if none fits). The box is filled with
      'pixel': N(0, 1) per pixel and channel;  'rand': one N(0, 1) per channel;  'const': 0.
    Samples that are not erased are returned bit-identical.

    Args:
      key: PRNG key (e.g. from the 'augment' stream); samples use independent sub-keys.
      images: [B, H, W, C] float, normalised (the fill is N(0, 1) in that space).
      prob: probability that a sample is erased (timm's re_prob; the recipe uses 0.25).
      min_area / max_area: range of the box area as a fraction of H * W.
      min_aspect / max_aspect: range of the box's h / w; max_aspect None means 1 / min_aspect.
      max_count: most boxes per erased sample (timm's re_count; the recipe uses 1).
      mode: 'pixel' (the recipe's), 'rand' or 'const', as above.
    Returns:
      The batch, same shape and dtype.
    """
    mode = mode.lower()
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"random_erasing: mode={mode!r} must be 'pixel', 'rand' or 'const'.")
    if max_count < 1:
        raise ValueError(f"random_erasing: max_count={max_count} must be >= 1.")
    max_aspect = max_aspect or 1.0 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    b, h, w, c = images.shape
    k_boxes, k_fill = jax.random.split(key)
    # Fills for every possible box, drawn for the whole batch outside the vmap (a vmapped
    # normal of image size compiles far slower); only the pixels inside boxes are used.
    fill_shape = (b, max_count) + ((h, w, c) if mode == "pixel" else (1, 1, c))
    fills = (jnp.zeros(fill_shape, images.dtype) if mode == "const"
             else jax.random.normal(k_fill, fill_shape, images.dtype))
    erase = functools.partial(_erase_one, prob=prob, min_area=min_area, max_area=max_area,
                              log_aspect=log_aspect, max_count=max_count)
    return jax.vmap(erase)(jax.random.split(k_boxes, b), images, fills)
