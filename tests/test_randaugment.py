"""Tests of RandAugment (mim_jax.data.randaugment): each op against the PIL call timm makes,
stateless determinism, the policy parser and the wiring into the input pipeline."""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest

import mim_jax.data as data
from mim_jax.data import image_ops
from mim_jax.data import randaugment as ra
from mim_jax.data.tf_setup import tf

FILL = (124, 116, 104)  # timm's fill for the ImageNet mean.
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# Ops whose 'original' variant differs from the increasing one (the rest are shared).
ORIGINAL_ONLY = ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")


def _random_image(channels, seed=0, shape=(29, 37)):
    # Odd, non-square size: catches x / y swaps and half-pixel offsets.
    return np.random.default_rng(seed).integers(0, 256, (*shape, channels), np.uint8)


def _pil(array):
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _timm_reference(array, name, magnitude, negate):
    """timm's AugmentOp at a fixed magnitude and sign, written out from auto_augment.py."""
    img = _pil(array)
    level = magnitude / 10.0
    sign = -1.0 if negate else 1.0
    fill = FILL[0] if array.shape[-1] == 1 else FILL
    geometric = dict(resample=Image.BILINEAR, fillcolor=fill)
    increasing = max(0.1, 1.0 + sign * level * 0.9)
    original = level * 1.8 + 0.1
    solarize_add = min(128, int(level * 110))
    affine = {
        "ShearX": (1, sign * level * 0.3, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, sign * level * 0.3, 1, 0),
        "TranslateXRel": (1, 0, sign * level * 0.45 * img.size[0], 0, 1, 0),
        "TranslateYRel": (1, 0, 0, 0, 1, sign * level * 0.45 * img.size[1]),
    }
    if name in affine:
        out = img.transform(img.size, Image.AFFINE, affine[name], **geometric)
    elif name == "Rotate":
        out = img.rotate(sign * level * 30.0, **geometric)
    elif name in ("Posterize", "PosterizeIncreasing"):
        bits = int(level * 4) if name == "Posterize" else 4 - int(level * 4)
        if bits >= 8:
            out = img
        elif bits <= 0:
            # Recent Pillow (13.0 here) refuses 0 bits, so timm raises at magnitude 10;
            # older Pillow masked every bit away, i.e. black, which is what we do.
            out = Image.new(img.mode, img.size, 0)
        else:
            out = ImageOps.posterize(img, bits)
    elif name in ("Solarize", "SolarizeIncreasing"):
        threshold = min(256, int(level * 256))
        out = ImageOps.solarize(img, threshold if name == "Solarize" else 256 - threshold)
    elif name == "SolarizeAdd":
        lut = [min(255, i + solarize_add) if i < 128 else i for i in range(256)]
        out = img.point(lut * len(img.getbands()))
    elif name.replace("Increasing", "") in ("Color", "Contrast", "Brightness", "Sharpness"):
        enhancer = getattr(ImageEnhance, name.replace("Increasing", ""))
        out = enhancer(img).enhance(increasing if name.endswith("Increasing") else original)
    else:
        out = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
               "Invert": ImageOps.invert}[name](img)  # fmt: skip
    return np.asarray(out).reshape(array.shape)


def _apply(array, name, magnitude, negate):
    increasing = name in ra.INCREASING_OPS
    index = ra.op_names(increasing).index(name)
    out = ra.apply_op(tf.constant(array, tf.float32), index, magnitude, FILL[: array.shape[-1]],
                      negate, increasing)  # fmt: skip
    return out.numpy()


# (magnitude, negate): the recipe's mean, an off-grid level with the sign flipped, the maximum.
SETTINGS = [(9.0, False), (6.4, True), (10.0, True)]


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", ra.INCREASING_OPS + ORIGINAL_ONLY)
def test_op_matches_pil(name, channels):
    array = _random_image(channels)
    for magnitude, negate in SETTINGS:
        ours = _apply(array, name, magnitude, negate)
        ref = _timm_reference(array, name, magnitude, negate).astype(np.float32)
        assert ours.shape == array.shape and ours.dtype == np.float32
        diff = np.abs(ours - ref)
        if name in GEOMETRIC:
            # PIL interpolates in double and truncates; TF's kernel works in float32.  Where
            # the exact result is (within ~1e-5 of) an integer -- frequent at round factors
            # such as 0.3 or 0.45 * 37 -- rounding noise picks the side of the truncation:
            # +-1 on up to ~3% of the values (measured mean abs diff <= 0.028), never more.
            assert diff.max() <= 1, (name, magnitude, negate)
            assert diff.mean() <= 0.05, (name, magnitude, negate, diff.mean())
        else:
            # Same integer arithmetic, float32 blends and truncation as PIL: exact.
            np.testing.assert_array_equal(ours, ref, err_msg=f"{name} m={magnitude} {negate}")


def test_color_is_identity_on_gray_and_geometric_ops_fill():
    gray = _random_image(1)
    np.testing.assert_array_equal(_apply(gray, "ColorIncreasing", 10.0, True), gray)
    # A full-strength translation uncovers 45% of the image, filled with the given colour.
    out = _apply(_random_image(3), "TranslateXRel", 10.0, False)
    np.testing.assert_array_equal(out[:, -10:], np.broadcast_to(FILL, out[:, -10:].shape))


def _rand_augment(array, seed, policy="rand-m9-mstd0.5-inc1"):
    spec = ra.parse_policy(policy)
    fill = FILL[: array.shape[-1]]
    return ra.rand_augment(tf.constant(array, tf.float32), tf.constant(seed, tf.int64), spec, fill)


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_shape_dtype_range(channels):
    # Not integer-valued, slightly out of range: what a bicubic resize hands over.
    array = np.random.default_rng(1).uniform(-3.0, 258.0, (24, 20, channels)).astype(np.float32)
    for i in range(6):
        out = _rand_augment(array, [7, i]).numpy()
        assert out.shape == array.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, np.round(out))  # uint8 values, as PIL's


def test_rand_augment_is_a_function_of_the_seed():
    array = _random_image(3)
    a = _rand_augment(array, [3, 11]).numpy()
    np.testing.assert_array_equal(a, _rand_augment(array, [3, 11]).numpy())
    # tf.data runs it as a graph: same result as eager.
    graph = tf.function(lambda x, s: ra.rand_augment(x, s, ra.parse_policy("rand-m9-inc1"), FILL))
    eager = ra.rand_augment(tf.constant(array, tf.float32), tf.constant([3, 11], tf.int64),
                            ra.parse_policy("rand-m9-inc1"), FILL)  # fmt: skip
    np.testing.assert_array_equal(
        graph(tf.constant(array, tf.float32), tf.constant([3, 11], tf.int64)).numpy(), eager
    )
    # Each op is skipped with p=0.5, so one other seed may give the same image; eight not.
    others = [_rand_augment(array, [3, s]).numpy() for s in range(12, 20)]
    assert any(not np.array_equal(a, o) for o in others)


def test_one_op_always_applied_is_one_of_the_ops():
    # n1, p1, fixed magnitude: the output must be exactly one op at magnitude 10, either sign.
    array = _random_image(3, shape=(12, 14))
    candidates = [
        _apply(array, name, 10.0, negate) for name in ra.INCREASING_OPS for negate in (False, True)
    ]
    for seed in range(4):
        out = _rand_augment(array, [5, seed], "rand-n1-p1-m10-mstd0-inc1").numpy()
        assert any(np.array_equal(out, c) for c in candidates)
    # p0: nothing is applied.
    np.testing.assert_array_equal(_rand_augment(array, [5, 0], "rand-p0-inc1").numpy(), array)


def test_parse_policy():
    recipe = ra.parse_policy("rand-m9-mstd0.5-inc1")
    assert recipe == ra.RandAugmentSpec()  # The defaults are the MAE / BEiT recipe.
    assert recipe.num_ops == 2 and recipe.magnitude == 9 and recipe.magnitude_std == 0.5
    assert recipe.magnitude_max == 10 and recipe.increasing and recipe.prob == 0.5
    hash(recipe)  # Part of the (hashable) ImageSpec.
    # Absent sections take timm's defaults: m10, mstd0, original op set.
    assert ra.parse_policy("rand") == ra.RandAugmentSpec(magnitude=10, magnitude_std=0,
                                                         increasing=False)  # fmt: skip
    spec = ra.parse_policy("rand-n3-m7.5-p0.8-mmax12-mstd101-inc0")
    assert (spec.num_ops, spec.magnitude, spec.prob, spec.magnitude_max) == (3, 7.5, 0.8, 12)
    assert spec.magnitude_std == float("inf") and not spec.increasing  # mstd > 100: uniform


@pytest.mark.parametrize(
    "policy",
    ["", "augmix-m9", "rand-m9-foo", "rand-m9-m8", "rand-n0", "rand-n1.5", "rand-p1.5",
     "rand-inc2", "rand-mmax0", "rand-m-1", "rand-tweights", "rand_m9", 9],
)  # fmt: skip
def test_parse_policy_errors(policy):
    with pytest.raises(ValueError, match=r"data\.randaugment=.*e\.g\. 'rand-m9-mstd0\.5-inc1'"):
        ra.parse_policy(policy)


def test_config_field_and_validation():
    cfg = data.default_data_config()
    assert cfg.randaugment is None  # Off by default.
    data.validate_data_config(cfg)
    cfg.randaugment = "rand-m9-mstd0.5-inc1"
    data.validate_data_config(cfg)
    assert image_ops.ImageSpec.from_config(cfg).randaugment == ra.RandAugmentSpec()
    cfg.randaugment = "rand-m9-mstd0.5-incl"
    with pytest.raises(ValueError, match=r"data\.randaugment='rand-m9-mstd0\.5-incl'"):
        data.validate_data_config(cfg)


def _encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return tf.constant(buf.getvalue())


def _train_image_before_randaugment(encoded, seed, spec):
    """train_image as it was before RandAugment existed (the reference for 'unchanged')."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    image = image_ops.decode_random_crop(
        encoded, crop_seed, spec.channels, spec.crop_scale, spec.crop_ratio
    )
    image = image_ops.resize(image, spec.image_size, spec.interpolation)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_train_image_wiring(fmt):
    cfg = data.default_data_config()
    cfg.image_size = 24
    encoded = _encode(_random_image(3, shape=(40, 36)), fmt)
    off = image_ops.ImageSpec.from_config(cfg)
    on = dataclasses.replace(off, randaugment=ra.RandAugmentSpec())
    for i in range(3):
        seed = tf.constant([9, i], tf.int64)
        before = _train_image_before_randaugment(encoded, seed, off)
        # randaugment=None: bit-identical to the pipeline before RandAugment was added.
        np.testing.assert_array_equal(image_ops.train_image(encoded, seed, off), before)
        # On: RandAugment of that same crop / flip, keyed by a third split of the seed.
        ra_seed = tf.random.experimental.stateless_split(seed, num=3)[2]
        expected = ra.rand_augment(before, ra_seed, on.randaugment, ra.fill_from_mean(off.mean))
        np.testing.assert_array_equal(image_ops.train_image(encoded, seed, on), expected)
    assert ra.fill_from_mean((0.485, 0.456, 0.406)) == FILL



# ------------------------------------------------------------------- colour jitter ---

def _jitter_draws(seed, strength):
    """The factors and order color_jitter draws for `seed` (its documented rule)."""
    factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    factors = tf.random.stateless_uniform([3], factor_seed, max(0.0, 1.0 - strength),
                                          1.0 + strength).numpy()
    order = np.argsort(tf.random.stateless_uniform([3], order_seed).numpy())
    return factors, order


def test_color_jitter_is_pil_enhance_in_the_drawn_order():
    """torchvision's ColorJitter on PIL is ImageEnhance Brightness / Contrast / Color with
    factors in [1 - s, 1 + s], in a random order: ours gives PIL's pixels for the same draws."""
    image = _random_image(3, seed=4)
    orders = set()
    for i in range(40):
        seed = tf.constant([11, i], tf.int64)
        factors, order = _jitter_draws(seed, 0.4)
        assert np.all((factors >= 0.6) & (factors <= 1.4))
        orders.add(tuple(order))
        expected = _pil(image)
        for j in order:
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[j]
            expected = enhancer(expected).enhance(float(factors[j]))
        got = ra.color_jitter(tf.constant(image, tf.float32), seed, 0.4).numpy()
        np.testing.assert_allclose(got, np.asarray(expected), atol=1.0)
    assert len(orders) == 6  # every order of the three occurs


def test_color_jitter_config_wiring():
    cfg = data.default_data_config()
    assert cfg.color_jitter == 0.0
    cfg.color_jitter = -0.1
    with pytest.raises(ValueError, match=r"data\.color_jitter=-0\.1 must be a number >= 0"):
        data.validate_data_config(cfg)
    cfg.color_jitter = 0.4
    assert image_ops.ImageSpec.from_config(cfg).color_jitter == 0.4
