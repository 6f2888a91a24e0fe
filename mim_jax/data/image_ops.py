"""Decoding and augmentation of single encoded images (tf graph code).

All randomness is *stateless* and driven by an explicit int64 seed pair, so
an image's augmentation depends only on that seed -- not on thread
scheduling, parallelism or how many elements were processed before it.
This is what makes resuming at an arbitrary step bitwise exact.

Every function returns float32 pixels in [0, 255]; normalisation is separate.
"""

import dataclasses
from typing import Optional, Tuple

from mim_jax.data import randaugment as randaugment_lib
from mim_jax.data.tf_setup import tf


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Plain, hashable copy of the config fields the graph code needs."""

    image_size: int
    channels: int
    crop_scale: Optional[Tuple[float, float]]
    crop_ratio: Tuple[float, float]
    interpolation: str
    flip: bool
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    randaugment: Optional[randaugment_lib.RandAugmentSpec] = None  # None: off.

    @classmethod
    def from_config(cls, cfg) -> "ImageSpec":
        return cls(
            image_size=int(cfg.image_size),
            channels=int(cfg.channels),
            crop_scale=(
                None if cfg.crop_scale is None else tuple(float(v) for v in cfg.crop_scale)
            ),
            crop_ratio=tuple(float(v) for v in cfg.crop_ratio),
            interpolation=str(cfg.interpolation),
            flip=bool(cfg.flip),
            mean=tuple(float(v) for v in cfg.mean),
            std=tuple(float(v) for v in cfg.std),
            randaugment=(
                None
                if cfg.get("randaugment") is None
                else randaugment_lib.parse_policy(cfg.randaugment)
            ),
        )


_FULL_IMAGE_BOX = ((0.0, 0.0, 1.0, 1.0),)
# Tries before the sampler falls back to the whole image; 10 as in the usual
# RandomResizedCrop.
_CROP_ATTEMPTS = 10


def to_channels(image, channels: int):
    """uint8 [h, w, c] with any c in 1..4 -> uint8 [h, w, channels]."""
    c = tf.shape(image)[-1]
    has_color = c >= 3  # RGB or RGBA; 1 = gray, 2 = gray + alpha.
    if channels == 3:
        out = tf.cond(has_color, lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3]))
    else:
        # Gray inputs are passed through untouched (no rgb->gray round trip).
        out = tf.cond(
            has_color, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1]
        )
    return tf.ensure_shape(out, [None, None, channels])


def decode_any(encoded, channels: int):
    """Decodes JPEG / PNG / BMP / GIF (first frame) / WebP to uint8."""
    # channels=0 keeps the native layout; the conversion is done by
    # `to_channels` because not every format's decoder can convert itself
    # (GIF, for one, only produces RGB).
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
    return to_channels(image, channels)


def _sample_crop(image_shape, seed, scale, ratio):
    """RandomResizedCrop window -> (offset_y, offset_x, height, width)."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([_FULL_IMAGE_BOX], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=_CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[0], begin[1], size[0], size[1]


def decode_random_crop(encoded, seed, channels: int, scale, ratio):
    """Decodes a random crop; JPEGs decode only the cropped window."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        y, x, h, w = _sample_crop(shape, seed, scale, ratio)
        # Decoding only the window is the main CPU saving of this pipeline.
        image = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=channels)
        return tf.ensure_shape(image, [None, None, channels])

    def other():
        image = decode_any(encoded, channels)
        y, x, h, w = _sample_crop(tf.shape(image), seed, scale, ratio)
        return image[y : y + h, x : x + w, :]

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def resize(image, size: int, interpolation: str):
    """uint8 [h, w, c] -> float32 [size, size, c] in [0, 255]."""

    def scale():
        # antialias=True: downscaling large crops without it aliases badly
        # (PIL, which reference MAE recipes use, always filters).
        out = tf.image.resize(image, (size, size), method=interpolation, antialias=True)
        # Bicubic overshoots; keep pixel values valid.
        return tf.clip_by_value(out, 0.0, 255.0)

    shape = tf.shape(image)
    # Already the right size (pre-resized data, uncropped small images): keep
    # the exact pixels and save the work.
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    out = tf.cond(same, lambda: tf.cast(image, tf.float32), scale)
    return tf.ensure_shape(out, [size, size, None])


def center_square_crop(image):
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.minimum(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return image[y : y + side, x : x + side, :]


def train_image(encoded, seed, spec: ImageSpec):
    """Encoded bytes + int64[2] seed -> augmented float32 [S, S, C]."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if spec.crop_scale is None:
        image = decode_any(encoded, spec.channels)
    else:
        image = decode_random_crop(
            encoded, crop_seed, spec.channels, spec.crop_scale, spec.crop_ratio
        )
    image = resize(image, spec.image_size, spec.interpolation)
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    if spec.randaugment is not None:
        # split(seed, 3) extends split(seed, 2) (one counter-based stream): its third key is
        # independent of the crop and flip keys, which stay as they were.
        ra_seed = tf.random.experimental.stateless_split(seed, num=3)[2]
        fill = randaugment_lib.fill_from_mean(spec.mean)
        image = randaugment_lib.rand_augment(image, ra_seed, spec.randaugment, fill)
    return image


def eval_image(encoded, spec: ImageSpec):
    """Deterministic: center square crop, then resize.  float32 [S, S, C]."""
    image = center_square_crop(decode_any(encoded, spec.channels))
    return resize(image, spec.image_size, spec.interpolation)


def normalize(image, mean, std):
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image / 255.0 - mean) / std
