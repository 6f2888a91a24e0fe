"""Decoding and augmentation of single encoded images (tf graph code).

All randomness is *stateless* and driven by an explicit int64 seed pair, so
an image's augmentation depends only on that seed -- not on thread
scheduling, parallelism or how many elements were processed before it.
This is what makes resuming at an arbitrary step bitwise exact.

Every function returns float32 pixels in [0, 255]; `to_uint8` rounds them for the
host -> device transfer, and normalisation happens on the device
(mim_jax.data.normalize_images).
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
    color_jitter: float = 0.0  # 0: off.

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
            color_jitter=float(cfg.get("color_jitter", 0.0)),
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A PNG starts with its signature (8 bytes) and the IHDR chunk: length and type (8 bytes),
# width and height (8 bytes), then one byte of bit depth.
_PNG_BIT_DEPTH_OFFSET = 24


def _is_16bit_png(encoded):
    def bit_depth_is_16():
        depth = tf.strings.substr(encoded, _PNG_BIT_DEPTH_OFFSET, 1)
        return tf.equal(depth, b"\x10")

    signature = tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE))
    # Byte 24 is read only from a PNG: reading it from a shorter file (a tiny GIF, say)
    # would fail and drop a valid image.
    return tf.cond(
        tf.equal(signature, _PNG_SIGNATURE), bit_depth_is_16, lambda: tf.constant(False)
    )


def _round_uint16_to_uint8(image):
    """uint16 -> uint8, v -> round(v * 255 / 65535): 0 and 65535 map to 0 and 255."""
    # TF's own narrowing (decode_image(dtype=uint8), convert_image_dtype) keeps the high
    # byte, v // 256: it scales by 1/256 instead of 1/257 and floors, so about a fifth of
    # the samples end up one level above or below the nearest 8-bit level (the value an
    # 8-bit export of the image holds).  int32 holds 65535 * 255 + 32767 without overflow.
    wide = tf.cast(image, tf.int32)
    return tf.cast((wide * 255 + 32767) // 65535, tf.uint8)


def _decode_native(encoded):
    """Any supported format -> uint8 [h, w, c], c its stored layout (1 to 4)."""

    def png16():
        return _round_uint16_to_uint8(tf.io.decode_png(encoded, channels=0, dtype=tf.uint16))

    def uint8():
        # Palette PNGs come out as RGB, or RGBA when they have a transparent colour;
        # CMYK JPEGs as RGB (TF converts them itself).
        return tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)

    # 8-bit files keep the plain decoder, so their pixels are exactly what they were.
    return tf.cond(_is_16bit_png(encoded), png16, uint8)


def decode_any(encoded, channels: int):
    """Decodes JPEG / PNG (8 or 16 bit) / BMP / GIF (first frame) / WebP to uint8."""
    # The stored layout is decoded and `to_channels` converts it, because not every
    # decoder can convert itself: GIF only produces RGB, and libjpeg has no CMYK ->
    # grayscale conversion (asked for channels=1 it fails on a valid CMYK JPEG).
    return to_channels(_decode_native(encoded), channels)


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


# Colour components of a CMYK (or YCCK) JPEG, as `extract_jpeg_shape` reports them.
_JPEG_CMYK_COMPONENTS = 4


def _decode_jpeg_window(encoded, window, components, channels: int, ratio: int = 1):
    """The window [y, x, h, w] of a JPEG with `components` colour components -> uint8
    [h, w, channels]; only the window is decoded.  With `ratio` 2, 4 or 8 libjpeg decodes
    the image scaled down by that factor in the DCT domain (far cheaper than a full decode)
    and `window` is in the coordinates of that scaled image."""

    def direct():
        # libjpeg converts while decoding; for gray output of a YCbCr JPEG it reads only
        # the luma plane, the cheapest way there.
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels, ratio=ratio)

    def via_rgb():
        # libjpeg cannot convert CMYK to one channel ("Unsupported color conversion
        # request"): the valid image would be dropped as corrupt.  TF does convert CMYK
        # to RGB, and RGB becomes gray as for any colour image.
        rgb = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, ratio=ratio)
        return to_channels(rgb, channels)

    if channels == 3:
        image = direct()  # Gray, YCbCr and CMYK all decode straight to RGB.
    else:
        image = tf.cond(tf.equal(components, _JPEG_CMYK_COMPONENTS), via_rgb, direct)
    return tf.ensure_shape(image, [None, None, channels])


def decode_random_crop(encoded, seed, channels: int, scale, ratio):
    """Decodes a random crop; JPEGs decode only the cropped window."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        y, x, h, w = _sample_crop(shape, seed, scale, ratio)
        # Decoding only the window is the main CPU saving of this pipeline.
        return _decode_jpeg_window(encoded, tf.stack([y, x, h, w]), shape[2], channels)

    return tf.cond(tf.io.is_jpeg(encoded), jpeg,
                   lambda: _decode_whole_then_crop(encoded, seed, channels, scale, ratio))


def _decode_whole_then_crop(encoded, seed, channels: int, scale, ratio):
    """Non-JPEG formats cannot decode a window: decode everything, then crop."""
    image = decode_any(encoded, channels)
    y, x, h, w = _sample_crop(tf.shape(image), seed, scale, ratio)
    return image[y : y + h, x : x + w, :]


# tf.image.resize(..., antialias=True) is ScaleAndTranslate with these kernels.
_SCALE_AND_TRANSLATE_KERNELS = {"bicubic": "keyscubic", "bilinear": "triangle"}
# DCT-domain scale factors libjpeg offers (TF's `ratio`), largest first.
_JPEG_RATIOS = (8, 4, 2)


def _jpeg_ratio_index(h, w, size: int):
    """Branch index into (1,) + _JPEG_RATIOS[::-1]: the largest r in 2, 4, 8 with the window
    at least r x the output size in both dimensions (0: decode at full scale)."""
    short = tf.minimum(h, w)
    index = tf.constant(0)
    for i, r in enumerate(_JPEG_RATIOS[::-1], start=1):
        index = tf.where(short >= r * size, i, index)
    return index


def _decode_jpeg_crop_resized(encoded, shape, window, size: int, interpolation: str,
                              channels: int):
    """The crop `window` (y, x, h, w) of a JPEG of `shape`, resized to [size, size] float32.

    A window at least 2x (4x, 8x) the output in both dimensions is decoded at 1/2 (1/4, 1/8)
    scale by libjpeg's scaled IDCT -- the full-resolution IDCT, chroma upsampling and colour
    conversion, and 3/4 or more of the antialiased resize's input are skipped (the entropy
    decoding is not: ~15-30% less CPU per large image) -- and the exact (sub-pixel) window is
    then resampled from it with the same antialiased kernel as `resize`.  The result matches the
    full-resolution path to within a few levels (see tests/test_data.py)."""
    y, x, h, w = window
    kernel = _SCALE_AND_TRANSLATE_KERNELS[interpolation]

    def full():
        image = _decode_jpeg_window(encoded, tf.stack([y, x, h, w]), shape[2], channels)
        return resize(image, size, interpolation)

    def scaled(r):
        def branch():
            # libjpeg's scaled size is ceil(side / r).  Decode the r-aligned cover of the
            # window: scaled pixel i holds original pixels [i r, (i + 1) r).
            rows, cols = (shape[0] + r - 1) // r, (shape[1] + r - 1) // r
            y0, x0 = y // r, x // r
            y1 = tf.minimum((y + h + r - 1) // r, rows)
            x1 = tf.minimum((x + w + r - 1) // r, cols)
            image = _decode_jpeg_window(encoded, tf.stack([y0, x0, y1 - y0, x1 - x0]),
                                        shape[2], channels, ratio=r)
            # The window in the decoded image's (continuous) coordinates: start
            # (y - y0 r) / r, extent h / r; ScaleAndTranslate maps output pixel centres
            # o + 0.5 to input (o + 0.5 - translation) / scale.
            extent = tf.cast(tf.stack([h, w]), tf.float32) / r
            start = tf.cast(tf.stack([y - y0 * r, x - x0 * r]), tf.float32) / r
            scale = tf.constant(float(size)) / extent
            out = tf.raw_ops.ScaleAndTranslate(
                images=tf.expand_dims(image, 0), size=tf.constant([size, size]), scale=scale,
                translation=-start * scale, kernel_type=kernel, antialias=True)[0]
            return tf.clip_by_value(out, 0.0, 255.0)
        return branch

    branches = [full] + [scaled(r) for r in _JPEG_RATIOS[::-1]]
    out = tf.switch_case(_jpeg_ratio_index(h, w, size), branches)
    return tf.ensure_shape(out, [size, size, channels])


def random_crop_resized(encoded, seed, channels: int, scale, ratio, size: int,
                        interpolation: str):
    """RandomResizedCrop: a random window resized to float32 [size, size, channels].

    JPEGs decode only the window, and a large window at a reduced DCT scale; other formats
    decode whole, then crop and resize."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        window = _sample_crop(shape, seed, scale, ratio)
        return _decode_jpeg_crop_resized(encoded, shape, window, size, interpolation, channels)

    def other():
        crop = _decode_whole_then_crop(encoded, seed, channels, scale, ratio)
        return resize(crop, size, interpolation)

    out = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(out, [size, size, channels])


def resize(image, size: int, interpolation: str):
    """uint8 [h, w, c] -> float32 [size, size, c] in [0, 255]."""

    def resample(antialias):
        def fn():
            out = tf.image.resize(image, (size, size), method=interpolation,
                                  antialias=antialias)
            # Bicubic overshoots; keep pixel values valid.
            return tf.clip_by_value(out, 0.0, 255.0)
        return fn

    def scale():
        # antialias=True: downscaling large crops without it aliases badly
        # (PIL, which reference MAE recipes use, always filters).  Antialiasing only
        # widens the kernel where the image shrinks, so an enlargement in both dimensions
        # takes the plain kernel (ResizeBicubic / ResizeBilinear): the same result up to
        # float rounding (tests/test_data.py) at about half the CPU time.
        enlarge = tf.logical_and(shape[0] <= size, shape[1] <= size)
        return tf.cond(enlarge, resample(False), resample(True))

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


def _crop_resized(encoded, seed, spec: ImageSpec):
    """The geometric part of train_image before the flip: float32 [S, S, C] in [0, 255], and
    the flip's seed."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if spec.crop_scale is None:
        image = resize(decode_any(encoded, spec.channels), spec.image_size, spec.interpolation)
    else:
        image = random_crop_resized(encoded, crop_seed, spec.channels, spec.crop_scale,
                                    spec.crop_ratio, spec.image_size, spec.interpolation)
    return image, flip_seed


def train_image(encoded, seed, spec: ImageSpec):
    """Encoded bytes + int64[2] seed -> augmented float32 [S, S, C]."""
    image, flip_seed = _crop_resized(encoded, seed, spec)
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    if spec.color_jitter > 0:
        # split(seed, 4)'s fourth key: independent of the crop, flip and RandAugment keys.
        jitter_seed = tf.random.experimental.stateless_split(seed, num=4)[3]
        image = randaugment_lib.color_jitter(image, jitter_seed, spec.color_jitter)
    if spec.randaugment is not None:
        # split(seed, 3) extends split(seed, 2) (one counter-based stream): its third key is
        # independent of the crop and flip keys, which stay as they were.
        ra_seed = tf.random.experimental.stateless_split(seed, num=3)[2]
        fill = randaugment_lib.fill_from_mean(spec.mean)
        image = randaugment_lib.rand_augment(image, ra_seed, spec.randaugment, fill)
    return image


def train_image_uint8(encoded, seed, spec: ImageSpec):
    """to_uint8(train_image(encoded, seed, spec)), what the training pipeline hands on.

    Without colour jitter or RandAugment (the pretraining recipes) the image is rounded right
    after the resize, which already clipped it to [0, 255], and flipped as uint8: a flip only
    moves pixels, so it commutes with the rounding, and it then moves a quarter of the bytes.
    The same pixels, ~0.2 ms less CPU per 224 px image."""
    if spec.color_jitter > 0 or spec.randaugment is not None:
        return to_uint8(train_image(encoded, seed, spec))
    image, flip_seed = _crop_resized(encoded, seed, spec)
    image = tf.cast(tf.round(image), tf.uint8)
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image


def eval_image(encoded, spec: ImageSpec):
    """Deterministic: center square crop, then resize.  float32 [S, S, C]."""
    image = center_square_crop(decode_any(encoded, spec.channels))
    return resize(image, spec.image_size, spec.interpolation)


def to_uint8(image):
    """float32 pixels -> uint8, rounded half to even and clipped to [0, 255] (what PIL's
    resize, which the reference timm pipelines use, hands on)."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def normalize(image, mean, std):
    """Reference (host, float32) normalisation; the pipelines normalise on the device."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image / 255.0 - mean) / std
