"""Tests of the input pipeline (mim_jax.data): offline, CPU only, fast."""

import collections
import contextlib
import io
import socket

import numpy as np
from PIL import Image
import pytest

import mim_jax.data as data
from mim_jax.data import sources

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
    with pytest.raises(ValueError, match="num=501"):
        data.fixed_eval_images(cfg, 501)


def test_fixed_eval_images_deterministic(mnist_dir):
    cfg = _mnist_cfg(mnist_dir, image_size=16)
    a = data.fixed_eval_images(cfg, 8)
    b = data.fixed_eval_images(cfg, 8)
    assert a.shape == (8, 16, 16, 1) and a.dtype == np.float32
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
    (batch,), it = _batches(cfg, 1)
    assert batch.shape == (4, 12, 12, 3) and batch.dtype == np.float32
    assert it.steps_per_epoch == NUM_FOLDER_IMAGES // 4
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
    np.testing.assert_allclose(images, 80 / 255, atol=1e-5)


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
