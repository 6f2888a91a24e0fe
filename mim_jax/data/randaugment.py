"""RandAugment as in timm's `rand-m9-mstd0.5-inc1` (MAE / BEiT fine-tuning), in tf graph code.

Behaviour follows timm's `timm/data/auto_augment.py`, whose ops are PIL calls; every op here
reproduces its PIL counterpart on uint8 values (same integer arithmetic, same truncation),
so results match PIL exactly for the point and colour ops and to within rounding for the
resampling ones.  Per image, `num_ops` ops are drawn uniformly with replacement; each is
applied with probability `prob`, at a magnitude drawn from N(magnitude, magnitude_std)
clipped to [0, magnitude_max], with the sign of signed ops flipped with probability 1/2.

Differences from timm, all deliberate:
  * Randomness is stateless (an int64[2] seed), so an image's augmentation depends only on
    its seed: exactly resumable training.  The random streams differ from timm's.
  * Geometric ops always resample bilinearly: timm picks bilinear or bicubic (or the
    pipeline's interpolation, bicubic in MAE / BEiT), but TF's projective transform has no
    bicubic mode.
  * `inc0` selects the original (non-increasing) op set; timm reads any `inc` as 'on'.
  * Posterize to 0 bits (PosterizeIncreasing at magnitude 10) gives black, as older Pillow
    did; recent Pillow raises there, which would crash timm.
"""

import math
from typing import Tuple

from mim_jax.data.tf_setup import tf

# The policy (op sets, spec, parser) is TF-free so that config validation can use it.
from mim_jax.data.randaugment_policy import (  # noqa: F401  (re-exported)
    _LEVEL_DENOM, INCREASING_OPS, ORIGINAL_OPS, RandAugmentSpec, fill_from_mean, parse_policy)


# ------------------------------------------------------------------- point / colour ---
# Images are float32 [H, W, C] holding integers in [0, 255] (what a PIL uint8 image holds).


def _blend(degenerate, image, factor):
    """PIL Image.blend(degenerate, image, factor): computed in C float, then truncated."""
    out = degenerate + tf.cast(factor, tf.float32) * (image - degenerate)
    return tf.clip_by_value(tf.floor(out), 0.0, 255.0)


def _luma(image):
    """PIL's convert('L') of an RGB image, [H, W, 1]: fixed-point ITU-R 601-2, rounded."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471
    return tf.cast(tf.bitwise.right_shift(weighted + 32768, 16), tf.float32)


def _per_channel_lut(image, lut):
    """Applies an int [C, 256] lookup table to each channel (clipped, as PIL's point)."""
    channels_first = tf.transpose(tf.cast(image, tf.int32), [2, 0, 1])
    out = tf.gather(tf.clip_by_value(lut, 0, 255), channels_first, batch_dims=1)
    return tf.cast(tf.transpose(out, [1, 2, 0]), tf.float32)


def auto_contrast(image):
    """ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255]."""
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
    # Same double arithmetic and int() truncation as PIL's lookup table.
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    offset = -lo * scale
    stretched = tf.cast(tf.cast(image, tf.float64) * scale + offset, tf.int32)
    stretched = tf.cast(tf.clip_by_value(stretched, 0, 255), tf.float32)
    return tf.where(hi > lo, stretched, image)  # A constant channel is left alone.


def equalize(image):
    """ImageOps.equalize: per-channel histogram equalisation with PIL's integer steps."""
    channels = image.shape[-1]
    values = tf.cast(image, tf.int32)
    # One bincount for all channels: channel c counts into bins [256 c, 256 c + 256).
    flat = tf.reshape(values + 256 * tf.range(channels), [-1])
    hist = tf.math.bincount(flat, minlength=256 * channels, maxlength=256 * channels)
    hist = tf.reshape(hist, [channels, 256])
    # PIL leaves the count of the highest occurring value out of the step.
    last = tf.gather(hist, tf.reduce_max(values, axis=[0, 1]), batch_dims=1)
    step = ((tf.reduce_sum(hist, axis=1) - last) // 255)[:, None]
    lut = (step // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // tf.maximum(step, 1)
    # Fewer than two distinct values, or too few pixels for a step: identity.
    keep = (tf.math.count_nonzero(hist, axis=1, keepdims=True) <= 1) | (step == 0)
    return _per_channel_lut(image, tf.where(keep, tf.range(256)[None, :], lut))


def invert(image):
    return 255.0 - image


def posterize(image, bits):
    """ImageOps.posterize: keep the `bits` (0..8) most significant bits."""
    step = tf.pow(2.0, tf.cast(8 - tf.clip_by_value(bits, 0, 8), tf.float32))
    return tf.floor(image / step) * step


def solarize(image, threshold):
    """ImageOps.solarize: invert values >= threshold (256: no change)."""
    return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image, addition, threshold=128):
    """timm's solarize_add: add to values below threshold, saturating at 255."""
    added = tf.minimum(image + tf.cast(addition, tf.float32), 255.0)
    return tf.where(image < tf.cast(threshold, tf.float32), added, image)


def color(image, factor):
    """ImageEnhance.Color; a gray image is its own degenerate, so it is unchanged."""
    if image.shape[-1] == 1:
        return image
    return _blend(_luma(image), image, factor)


def contrast(image, factor):
    """ImageEnhance.Contrast: blend with the rounded mean of the gray image."""
    gray = tf.cast(image if image.shape[-1] == 1 else _luma(image), tf.int64)
    mean = tf.cast(tf.reduce_sum(gray), tf.float64) / tf.cast(tf.size(gray), tf.float64)
    degenerate = tf.cast(tf.floor(mean + 0.5), tf.float32)
    return _blend(degenerate, image, factor)


def brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def color_jitter(image, seed, strength: float):
    """torchvision's ColorJitter(strength, strength, strength) on a PIL image (BEiT's
    pretraining input): brightness, contrast and saturation factors each drawn from
    U[max(0, 1 - strength), 1 + strength] and applied in a random order. float32 [H, W, C] in
    [0, 255] + int64[2] seed -> same layout, quantised like a uint8 PIL image."""
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    factors = tf.random.stateless_uniform([3], factor_seed, max(0.0, 1.0 - strength),
                                          1.0 + strength)
    order = tf.argsort(tf.random.stateless_uniform([3], order_seed))
    ops = (brightness, contrast, color)
    for position in range(3):
        branches = [lambda op=op, j=j, im=image: op(im, factors[j]) for j, op in enumerate(ops)]
        image = tf.switch_case(order[position], branches)
    return image


def sharpness(image, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, sum 13)."""
    channels = image.shape[-1]
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    # Integer sums are exact in float32; PIL rounds them (+0.5, truncate).
    total = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "SAME")[0]
    smooth = tf.floor(total / 13.0 + 0.5)
    # PIL's filter copies the outermost rows and columns unfiltered.
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
    border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
    degenerate = tf.where(border[..., None], image, smooth)
    return _blend(degenerate, image, factor)


# --------------------------------------------------------------------- geometric ---


def affine(image, matrix, fill):
    """PIL Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill).

    `matrix` (a, b, c, d, e, f) maps an output pixel centre (x, y) to the input point
    (a x + b y + c, d x + e y + f), in PIL's coordinates (pixel centres at +0.5).
    """
    a, b, c, d, e, f = (tf.cast(v, tf.float64) for v in matrix)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    # TF samples at pixel indices (centres at +0): fold the half-pixel shifts into the offsets.
    transform = tf.stack([a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2, 0.0, 0.0])
    # fill_mode NEAREST clamps at the edges, as PIL's bilinear filter does near the border.
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.cast(transform, tf.float32)[None],
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )[0]
    # PIL fills exactly the pixels whose centre maps outside the input; decided in double.
    ys = tf.range(h, dtype=tf.float64)[:, None] + 0.5
    xs = tf.range(w, dtype=tf.float64)[None, :] + 0.5
    x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    # PIL truncates its double result.  TF interpolates in float32, so a value within ~1e-5
    # of an integer (often an exact integer, at round shear / shift factors) may land on
    # the other side: some values are 1 off.  An epsilon before the floor made it worse.
    pixels = tf.floor(warped)
    return tf.where(inside[..., None], pixels, tf.constant(fill, tf.float32))


def rotate(image, degrees, fill):
    """Image.rotate(degrees) about the centre (counter-clockwise), same size."""
    shape = tf.cast(tf.shape(image), tf.float64)
    cx, cy = shape[1] / 2, shape[0] / 2
    angle = -tf.cast(degrees, tf.float64) * (math.pi / 180)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # PIL's matrix: rotate about the origin, shifted so that the centre stays put.
    matrix = (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)
    return affine(image, matrix, fill)


# ------------------------------------------------------ magnitude -> op argument ---
# timm's LEVEL_TO_ARG on the float64 level (Python's double arithmetic; int() = floor for
# the non-negative levels used here).  Table entries: (image, level, negate, fill) -> image.


def _fraction(level, scale):
    return level / _LEVEL_DENOM * scale


def _signed(level, scale, negate):
    value = _fraction(level, scale)
    return tf.where(negate, -value, value)


def _enhance(level):
    return _fraction(level, 1.8) + 0.1


def _enhance_increasing(level, negate):
    # 1.0 is 'no change'; timm moves away from it either way and keeps the factor >= 0.1.
    return tf.maximum(1.0 + _signed(level, 0.9, negate), 0.1)


def _posterize_bits(level):
    return tf.cast(tf.floor(_fraction(level, 4.0)), tf.int32)


def _solarize_threshold(level):
    return tf.minimum(tf.floor(_fraction(level, 256.0)), 256.0)


def _translate(level, negate, image, axis):
    # TranslateXRel / YRel: a fraction (0.45 at level 10) of the width / height.
    return _signed(level, 0.45, negate) * tf.cast(tf.shape(image)[axis], tf.float64)


_OPS = {
    "AutoContrast": lambda im, lv, ng, fill: auto_contrast(im),
    "Equalize": lambda im, lv, ng, fill: equalize(im),
    "Invert": lambda im, lv, ng, fill: invert(im),
    "Rotate": lambda im, lv, ng, fill: rotate(im, _signed(lv, 30.0, ng), fill),
    "Posterize": lambda im, lv, ng, fill: posterize(im, _posterize_bits(lv)),
    "PosterizeIncreasing": lambda im, lv, ng, fill: posterize(im, 4 - _posterize_bits(lv)),
    "Solarize": lambda im, lv, ng, fill: solarize(im, _solarize_threshold(lv)),
    "SolarizeIncreasing": lambda im, lv, ng, fill: solarize(im, 256.0 - _solarize_threshold(lv)),
    "SolarizeAdd": lambda im, lv, ng, fill: solarize_add(
        im, tf.minimum(tf.floor(_fraction(lv, 110.0)), 128.0)
    ),
    "Color": lambda im, lv, ng, fill: color(im, _enhance(lv)),
    "ColorIncreasing": lambda im, lv, ng, fill: color(im, _enhance_increasing(lv, ng)),
    "Contrast": lambda im, lv, ng, fill: contrast(im, _enhance(lv)),
    "ContrastIncreasing": lambda im, lv, ng, fill: contrast(im, _enhance_increasing(lv, ng)),
    "Brightness": lambda im, lv, ng, fill: brightness(im, _enhance(lv)),
    "BrightnessIncreasing": lambda im, lv, ng, fill: brightness(im, _enhance_increasing(lv, ng)),
    "Sharpness": lambda im, lv, ng, fill: sharpness(im, _enhance(lv)),
    "SharpnessIncreasing": lambda im, lv, ng, fill: sharpness(im, _enhance_increasing(lv, ng)),
    # Affine matrices as timm passes them to PIL's Image.transform.
    "ShearX": lambda im, lv, ng, fill: affine(im, (1, _signed(lv, 0.3, ng), 0, 0, 1, 0), fill),
    "ShearY": lambda im, lv, ng, fill: affine(im, (1, 0, 0, _signed(lv, 0.3, ng), 1, 0), fill),
    "TranslateXRel": lambda im, lv, ng, fill: affine(
        im, (1, 0, _translate(lv, ng, im, 1), 0, 1, 0), fill
    ),
    "TranslateYRel": lambda im, lv, ng, fill: affine(
        im, (1, 0, 0, 0, 1, _translate(lv, ng, im, 0)), fill
    ),
}


def op_names(increasing: bool = True) -> Tuple[str, ...]:
    return INCREASING_OPS if increasing else ORIGINAL_OPS


# No autograph: the control flow here is explicit (switch_case / cond), and converting the
# op table's many small functions made tracing (once per tf.data epoch) ~4x slower.
@tf.autograph.experimental.do_not_convert
def apply_op(image, op_index, magnitude, fill, negate=False, increasing=True):
    """Applies op `op_names(increasing)[op_index]` at `magnitude` (timm's 0..10 scale).

    `image` holds integers in [0, 255] (float32 [H, W, C]); `negate` flips the sign of the
    signed ops (rotate, shear, translate, the increasing enhance ops).
    """
    level = tf.cast(magnitude, tf.float64)
    negate = tf.cast(negate, tf.bool)
    fill = tuple(float(v) for v in fill)
    branches = [
        (lambda fn=_OPS[name]: tf.ensure_shape(fn(image, level, negate, fill), image.shape))
        for name in op_names(increasing)
    ]
    return tf.switch_case(tf.cast(op_index, tf.int32), branches)


def _sample_magnitude(seed, spec: RandAugmentSpec):
    if spec.magnitude_std == math.inf:
        magnitude = tf.random.stateless_uniform([], seed, 0.0, spec.magnitude, tf.float64)
    elif spec.magnitude_std > 0:
        noise = tf.random.stateless_normal([], seed, dtype=tf.float64)
        magnitude = spec.magnitude + spec.magnitude_std * noise
    else:
        magnitude = tf.constant(spec.magnitude, tf.float64)
    return tf.clip_by_value(magnitude, 0.0, spec.magnitude_max)


@tf.autograph.experimental.do_not_convert
def rand_augment(image, seed, spec: RandAugmentSpec, fill):
    """float32 [H, W, C] in [0, 255] + int64[2] seed -> RandAugmented image, same layout.

    `fill` (one value per channel, e.g. `fill_from_mean(mean)`) colours the area that
    geometric ops uncover.  The output depends only on (image, seed, spec, fill).
    """
    image = tf.ensure_shape(image, [None, None, len(fill)])
    # timm augments uint8 PIL images: quantise once so every op sees such values.
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    layer_seeds = tf.random.experimental.stateless_split(seed, spec.num_ops)
    num_choices = len(op_names(spec.increasing))

    def layer(i, image):
        seeds = tf.unstack(tf.random.experimental.stateless_split(layer_seeds[i], 4))
        op_index = tf.random.stateless_uniform([], seeds[0], 0, num_choices, tf.int32)
        applied = tf.random.stateless_uniform([], seeds[1]) < spec.prob
        magnitude = _sample_magnitude(seeds[2], spec)
        negate = tf.random.stateless_uniform([], seeds[3]) < 0.5  # timm's _randomly_negate.
        image = tf.cond(
            applied,
            lambda: apply_op(image, op_index, magnitude, fill, negate, spec.increasing),
            lambda: image,
        )
        return i + 1, image

    # A loop rather than a Python for: the 15-way switch is traced once, not num_ops times.
    _, image = tf.while_loop(lambda i, _: i < spec.num_ops, layer, (tf.constant(0), image))
    return image
