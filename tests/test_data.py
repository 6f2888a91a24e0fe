"""Tests of the input pipeline (mim_jax.data): offline, CPU only, fast."""

import collections
import contextlib
import io
import socket
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

import mim_jax.data as data
from mim_jax.data import image_ops
from mim_jax.data import sources
from mim_jax.data.tf_setup import tf
from mim_jax.errors import DataError

NUM_FOLDER_IMAGES = 24  # Divisible by 1, 2 and 3 processes x batch 4.


def _fill_value(i):
    # A distinct, exactly recoverable grey level per image: its identity.
    return 5 + 10 * i


@contextlib.contextmanager
def _no_network():
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args} {kwargs}")

    saved = socket.socket.connect, socket.create_connection
    socket.socket.connect, socket.create_connection = refuse, refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.create_connection = saved


def _write_image(path, array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    cfg = _mnist_cfg(str(data_dir))
    with _no_network():
        sources.make_source(cfg)  # Prepares mnist5k.
    return str(data_dir)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Two classes of constant-colour images in several formats."""
    root = tmp_path_factory.mktemp("folder")
    formats = [("png", "PNG"), ("JPG", "JPEG"), ("bmp", "BMP"), ("PNG", "PNG")]
    for i in range(NUM_FOLDER_IMAGES):
        class_dir = root / ("cat" if i % 2 else "dog")
        class_dir.mkdir(exist_ok=True)
        ext, fmt = formats[i % len(formats)]
        # Lossy JPEG keeps a constant image constant (to within rounding).
        array = np.full((20 + i % 5, 24, 3), _fill_value(i), np.uint8)
        _write_image(class_dir / f"img{i:02d}.{ext}", array, fmt)
    (root / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="session")
def textured_folder(tmp_path_factory):
    """Random-texture images (so crops and flips change pixels)."""
    root = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(0)
    for i in range(NUM_FOLDER_IMAGES):
        array = rng.integers(0, 256, (32, 40, 3), np.uint8)
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        _write_image(root / f"{i:02d}.{ext}", array, fmt)
    return str(root)


def _mnist_cfg(data_dir, **overrides):
    cfg = data.default_data_config()
    cfg.name = "mnist5k"
    cfg.data_dir = data_dir
    cfg.image_size = 28
    cfg.channels = 1
    cfg.mean, cfg.std = (0.5,), (0.25,)
    cfg.crop_scale = None
    cfg.flip = False
    cfg.shuffle_buffer = 1000
    cfg.update(overrides)
    return cfg


def _folder_cfg(folder, **overrides):
    cfg = data.default_data_config()
    cfg.name = "folder"
    cfg.folder = folder
    cfg.image_size = 8
    cfg.crop_scale = None
    cfg.flip = False
    cfg.update(overrides)
    return cfg


def _batches(cfg, n, **kwargs):
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1, **kwargs}
    it = data.create_train_iterator(cfg, **kwargs)
    return [next(it)["image"] for _ in range(n)], it


def _to_uint8(images, cfg):
    return np.rint(data.denormalize(images, cfg) * 255).astype(np.uint8)


def _nearest_fill(level):
    # Fill levels are 10 apart; snap away JPEG rounding of a level or two.
    return _fill_value(int(np.rint((level - _fill_value(0)) / 10)))


def _folder_ids(images, cfg):
    # Constant images: the grey level identifies the file.
    return [_nearest_fill(v) for v in _to_uint8(images, cfg)[:, 0, 0, 0]]


# --------------------------------------------------------------- mnist5k ---


def test_mnist5k_prepares_offline_with_expected_splits(mnist_dir):
    cfg = _mnist_cfg(mnist_dir)
    with _no_network():
        source = sources.make_source(cfg)
    assert source.num_examples("train") == 4500
    assert source.num_examples("test") == 500
    # The sizes start-up validation relies on without preparing anything.
    assert data.KNOWN_SPLITS["mnist5k"] == {s: source.num_examples(s) for s in ("train", "test")}
    digits = _to_uint8(data.fixed_eval_images(cfg, 20), cfg)
    assert digits.shape == (20, 28, 28, 1)
    for digit in digits:
        # Bright strokes on a mostly black background.
        assert digit.max() > 200
        assert 0.5 < np.mean(digit == 0) < 0.95
    with pytest.raises(DataError, match="split 'test'.* has 500 decodable images; 501 evaluation"):
        data.fixed_eval_images(cfg, 501)


def test_fixed_eval_images_deterministic(mnist_dir):
    cfg = _mnist_cfg(mnist_dir, image_size=16)
    a = data.fixed_eval_images(cfg, 8)
    b = data.fixed_eval_images(cfg, 8)
    assert a.shape == (8, 16, 16, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------- sharding ---


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_folder_shards_disjoint_and_cover(image_folder, process_count):
    cfg = _folder_cfg(image_folder)
    seen = collections.Counter()
    steps = set()
    for index in range(process_count):
        it = data.create_train_iterator(
            cfg,
            global_batch_size=4 * process_count,
            seed=1,
            process_index=index,
            process_count=process_count,
        )
        assert it.num_examples == NUM_FOLDER_IMAGES // process_count
        steps.add(it.steps_per_epoch)
        for _ in range(it.steps_per_epoch):
            seen.update(_folder_ids(next(it)["image"], cfg))
    assert steps == {NUM_FOLDER_IMAGES // process_count // 4}
    expected = collections.Counter(_fill_value(i) for i in range(NUM_FOLDER_IMAGES))
    assert seen == expected  # Each image exactly once over all processes.


# A slice keeps the test fast and checks that sliced splits shard too.
MNIST_SHARD_SPLIT, MNIST_SHARD_SIZE = "train[:1200]", 1200


@pytest.fixture(scope="session")
def mnist_slice_images(mnist_dir):
    cfg = _mnist_cfg(mnist_dir, eval_split=MNIST_SHARD_SPLIT)
    images = _to_uint8(data.fixed_eval_images(cfg, MNIST_SHARD_SIZE), cfg)
    return collections.Counter(x.tobytes() for x in images)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_mnist5k_shards_disjoint_and_cover(mnist_dir, mnist_slice_images, process_count):
    cfg = _mnist_cfg(mnist_dir, split=MNIST_SHARD_SPLIT)
    local_batch = 50
    seen = collections.Counter()
    for index in range(process_count):
        it = data.create_train_iterator(
            cfg,
            global_batch_size=local_batch * process_count,
            seed=2,
            process_index=index,
            process_count=process_count,
        )
        assert it.num_examples == MNIST_SHARD_SIZE // process_count
        assert it.steps_per_epoch == it.num_examples // local_batch
        for _ in range(it.steps_per_epoch):
            seen.update(x.tobytes() for x in _to_uint8(next(it)["image"], cfg))
    assert seen == mnist_slice_images


# ---------------------------------------------------------------- resume ---


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_resume_is_bitwise_exact_across_epochs(textured_folder, process_index, process_count):
    cfg = _folder_cfg(textured_folder, image_size=16, crop_scale=(0.2, 1.0), flip=True)
    kwargs = dict(
        global_batch_size=4 * process_count,
        seed=7,
        process_index=process_index,
        process_count=process_count,
    )
    steps = NUM_FOLDER_IMAGES // process_count // 4
    total = 2 * steps + 2  # Crosses two epoch boundaries.
    fresh, it = _batches(cfg, total, **kwargs)
    assert it.steps_per_epoch == steps
    for start in (1, steps, steps + 2, total - 1):
        resumed, it = _batches(cfg, total - start, start_step=start, **kwargs)
        for a, b in zip(fresh[start:], resumed):
            np.testing.assert_array_equal(a, b)
        assert it.step == total


def test_resume_exact_mnist5k(mnist_dir):
    cfg = _mnist_cfg(
        mnist_dir, split="train[:1000]", crop_scale=(0.5, 1.0), flip=True, shuffle_buffer=300
    )
    kwargs = dict(global_batch_size=128, seed=3)
    fresh, it = _batches(cfg, 9, **kwargs)
    assert it.steps_per_epoch == 7
    resumed, _ = _batches(cfg, 3, start_step=6, **kwargs)
    for a, b in zip(fresh[6:], resumed):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------- determinism ---


def test_same_seed_same_batches_other_seed_differs(textured_folder):
    cfg = _folder_cfg(textured_folder, image_size=16, crop_scale=(0.2, 1.0), flip=True)
    a, _ = _batches(cfg, 8, seed=0)
    b, _ = _batches(cfg, 8, seed=0)
    c, _ = _batches(cfg, 8, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))
    # Epochs are reshuffled / re-augmented.
    assert not np.array_equal(a[0], a[6])


# -------------------------------------------------------------- outputs ---


def test_output_shape_dtype_and_normalisation(image_folder):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = _folder_cfg(image_folder, mean=mean, std=std, image_size=12)
    (pixels,), it = _batches(cfg, 1)
    # uint8 pixels leave the host; the consumer normalises them on the device.
    assert pixels.shape == (4, 12, 12, 3) and pixels.dtype == np.uint8
    assert it.steps_per_epoch == NUM_FOLDER_IMAGES // 4
    batch = np.asarray(data.normalize_images(pixels, cfg))
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(data.normalize_images(batch, cfg)), batch)
    fills = {_fill_value(i) for i in range(NUM_FOLDER_IMAGES)}
    for image in batch:
        # Constant grey level v -> (v / 255 - mean) / std in every channel.
        v = (image[0, 0] * std + mean) * 255
        level = _nearest_fill(v[0])
        assert level in fills
        assert abs(v[0] - level) < 3
        expected = (v[0] / 255 - np.asarray(mean)) / np.asarray(std)
        np.testing.assert_allclose(
            image, np.broadcast_to(expected, image.shape), atol=2e-2
        )  # JPEG rounding of the fill.
    assert np.all(data.denormalize(batch, cfg) >= 0)
    assert np.all(data.denormalize(batch, cfg) <= 1)


def test_gray_to_rgb_and_rgb_to_gray(mnist_dir, textured_folder):
    rgb_cfg = _mnist_cfg(mnist_dir, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    (batch,), _ = _batches(rgb_cfg, 1)
    assert batch.shape == (4, 28, 28, 3)
    np.testing.assert_array_equal(batch[..., 0], batch[..., 1])
    np.testing.assert_array_equal(batch[..., 0], batch[..., 2])
    gray_cfg = _folder_cfg(
        textured_folder, channels=1, mean=(0.5,), std=(0.25,), crop_scale=(0.3, 1.0)
    )
    (batch,), _ = _batches(gray_cfg, 1)
    assert batch.shape == (4, 8, 8, 1)
    assert data.fixed_eval_images(gray_cfg, 3).shape == (3, 8, 8, 1)


# ------------------------------------------------------- corrupt images ---


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    good = 10
    for i in range(good):
        array = np.full((16, 16, 3), _fill_value(i), np.uint8)
        valid_png = _write_image(tmp_path / f"good{i}.png", array, "PNG")
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not a jpeg" * 20)
    (tmp_path / "truncated.png").write_bytes(valid_png[: len(valid_png) // 2])
    cfg = _folder_cfg(str(tmp_path))
    it = data.create_train_iterator(
        cfg, global_batch_size=2, seed=0, process_index=0, process_count=1
    )
    assert it.num_examples == good + 2
    assert it.steps_per_epoch == 6
    seen = []
    # Two corrupt files leave 5 full batches per epoch; run three epochs.
    for _ in range(15):
        seen.extend(_folder_ids(next(it)["image"], cfg))
        assert it.skipped_images <= 6
    assert set(seen) <= {_fill_value(i) for i in range(good)}
    # Epochs 0 and 1 ended (their short ends were seen), epoch 2 is open.
    assert 4 <= it.skipped_images <= 6
    next(it)  # Closes epoch 2, counting all its corrupt files.
    assert 6 <= it.skipped_images <= 8


def test_eval_images_skip_corrupt(tmp_path):
    (tmp_path / "a_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    _write_image(tmp_path / "b_good.png", np.full((9, 7), 80, np.uint8), "PNG")
    cfg = _folder_cfg(str(tmp_path), channels=1, mean=(0.0,), std=(1.0,))
    images = data.fixed_eval_images(cfg, 1)
    np.testing.assert_array_equal(images, 80)
    np.testing.assert_allclose(data.normalize_images(images, cfg), 80 / 255, atol=1e-6)


# ----------------------------------------------------------- image modes ---
# Every image mode a dataset may hold decodes, for both channel counts, on the three paths
# the pipeline takes: the random crop (JPEGs decode only the window), training without
# crop, and eval.  The reference is Pillow's own conversion, Image.convert('L' / 'RGB').

MODE_SIZE = 48  # Square, so the eval centre crop keeps all of it; resizing to it is a no-op.


def _smooth_planes(planes, seed):
    """float [MODE_SIZE, MODE_SIZE, planes] in [0, 1]: smooth waves, so JPEG stays close."""
    y, x = np.mgrid[0:MODE_SIZE, 0:MODE_SIZE]
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, planes)
    waves = [np.sin(x / (4 + 3 * k) + phase[k]) + np.cos(y / (6 + 2 * k)) for k in range(planes)]
    return (np.stack(waves, -1) + 2) / 4


def _encoded(image, fmt, **options):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _png16(samples):
    """uint16 [h, w, c] (c = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA) -> 16-bit PNG bytes.

    Pillow writes only 16-bit gray, so the colour ones are written by hand."""
    h, w, c = samples.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)  # filter 0: none

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _round_to_8bit(samples16):
    # What an 8-bit export holds: v * 255 / 65535 rounded.
    return np.floor(samples16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


# name -> (encoded bytes, reference PIL image, lossy).
ImageCase = collections.namedtuple("ImageCase", "encoded reference lossy")


def _image_cases():
    rgb_array = np.rint(_smooth_planes(3, 0) * 255).astype(np.uint8)
    rgb = Image.fromarray(rgb_array)
    alpha = Image.fromarray(np.rint(_smooth_planes(1, 1)[..., 0] * 255).astype(np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    # CMYK with real black (K > 0), not just Pillow's RGB -> CMYK (which leaves K = 0).
    black = np.rint(_smooth_planes(1, 2) * 120).astype(np.uint8)
    cmyk = Image.fromarray(np.concatenate([255 - rgb_array, black], -1), "CMYK")
    encoded = {
        "cmyk_jpeg": _encoded(cmyk, "JPEG", quality=95),
        "gray_jpeg": _encoded(rgb.convert("L"), "JPEG", quality=95),
        "rgb_jpeg": _encoded(rgb, "JPEG", quality=95),
        "gray_png": _encoded(rgb.convert("L"), "PNG"),
        "palette_png": _encoded(palette, "PNG"),
        "palette_transparent_png": _encoded(palette, "PNG", transparency=3),
        "la_png": _encoded(rgb.convert("LA"), "PNG"),
        "rgba_png": _encoded(rgba, "PNG"),
    }
    cases = {}
    for name, blob in encoded.items():
        # Pillow decodes the very same bytes: only the decoders' conversions differ.
        cases[name] = ImageCase(blob, Image.open(io.BytesIO(blob)), name.endswith("jpeg"))
    samples16 = np.rint(_smooth_planes(4, 3) * 65535).astype(np.uint16)
    for name, planes, mode in (("gray16_png", 1, "L"), ("la16_png", 2, "LA"),
                               ("rgb16_png", 3, "RGB"), ("rgba16_png", 4, "RGBA")):
        samples = samples16[..., :planes]
        if planes == 1:
            blob = _encoded(Image.fromarray(samples[..., 0]), "PNG")  # Pillow mode I;16.
        else:
            blob = _png16(samples)
        # Not Pillow's decoding here: it keeps the high byte of 16-bit colour (v >> 8) and
        # clips 16-bit gray to 255 in convert('L').  The reference is the rounded 8-bit
        # image, converted by Pillow like the others.
        eight = _round_to_8bit(samples)
        reference = Image.fromarray(eight[..., 0] if planes == 1 else eight, mode)
        cases[name] = ImageCase(blob, reference, False)
    return cases


IMAGE_CASES = _image_cases()


def _mode_spec(channels, crop_scale):
    # crop_scale (1, 1) with ratio 1 on a square image: the crop path with a full window.
    return image_ops.ImageSpec(
        image_size=MODE_SIZE, channels=channels, crop_scale=crop_scale, crop_ratio=(1.0, 1.0),
        interpolation="bilinear", flip=False, mean=(0.5,) * channels, std=(0.5,) * channels)


def _decoded_three_ways(encoded, channels):
    seed = tf.constant([3, 4], tf.int64)
    return {
        "random_crop": image_ops.train_image(encoded, seed, _mode_spec(channels, (1.0, 1.0))),
        "no_crop": image_ops.train_image(encoded, seed, _mode_spec(channels, None)),
        "eval": image_ops.eval_image(encoded, _mode_spec(channels, None)),
    }


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_image_modes_decode_like_pillow(name, channels):
    case = IMAGE_CASES[name]
    expected = np.asarray(case.reference.convert("L" if channels == 1 else "RGB"), np.float64)
    expected = expected.reshape(MODE_SIZE, MODE_SIZE, channels)
    for path, image in _decoded_three_ways(case.encoded, channels).items():
        image = image.numpy().astype(np.float64)
        assert image.shape == expected.shape, path
        diff = np.abs(image - expected)
        if case.lossy:
            # TF decodes JPEGs with libjpeg's fast integer IDCT (its default dct_method),
            # Pillow with the accurate one, and chroma upsampling and CMYK -> RGB rounding
            # differ too: a few levels here and there (max 7, mean 1.5 measured), while a
            # wrong conversion (channels swapped, CMYK not inverted) is off by tens.
            assert diff.mean() < 2.5, path
            assert diff.max() <= 12, path
            assert np.corrcoef(image.ravel(), expected.ravel())[0, 1] > 0.995, path
        elif channels == 1 and case.reference.mode not in ("L", "LA"):
            # Colour -> gray: TF weighs in float and truncates, Pillow uses fixed-point
            # ITU-R 601-2 weights and rounds; they differ by at most one level.
            assert diff.max() <= 1, path
        else:
            np.testing.assert_array_equal(image, expected, err_msg=path)


def test_cmyk_jpeg_matches_its_source_colours():
    """Pillow and TF could agree and both be wrong: check against the known colours."""
    rgb_array = np.rint(_smooth_planes(3, 0) * 255).astype(np.float64)
    black = np.rint(_smooth_planes(1, 2) * 120)
    expected = rgb_array * (255 - black) / 255  # C = 255 - R, so R' = (255 - C)(255 - K) / 255
    for image in _decoded_three_ways(IMAGE_CASES["cmyk_jpeg"].encoded, 3).values():
        assert np.abs(image.numpy() - expected).mean() < 3.0  # JPEG loss only.


def test_16bit_png_rounds_to_8bit():
    """A sample between two 8-bit levels goes to the nearer one (TF itself keeps v >> 8)."""
    samples = np.array([[0, 128, 129, 200, 386, 32767, 32896, 65406, 65407, 65535]], np.uint16)
    blob = _encoded(Image.fromarray(samples), "PNG")
    decoded = image_ops.decode_any(blob, 1).numpy()[..., 0]
    # v * 255 / 65535 = 0, .498, .502, .778, 1.502, 127.498, 128, 254.498, 254.502, 255;
    # v >> 8 would give 0, 0, 0, 0, 1, 127, 128, 255, 255, 255.
    np.testing.assert_array_equal(decoded[0], [0, 0, 1, 1, 2, 127, 128, 254, 255, 255])
    np.testing.assert_array_equal(decoded, _round_to_8bit(samples))


def test_8bit_png_pixels_are_exact():
    array = np.random.default_rng(5).integers(0, 256, (9, 7, 3), np.uint8)
    blob = _encoded(Image.fromarray(array), "PNG")
    np.testing.assert_array_equal(image_ops.decode_any(blob, 3).numpy(), array)


@pytest.fixture(scope="session")
def image_modes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_modes")
    for name, case in IMAGE_CASES.items():
        suffix = ".jpg" if name.endswith("jpeg") else ".png"
        (root / (name + suffix)).write_bytes(case.encoded)
    return str(root)


@pytest.mark.parametrize("crop_scale", [None, (0.3, 1.0)], ids=["no_crop", "random_crop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_no_image_mode_is_counted_as_corrupt(image_modes_folder, channels, crop_scale):
    cfg = _folder_cfg(image_modes_folder, channels=channels, mean=(0.5,) * channels,
                      std=(0.25,) * channels, image_size=16, crop_scale=crop_scale)
    num = len(IMAGE_CASES)
    # One batch holds every image: it comes out full only if none was dropped.
    it = data.create_train_iterator(
        cfg, global_batch_size=num, seed=0, process_index=0, process_count=1)
    batch = next(it)["image"]
    assert batch.shape == (num, 16, 16, channels)
    assert it.skipped_images == 0
    # Eval drops undecodable images too; fewer than `num` would raise.
    assert data.fixed_eval_images(cfg, num).shape == (num, 16, 16, channels)


# ------------------------------------------------------------ validation ---


def test_validate_accepts_defaults_and_tfds_names():
    data.validate_data_config(data.default_data_config())
    cfg = data.default_data_config()
    cfg.name = "imagenet2012:5.1.0"
    data.validate_data_config(cfg)  # Registered; nothing is prepared.


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "no_such_dataset_xyz"),
        ("folder", None),
        ("folder", "/nonexistent/images"),
        ("image_size", 0),
        ("channels", 2),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_ratio", (2.0, 1.0)),
        ("interpolation", "nearest"),
        ("mean", (0.5, 0.5)),
        ("std", (0.2, 0.0, 0.2)),
        ("shuffle_buffer", 0),
        ("num_parallel_calls", 0),
    ],
)
def test_validate_names_the_field(field, value):
    cfg = data.default_data_config()
    if field == "folder":
        cfg.name = "folder"
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=rf"data\.{field}="):
        data.validate_data_config(cfg)


def test_batch_size_errors(image_folder):
    cfg = _folder_cfg(image_folder)
    with pytest.raises(ValueError, match="batch_size=3"):
        data.create_train_iterator(
            cfg, global_batch_size=3, seed=0, process_index=0, process_count=2
        )
    with pytest.raises(ValueError, match=r"batch_size=64.*24 examples"):
        data.create_train_iterator(
            cfg, global_batch_size=64, seed=0, process_index=0, process_count=1
        )


def test_folder_labels(image_folder):
    files, labels, classes = sources.list_image_files(image_folder)
    assert classes == ["cat", "dog"]
    assert len(files) == NUM_FOLDER_IMAGES
    assert files == sorted(files)
    assert all(("cat" in f) == (label == 0) for f, label in zip(files, labels))


# ------------------------------------------------- uint8 output, device normalisation ---


def _textured_jpeg(size_hw, seed=0, quality=90):
    """Smooth colour fields plus noise (like the benchmark's JPEGs), encoded as JPEG."""
    rng = np.random.default_rng(seed)
    h, w = size_hw
    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC),
                        np.float32)
    noisy = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return _encoded(Image.fromarray(noisy), "JPEG", quality=quality)


def _reference_float_train_image(encoded, seed, spec):
    """The previous host path: full-resolution window decode, antialiased resize, flip, float32."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    shape = tf.image.extract_jpeg_shape(encoded)
    y, x, h, w = image_ops._sample_crop(shape, crop_seed, spec.crop_scale, spec.crop_ratio)
    window = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
    image = tf.clip_by_value(tf.image.resize(window, (spec.image_size, spec.image_size),
                                             method=spec.interpolation, antialias=True), 0., 255.)
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image


def test_uint8_output_normalised_on_device_matches_float_path():
    """What the pipeline hands on (uint8), normalised by data.normalize_images, is the old
    host-normalised float32 output to within half a level: 0.5 / 255 / std."""
    cfg = data.default_data_config()
    # Output 64 px: no window of these images reaches 2x, so no reduced-scale decode.
    cfg.image_size, cfg.crop_scale, cfg.flip = 64, (0.2, 1.0), True
    cfg.mean, cfg.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = image_ops.ImageSpec.from_config(cfg)
    bound = 0.5 / 255 / np.asarray(cfg.std) + 1e-5  # + float32 rounding of the formula
    for i, size in enumerate([(48, 64), (96, 80)]):
        encoded = tf.constant(_textured_jpeg(size, seed=i))
        for s in range(6):
            seed = tf.constant([i, s], tf.int64)
            pixels = image_ops.to_uint8(image_ops.train_image(encoded, seed, spec)).numpy()
            assert pixels.dtype == np.uint8
            new = np.asarray(data.normalize_images(pixels, cfg))
            old = image_ops.normalize(image_ops.train_image(encoded, seed, spec), spec.mean,
                                      spec.std).numpy()
            assert np.all(np.abs(new - old) <= bound)
            # And against the previous augmentation (no reduced-scale decode at these sizes;
            # enlargements resize with the plain kernel, equal up to float rounding).
            ref = image_ops.normalize(_reference_float_train_image(encoded, seed, spec),
                                      spec.mean, spec.std).numpy()
            assert np.all(np.abs(new - ref) <= bound + 1e-4)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_uint8_train_image_flips_after_rounding_with_the_same_pixels(fmt):
    """The pipeline rounds before the flip (cheaper); the pixels are those of rounding the
    flipped float image, with a crop, without one, at reduced-scale decode and enlarging."""
    cfg = data.default_data_config()
    cfg.image_size, cfg.flip = 48, True
    flipped = 0
    for crop_scale in [(0.2, 1.0), None]:
        cfg.crop_scale = crop_scale
        spec = image_ops.ImageSpec.from_config(cfg)
        for i, size in enumerate([(40, 56), (200, 240)]):  # enlarged / >= 2x: 1/2 DCT scale
            if fmt == "jpeg":
                encoded = tf.constant(_textured_jpeg(size, seed=i))
            else:
                pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
                encoded = tf.io.encode_png(pixels)
            for s in range(4):
                seed = tf.constant([i, s], tf.int64)
                got = image_ops.train_image_uint8(encoded, seed, spec).numpy()
                want = image_ops.to_uint8(image_ops.train_image(encoded, seed, spec)).numpy()
                assert got.dtype == np.uint8 and got.shape == (48, 48, 3)
                np.testing.assert_array_equal(got, want)
                unflipped = image_ops.to_uint8(image_ops._crop_resized(encoded, seed, spec)[0])
                flipped += not np.array_equal(got, unflipped.numpy())
    assert 0 < flipped < 16  # both branches of the flip were taken


def test_pipeline_batches_are_uint8_and_normalise_like_the_float_path(textured_folder):
    """Through the real iterator (no crop, no flip: deterministic per file)."""
    cfg = _folder_cfg(textured_folder, image_size=16, mean=(0.5, 0.4, 0.3),
                      std=(0.2, 0.25, 0.3))
    spec = image_ops.ImageSpec.from_config(cfg)
    it = data.create_train_iterator(cfg, global_batch_size=NUM_FOLDER_IMAGES, seed=0,
                                    process_index=0, process_count=1)
    pixels = next(it)["image"]
    assert pixels.dtype == np.uint8
    new = np.asarray(data.normalize_images(pixels, cfg))
    import glob, os  # pylint: disable=g-import-not-at-top,multiple-imports
    old = []
    for path in sorted(glob.glob(os.path.join(textured_folder, "*"))):
        encoded = tf.constant(open(path, "rb").read())
        image = image_ops.train_image(encoded, tf.constant([0, 0], tf.int64), spec)
        old.append(image_ops.normalize(image, spec.mean, spec.std).numpy())
    old = np.stack(old)
    bound = 0.5 / 255 / np.asarray(cfg.std) + 1e-5
    # The batch is shuffled: match every image with its source (nearest float image).
    for image in new:
        dist = np.abs(old - image).max(axis=(1, 2, 3))
        assert dist.min() <= bound.max()
    images = data.fixed_eval_images(cfg, 4)
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)


def test_synthetic_source_yields_uint8_that_normalises_to_smooth_fields():
    cfg = data.default_data_config()
    cfg.name, cfg.image_size = "synthetic", 16
    batch = next(data.create_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                            process_count=1))
    assert batch["image"].dtype == np.uint8
    x = np.asarray(data.normalize_images(batch["image"], cfg))
    assert abs(x.mean()) < 0.5 and 0.5 < x.std() < 1.5
    eval_batch = next(data.eval_batches(cfg, "test", global_batch_size=8))
    assert eval_batch["image"].dtype == np.uint8


def test_normalize_images_rejects_other_integer_types_and_missing_config():
    cfg = data.default_data_config()
    with pytest.raises(TypeError, match="uint8"):
        data.normalize_images(np.zeros((1, 2, 2, 3), np.int32), cfg)
    with pytest.raises(ValueError, match="data config"):
        data.normalize_images(np.zeros((1, 2, 2, 3), np.uint8), None)
    # Floats are taken as already normalised.
    x = np.random.default_rng(0).normal(size=(1, 2, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(data.normalize_images(x, None)), x)


# ------------------------------------------------------ reduced-scale (DCT) JPEG decode ---


def test_large_crops_decode_at_reduced_dct_scale_like_full_resolution():
    """A crop window >= 2x / 4x / 8x the output in both dimensions is decoded at 1/2, 1/4, 1/8
    scale by libjpeg; the result is still RandomResizedCrop + antialiased resize of the
    full-resolution window to within a level or so.  Measured on this 1600 x 1200 image
    (smooth colours + noise of sd 12, quality 90), output 112 / 224 px, bicubic and bilinear:
    mean |difference| of the uint8 outputs 0.6-1.2 levels, max 4-8."""
    encoded = tf.constant(_textured_jpeg((1200, 1600), seed=3))
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    used = collections.Counter()
    for size, interpolation in [(224, "bicubic"), (112, "bilinear")]:
        for s in range(8):
            seed = tf.constant([5, s], tf.int64)
            shape = tf.image.extract_jpeg_shape(encoded)
            y, x, h, w = image_ops._sample_crop(shape, seed, scale, ratio)
            used[int(image_ops._jpeg_ratio_index(h, w, size))] += 1
            window = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
            full = image_ops.to_uint8(image_ops.resize(window, size, interpolation)).numpy()
            fast = image_ops.to_uint8(image_ops.random_crop_resized(
                encoded, seed, 3, scale, ratio, size, interpolation)).numpy()
            assert fast.shape == full.shape == (size, size, 3)
            diff = np.abs(fast.astype(np.int32) - full.astype(np.int32))
            assert diff.mean() < 1.5 and diff.max() <= 12, (size, s, diff.mean(), diff.max())
    assert used[0] == 0 and used[1] > 0 and used[2] > 0  # 1/2 and 1/4 scale both exercised


def test_reduced_scale_decode_window_alignment_and_small_crops_unchanged():
    """An offset window (not a multiple of the scale) lands where the full-resolution one does:
    a sharp vertical edge at a known column stays at its column in the output."""
    h, w = 960, 1280
    array = np.zeros((h, w, 3), np.uint8)
    array[:, 700:] = 255
    encoded = tf.constant(_encoded(Image.fromarray(array), "JPEG", quality=95))
    shape = tf.image.extract_jpeg_shape(encoded)
    for window in [(13, 301, 901, 903), (5, 3, 950, 1270), (0, 451, 480, 500)]:
        win = tf.constant(window, tf.int32)
        fast = image_ops._decode_jpeg_crop_resized(encoded, shape, tf.unstack(win), 112,
                                                   "bilinear", 3).numpy()
        ref = image_ops.resize(tf.image.decode_and_crop_jpeg(encoded, win, channels=3), 112,
                               "bilinear").numpy()
        assert np.abs(fast - ref).mean() < 1.0, window
        # The edge column (half-way crossing) agrees to within a tenth of an output pixel.
        crossing = lambda img: np.interp(127.5, img[56, :, 0], np.arange(112))
        assert abs(crossing(fast) - crossing(ref)) < 0.1, window


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_enlargement_with_plain_kernel_matches_antialiased_resize(interpolation):
    """An enlargement in both dimensions skips the antialiasing path (the same filter there):
    the result is the antialiased resize's up to float rounding (measured max 0.0013 on random
    pixels), border included."""
    rng = np.random.default_rng(7)
    for hw in [(20, 30), (64, 17), (63, 64)]:
        image = tf.constant(rng.integers(0, 256, (*hw, 3), np.uint8))
        got = image_ops.resize(image, 64, interpolation).numpy()
        ref = tf.clip_by_value(tf.image.resize(image, (64, 64), method=interpolation,
                                               antialias=True), 0.0, 255.0).numpy()
        assert np.abs(got - ref).max() < 1e-2, hw  # float rounding of two implementations


def test_finished_epoch_iterators_are_released_off_the_training_thread():
    """Destroying a finished tf.data iterator can block for seconds; the training thread must
    not be the one that does it."""
    import threading
    import time

    from mim_jax.data import pipeline
    released = []

    class Iterator:
        def __del__(self):
            released.append(threading.current_thread().name)

    holder = [Iterator()]
    pipeline._release_in_background(holder)
    deadline = time.time() + 10
    while not released and time.time() < deadline:
        time.sleep(0.01)
    assert released == ["release-epoch-iterator"] and holder == []


def test_normalize_batch_normalises_every_image_of_a_mixed_batch():
    cfg = data.default_data_config()
    cfg.update(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    pixels = np.full((2, 4, 4, 3), 255, np.uint8)
    ids = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = data.normalize_batch({"image": pixels, "pair_image": pixels, "text_ids": ids}, cfg)
    np.testing.assert_allclose(out["image"], 2.0)
    np.testing.assert_allclose(out["pair_image"], 2.0)
    np.testing.assert_array_equal(out["text_ids"], ids)  # not an image: as it was


def test_each_streams_part_of_the_batch_must_divide_over_the_batch_shards():
    import jax
    from mim_jax import sharding

    mesh = sharding.make_mesh(None)
    n = sharding.batch_axis_size(mesh)
    sharding.check_batch_divisible(6 * n, 1, mesh, {"image": 3 * n, "text": 3 * n})
    sharding.check_batch_divisible(2 * n, 2, mesh, {"image": 2 * n, "text": 0})  # 0: none
    with pytest.raises(ValueError, match=rf"^batch_size={6 * n} \({2 * n - 1} text examples "
                                         r"of it per step\) is not divisible by accum_steps=2"):
        sharding.check_batch_divisible(6 * n, 2, mesh, {"image": 4 * n, "text": 2 * n - 1})
    if jax.device_count() > 1:
        with pytest.raises(ValueError, match=r"use a multiple of .* for each stream"):
            sharding.check_batch_divisible(2 * n, 1, mesh, {"image": 2 * n - 1, "text": 1})
