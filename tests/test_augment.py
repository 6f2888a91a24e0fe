"""mim_jax.augment: Mixup/CutMix and RandomErasing against timm's documented behaviour.

timm is not a dependency (it pulls torchvision), so the parity test compares with a small
numpy transcription of timm's `one_hot` / `mixup_target` / `rand_bbox` written here from their
formulas, in float64 as timm computes them. cutmix_bbox_and_lam's correction (lam = 1 - box
area / image area) is checked against the pixels actually pasted.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import augment

K = 10


# ---------------------------------------------------------------- numpy transcription of timm
def np_one_hot(labels, num_classes, on_value, off_value):
    out = np.full((len(labels), num_classes), off_value, np.float64)
    out[np.arange(len(labels)), labels] = on_value
    return out


def np_mixup_target(labels, num_classes, lam, smoothing):
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    y1 = np_one_hot(labels, num_classes, on, off)
    y2 = np_one_hot(labels[::-1], num_classes, on, off)
    return y1 * lam + y2 * (1.0 - lam)


def np_rand_bbox(img_h, img_w, lam, cy, cx):
    """rand_bbox with margin 0 and the random centre passed in."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    return (np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h),
            np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w))


# ---------------------------------------------------------------- helpers
# Compiling the Beta sampler dominates these tests, so they share a few programs: one image
# shape, one number of draws, prob / switch_prob / smoothing passed as traced arguments, and
# one compilation per (mixup_alpha, cutmix_alpha).
SHAPE, DRAWS = (8, 16, 16, 3), 16
LABELS = jnp.arange(8) % K  # distinct labels, so flip partners are distinguishable in targets


@functools.lru_cache(maxsize=None)
def _mixer(mixup_alpha, cutmix_alpha):
    def fn(key, images, labels, prob, switch_prob, smoothing):
        return augment.mixup_cutmix(key, images, labels, num_classes=K, mixup_alpha=mixup_alpha,
                                    cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                                    prob=prob, label_smoothing=smoothing, return_lam=True)
    return jax.jit(fn)  # (vmapping over keys would double the compile time of the sampler)


def mix(images, *, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
        smoothing=0.0, first_seed=0):
    """DRAWS jitted mixup_cutmix calls: ([S, B, H, W, C], [S, B, K], [S]) numpy arrays."""
    fn = _mixer(mixup_alpha, cutmix_alpha)
    draws = [fn(jax.random.key(seed), images, LABELS, prob, switch_prob, smoothing)
             for seed in range(first_seed, first_seed + DRAWS)]
    return tuple(np.stack([np.asarray(d[i]) for d in draws]) for i in range(3))


def zeros_then_ones():
    """First half 0, second half 1: sample i's flip partner B-1-i has the other value."""
    return jnp.asarray(np.arange(SHAPE[0])[:, None, None, None] >= SHAPE[0] // 2,
                       np.float32) * jnp.ones(SHAPE)


def random_images(seed=1):
    return jax.random.normal(jax.random.key(seed), SHAPE)


# ---------------------------------------------------------------- one-hot / targets
def test_one_hot_smoothed_exact_values():
    y = np.asarray(augment.one_hot_smoothed(jnp.array([3, 0, 9]), K, 0.1))
    assert y.dtype == np.float32 and y.shape == (3, K)
    off, on = np.float32(0.1 / K), np.float32(1 - 0.1 + 0.1 / K)
    np.testing.assert_array_equal(y, np.where(np.eye(K)[[3, 0, 9]] > 0, on, off))
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(augment.one_hot_smoothed(jnp.array([2]), K, 0.0),
                                  np.eye(K, dtype=np.float32)[[2]])


def test_parity_with_timm_formulas():
    """Deterministic core vs the float64 transcription of timm, for fixed lam and centres."""
    h, w = 224, 160
    rng = np.random.default_rng(0)
    # Our lam is a float32 Beta draw: give timm's float64 formulas that same value. (A float64
    # lam such as 0.99 exactly is not an input we can receive: 160 * sqrt(1 - 0.99) is 16 + 4e-15
    # in float64 but float32(0.99) gives 15.99999.)
    lams = np.concatenate([[0.0, 0.3, 0.5, 0.99, 0.75, 1.0], rng.uniform(0, 1, 40)])
    lams = lams.astype(np.float32).astype(np.float64)
    centres = np.array([(0, 0), (h - 1, w - 1), (h // 2, w // 2), (5, w - 3)]
                       + list(zip(rng.integers(0, h, 10), rng.integers(0, w, 10))))
    box_fn = jax.jit(jax.vmap(jax.vmap(augment.cutmix_bbox, (None, 0, 0, None, None)),
                              (0, None, None, None, None)), static_argnums=(3, 4))
    got = np.asarray(box_fn(lams.astype(np.float32), centres[:, 0], centres[:, 1], h, w))
    for i, lam in enumerate(lams):
        for j, (cy, cx) in enumerate(centres):
            assert tuple(got[i, j]) == np_rand_bbox(h, w, lam, cy, cx), (lam, cy, cx)
    labels = rng.integers(0, K, 6)
    targets_fn = jax.jit(jax.vmap(augment.mix_targets, (None, 0, None, None)),
                         static_argnums=(2, 3))
    got = np.asarray(targets_fn(jnp.asarray(labels), lams.astype(np.float32), K, 0.1))
    for i, lam in enumerate(lams):
        np.testing.assert_allclose(got[i], np_mixup_target(labels, K, lam, 0.1),
                                   rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- cutmix
def check_cutmix(x, out, targets, lam):
    """out is x with one box (the same for all samples) pasted from the reversed batch."""
    x = np.asarray(x)
    b, h, w, _ = x.shape
    from_flip = out != x  # pixels that came from the reversed batch
    box = from_flip.any((0, 3))
    np.testing.assert_array_equal(out[:, box], x[::-1][:, box])
    np.testing.assert_array_equal(out[:, ~box], x[:, ~box])
    if box.any():  # one axis-aligned rectangle
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    # targets: lam on the own label, 1 - lam on the partner's, summing to one.
    i, y = np.arange(b), np.asarray(LABELS)
    np.testing.assert_allclose(targets[i, y], lam, atol=1e-6)
    np.testing.assert_allclose(targets[i, y[::-1]], 1.0 - lam, atol=1e-6)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    return box


def test_cutmix_pasted_area_is_one_minus_lam():
    x = zeros_then_ones()  # with 0/1 images every pasted pixel is visible in every sample
    outs, targets_s, lams = mix(x, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert (lams < 0.95).sum() >= DRAWS // 2  # mostly non-trivial boxes
    for out, targets, lam in zip(outs, targets_s, lams):
        assert set(np.unique(out)) <= {0.0, 1.0}  # pasted, never blended
        box = check_cutmix(x, out, targets, lam)
        changed = out != np.asarray(x)  # every sample and channel shows the whole box
        np.testing.assert_array_equal(changed, np.broadcast_to(box[None, :, :, None], out.shape))
        # the fraction taken from the reversed batch is exactly 1 - lam (correct_lam=True)
        assert lam == pytest.approx(1.0 - box.mean(), abs=1e-6)
    # random images, other draws: the pasted pixels are the partner's own values
    x = random_images()
    outs, targets_s, lams = mix(x, mixup_alpha=0.0, cutmix_alpha=1.0, first_seed=100)
    for out, targets, lam in zip(outs, targets_s, lams):
        assert lam == pytest.approx(1.0 - check_cutmix(x, out, targets, lam).mean(), abs=1e-6)


# ---------------------------------------------------------------- mixup
def test_mixup_blends_with_flipped_batch():
    x = random_images()
    xn = np.asarray(x)
    outs, targets_s, lams = mix(x, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1)
    assert ((lams > 0) & (lams < 1)).all() and np.ptp(lams) > 0.05
    for out, targets, lam in zip(outs, targets_s, lams.astype(np.float64)):
        np.testing.assert_allclose(out, lam * xn + (1 - lam) * xn[::-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(targets, np_mixup_target(np.asarray(LABELS), K, lam, 0.1),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)


def test_both_methods_batch_is_either_pasted_or_blended():
    """Default recipe: each draw is a cutmix (only 0/1 pixels) or a mixup (blended pixels)."""
    x = zeros_then_ones()
    outs, targets_s, lams = mix(x)
    pasted = [set(np.unique(o)) <= {0.0, 1.0} for o in outs]
    assert 0 < sum(pasted) < len(pasted)
    for out, targets, lam, cut in zip(outs, targets_s, lams, pasted):
        if cut:
            assert lam == pytest.approx(1.0 - check_cutmix(x, out, targets, lam).mean(), abs=1e-6)
        else:  # zeros blended with ones: every pixel of sample 0 is 1 - lam
            np.testing.assert_allclose(out[0], 1.0 - lam, atol=1e-6)
            np.testing.assert_allclose(targets[0, [0, 7]], [lam, 1 - lam], atol=1e-6)


def test_prob_zero_leaves_images_and_smooths_targets():
    x = random_images()
    outs, targets_s, lams = mix(x, prob=0.0, smoothing=0.1)
    np.testing.assert_array_equal(lams, 1.0)
    np.testing.assert_array_equal(outs, np.broadcast_to(np.asarray(x), outs.shape))
    # allclose: the smoothing is a traced float32 here, so off = 0.1 / K is rounded in float32
    # (test_one_hot_smoothed_exact_values checks exact values for a Python float smoothing).
    np.testing.assert_allclose(
        targets_s, np.broadcast_to(augment.one_hot_smoothed(LABELS, K, 0.1), targets_s.shape),
        rtol=0, atol=1e-7)


def test_mix_params_statistics():
    """switch_prob and prob frequencies, and each method gets its own alpha's Beta."""
    n = 8000
    fn = jax.jit(jax.vmap(lambda k, prob, switch: augment.mix_params(
        k, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch, prob=prob),
        in_axes=(0, None, None)))
    keys = jax.random.split(jax.random.key(0), n)
    cut, lam = (np.asarray(a) for a in fn(keys, 1.0, 0.5))
    assert abs(cut.mean() - 0.5) < 0.03  # Binomial(8000, 1/2): sd 0.0056, bound > 5 sd
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.0962 (a = 0.8) vs 0.0833 (a = 1);
    # with ~4000 draws each the sd of the variance estimate is < 0.0015, bound 0.006.
    assert abs(lam.mean() - 0.5) < 0.02
    assert abs(lam[~cut].var() - 1 / (4 * 2.6)) < 0.006
    assert abs(lam[cut].var() - 1 / 12) < 0.006
    cut, lam = (np.asarray(a) for a in fn(keys, 0.3, 0.2))
    mixed = lam < 1.0
    assert abs(mixed.mean() - 0.3) < 0.03  # Binomial(8000, 0.3): sd 0.0051
    assert abs(cut[mixed].mean() - 0.2) < 0.04  # ~2400 draws: sd 0.0082
    assert not cut[~mixed].any()  # not mixing means (use_cutmix=False, lam=1), as in timm
    with pytest.raises(ValueError):
        augment.mix_params(jax.random.key(0), mixup_alpha=0.0, cutmix_alpha=0.0)


def test_mixup_cutmix_rejects_odd_batch_and_keeps_dtype():
    with pytest.raises(ValueError, match="even"):
        augment.mixup_cutmix(jax.random.key(0), jnp.zeros((3, 4, 4, 3)), jnp.zeros(3, int),
                             num_classes=K)
    out, targets = jax.eval_shape(functools.partial(augment.mixup_cutmix, num_classes=K),
                                  jax.random.key(0), jnp.ones(SHAPE, jnp.bfloat16), LABELS)
    assert out.dtype == jnp.bfloat16 and out.shape == SHAPE
    assert targets.dtype == jnp.float32 and targets.shape == (SHAPE[0], K)


# ---------------------------------------------------------------- random erasing
# As for mixing, the tests share few programs: prob is a traced argument, shapes are small
# (XLA's CPU compile time grows with the size of the noise arrays).
@functools.lru_cache(maxsize=None)
def _eraser(kwargs):
    return jax.jit(lambda key, images, prob: augment.random_erasing(key, images, prob=prob,
                                                                     **dict(kwargs)))


def erase(key, images, prob, **kw):
    return np.asarray(_eraser(tuple(sorted(kw.items())))(key, images, prob))


def boxes_of(changed):
    """Per sample: None if untouched, else (top, bottom, left, right) of its single rectangle."""
    out = []
    for m in changed:
        if not m.any():
            out.append(None)
            continue
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        t, b, l, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert m[t:b, l:r].all() and m.sum() == (b - t) * (r - l), "not one rectangle"
        out.append((t, b, l, r))
    return out


ONES = jnp.ones((2048, 24, 24, 1))  # 'const' mode erases to 0: the boxes are the zeros


def test_erasing_frequency_is_prob():
    frac = (erase(jax.random.key(0), ONES, 0.25, mode="const") == 0).any((1, 2, 3)).mean()
    # Binomial(2048, 0.25): sd = sqrt(.25 * .75 / 2048) = 0.0096; 0.05 is > 5 sd. Failing to
    # place a box in 10 attempts (h or w >= 24) has probability < 1e-9 per sample here.
    assert abs(frac - 0.25) < 0.05


def test_erased_region_geometry():
    _, h, w, _ = ONES.shape
    min_area, max_area, min_aspect = 0.02, 1 / 3, 0.3
    boxes = boxes_of(erase(jax.random.key(1), ONES, 0.5, mode="const")[..., 0] == 0)
    boxes = [b for b in boxes if b is not None]
    assert abs(len(boxes) - 1024) < 120  # Binomial(2048, 1/2): sd 22.6
    areas, aspects = [], []
    for t, b, l, r in boxes:
        eh, ew = b - t, r - l
        assert eh < h and ew < w
        # h = round(sqrt(A r)), w = round(sqrt(A / r)) with A, r in range: bounds up to the
        # +-0.5 rounding of each side.
        assert (eh - 0.5) * (ew - 0.5) <= max_area * h * w
        assert (eh + 0.5) * (ew + 0.5) >= min_area * h * w
        assert (eh - 0.5) / (ew + 0.5) <= 1 / min_aspect
        assert (eh + 0.5) / (ew - 0.5) >= min_aspect
        areas.append(eh * ew / (h * w))
        aspects.append(eh / ew)
    # the whole ranges are used: area ~ U(0.02, 1/3), log-aspect ~ U(log .3, log 3.33)
    assert min(areas) < 0.05 and max(areas) > 0.28
    assert min(aspects) < 0.4 and max(aspects) > 2.5


def test_erasing_placement_covers_both_edges():
    """top ~ randint[0, H - h] inclusive: boxes touch every border (an exclusive bound never
    reaches the bottom / right edge)."""
    boxes = boxes_of(erase(jax.random.key(2), ONES, 1.0, mode="const")[..., 0] == 0)
    assert all(b is not None for b in boxes)
    boxes, side = np.array(boxes), ONES.shape[1]
    assert (boxes[:, 0] == 0).any() and (boxes[:, 1] == side).any()
    assert (boxes[:, 2] == 0).any() and (boxes[:, 3] == side).any()


IMAGES = jax.random.uniform(jax.random.key(3), (128, 16, 16, 3), minval=5.0, maxval=6.0)


def test_erasing_fill_modes_and_untouched_pixels():
    """The key fixes the boxes whatever the mode; outside them pixels are bit-identical."""
    xn = np.asarray(IMAGES)
    key = jax.random.key(4)
    box = (erase(key, IMAGES, 0.5, mode="const") == 0)[..., 0]
    assert 32 < box.any((1, 2)).sum() < 96  # Binomial(128, 1/2): sd 5.7
    pixel = erase(key, IMAGES, 0.5, mode="pixel")
    rand = erase(key, IMAGES, 0.5, mode="rand")
    for out in (pixel, rand):
        np.testing.assert_array_equal(out[~box], xn[~box])  # untouched pixels and samples
        assert (np.abs(out[box]) < 5.0).mean() > 0.999  # filled: far from the U(5, 6) values
    fill = pixel[box]
    assert abs(fill.mean()) < 0.05 and abs(fill.std() - 1.0) < 0.05  # N(0, 1) per pixel
    assert len(np.unique(fill)) > 0.99 * fill.size
    for i in np.flatnonzero(box.any((1, 2)))[:20]:
        colours = rand[i][box[i]]  # one normal value per channel within the box
        np.testing.assert_array_equal(colours, np.broadcast_to(colours[:1], colours.shape))
        assert len(set(colours[0])) == 3
    np.testing.assert_array_equal(erase(key, IMAGES, 0.0, mode="pixel"), xn)


def test_erasing_deterministic():
    a = erase(jax.random.key(7), IMAGES, 0.5, mode="pixel")
    np.testing.assert_array_equal(a, erase(jax.random.key(7), IMAGES, 0.5, mode="pixel"))
    assert not np.array_equal(a, erase(jax.random.key(8), IMAGES, 0.5, mode="pixel"))
    # the default arguments are the recipe's: pixel noise, prob 0.25
    b = np.asarray(jax.jit(augment.random_erasing)(jax.random.key(7), IMAGES))
    assert 0.1 < (b != np.asarray(IMAGES)).any((1, 2, 3)).mean() < 0.4


def test_erasing_max_count():
    _, h, w, _ = IMAGES.shape
    out = erase(jax.random.key(5), IMAGES, 1.0, mode="rand", max_count=3)
    changed = (out != np.asarray(IMAGES)).any(-1)
    colours = [len({tuple(p) for p in o[m]}) for o, m in zip(out, changed)]
    assert max(colours) == 3 and min(colours) >= 1  # count ~ randint[1, 3], one colour per box
    # box areas are scaled by 1/count, so the union stays within max_area (+ rounding: each
    # of <= 3 boxes gains at most (h + w) / 2 + 1/4 pixels)
    assert (changed.sum((1, 2)) <= (1 / 3) * h * w + 3 * ((h + w) / 2 + 0.25)).all()
    assert changed.sum((1, 2)).max() > 0.2 * h * w
    with pytest.raises(ValueError):
        augment.random_erasing(jax.random.key(0), IMAGES, mode="bogus")
