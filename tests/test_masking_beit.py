"""BEiT blockwise masking against a numpy version of the reference algorithm (written from the
paper and its released code; tools/torch_compare draws the PyTorch side's masks with it too).

The two use different random generators, so masks are compared as distributions over a few
thousand draws: masked count, per-position coverage, connected blocks and rows/columns touched.
"""
import functools

import chex
import jax
import numpy as np
import pytest
from scipy import ndimage, stats

from mim_jax import masking
from tools.torch_compare.torch_steps import reference_block_mask as reference_mask

DRAWS = 3000
# block_mask arguments after the key and batch size: the BEiT ViT-B/16 setting (grid 14x14,
# 75 patches, blocks of >= 16, default limits) and a small non-square grid with every limit set
# (the aspect range is skewed so that swapping height and width would show).
SETTINGS = {
    "beit_14x14": dict(grid_h=14, grid_w=14, num_masking_patches=75, min_num_patches=16),
    "small_7x9": dict(grid_h=7, grid_w=9, num_masking_patches=24, min_num_patches=4,
                      max_num_patches=12, min_aspect=0.5, max_aspect=3.0),
}


@functools.lru_cache(maxsize=None)
def draws(setting):
    """(v1, v2) masks from mim_jax (one jitted call) and from the numpy reference."""
    args = SETTINGS[setting]

    @jax.jit
    def both(key):
        # Same key: v2 is v1 plus the fill, which the superset test below relies on.
        return tuple(masking.block_mask(key, DRAWS, **args, exact=e) for e in (False, True))

    ours = tuple(np.asarray(m) for m in both(jax.random.key(0)))
    rng = np.random.default_rng(0)
    ref = tuple(np.stack([reference_mask(rng, **args, exact=e) for _ in range(DRAWS)])
                for e in (False, True))
    return ours, ref


def chi2_pvalue(a, b):
    """Two-sample chi-square test on integer samples; sparse tail values are pooled."""
    values = np.union1d(a, b)
    edges, total = [values[0]], 0
    for v in values:  # left-to-right bins holding >= 20 draws of the pooled sample
        total += np.sum(a == v) + np.sum(b == v)
        if total >= 20:
            edges.append(v + 1)
            total = 0
    edges[-1] = values[-1] + 1
    table = np.stack([np.histogram(a, edges)[0], np.histogram(b, edges)[0]])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return stats.chi2_contingency(table)[1]


def grids(masks, setting):
    return masks.reshape(-1, SETTINGS[setting]["grid_h"], SETTINGS[setting]["grid_w"])


def components(masks, setting):
    """Connected (4-neighbour) masked regions per mask."""
    return np.array([ndimage.label(m)[1] for m in grids(masks, setting)])


def touched(masks, setting, axis):
    """Rows (axis=2) or columns (axis=1) holding a masked patch, per mask."""
    return grids(masks, setting).any(axis=axis).sum(-1)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_count_distribution_matches_reference(setting):
    (v1, v2), (r1, r2) = draws(setting)
    target = SETTINGS[setting]["num_masking_patches"]
    c1, rc1 = v1.sum(1), r1.sum(1)
    assert c1.max() <= target  # v1 may end short, never over
    assert np.mean(c1 < target) > 0.01  # and does end short sometimes
    assert chi2_pvalue(c1, rc1) > 1e-3
    se = np.sqrt(c1.var() / DRAWS + rc1.var() / DRAWS)
    assert abs(c1.mean() - rc1.mean()) < 4 * se
    np.testing.assert_array_equal(v2.sum(1), target)  # v2 is exact
    np.testing.assert_array_equal(r2.sum(1), target)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("version", [0, 1])
def test_coverage_per_position_matches_reference(setting, version):
    ours, ref = (x[version].astype(float) for x in draws(setting))
    p, q = ours.mean(0), ref.mean(0)
    pooled = (p + q) / 2
    z = (p - q) / np.sqrt(pooled * (1 - pooled) * 2 / DRAWS)
    assert np.abs(z).max() < 4.5, np.abs(z).max()  # Bonferroni over <= 196 positions
    # Blocks must reach the last row and column (inclusive randint) but favour the centre.
    grid = grids(p, setting)[0]
    assert grid[-1].mean() > 0.1 and grid[:, -1].mean() > 0.1
    assert grid[len(grid) // 2, grid.shape[1] // 2] > grid[0, 0]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_block_shapes_match_reference(setting):
    (v1, v2), (r1, r2) = draws(setting)
    for ours, ref in ((v1, r1), (v2, r2)):
        assert chi2_pvalue(components(ours, setting), components(ref, setting)) > 1e-3
    for axis in (1, 2):  # columns and rows touched: the spread of the block shapes
        assert chi2_pvalue(touched(v1, setting, axis), touched(r1, setting, axis)) > 1e-3


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_v2_fills_the_v1_mask(setting):
    (v1, v2), _ = draws(setting)
    assert not np.any(v1 & ~v2)  # same key: the blocks are kept, patches only added
    full = v1.sum(1) == SETTINGS[setting]["num_masking_patches"]
    np.testing.assert_array_equal(v1[full], v2[full])


class BlockMaskTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_shape_dtype_and_keys(self):
        fn = self.variant(lambda k: masking.block_mask(k, 8, 14, 14, 75, 16))
        m1, m2, m3 = (np.asarray(fn(jax.random.key(s))) for s in (1, 1, 2))
        chex.assert_shape(m1, (8, 196))
        self.assertEqual(m1.dtype, np.bool_)
        np.testing.assert_array_equal(m1, m2)
        self.assertFalse(np.array_equal(m1, m3))
        self.assertEqual(len({r.tobytes() for r in m1}), 8)  # samples differ within a batch

    def test_vmap_over_keys_and_rectangular_grid(self):
        keys = jax.random.split(jax.random.key(3), 3)
        fn = jax.jit(jax.vmap(lambda k: masking.block_mask(k, 4, 6, 10, 24, 4, exact=True)))
        masks = np.asarray(fn(keys))
        chex.assert_shape(masks, (3, 4, 60))
        np.testing.assert_array_equal(masks.sum(-1), 24)

    def test_a_block_never_spans_the_grid(self):
        # On 4x4 with 16 patches and blocks of >= 16, every candidate has a side of 4, which
        # the reference rejects (h < grid_h and w < grid_w): v1 masks nothing at all, and v2
        # then masks every patch by the random fill.
        fn = jax.jit(lambda k: [masking.block_mask(k, 64, 4, 4, 16, 16, exact=e)
                                for e in (False, True)])
        v1, v2 = (np.asarray(m) for m in fn(jax.random.key(6)))
        self.assertFalse(v1.any())
        self.assertTrue(v2.all())
        rng = np.random.default_rng(6)
        self.assertFalse(any(reference_mask(rng, 4, 4, 16, 16).any() for _ in range(64)))

    def test_no_host_round_trip_inside_jit(self):
        hlo = jax.jit(lambda k: masking.block_mask(k, 4, 14, 14, 75, exact=True)).lower(
            jax.random.key(0)).as_text()
        self.assertNotIn("callback", hlo)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), r"batch_size=0 must be a positive int"),
    (dict(grid_h=2.0), r"grid_h=2.0 must be a positive int"),
    (dict(num_masking_patches=197), r"num_masking_patches=197 must be a positive int <= 196"),
    (dict(num_masking_patches=0), r"num_masking_patches=0"),
    (dict(min_num_patches=0), r"min_num_patches=0 must be a number > 0"),
    (dict(min_num_patches="16"), r"min_num_patches='16'"),
    (dict(max_num_patches=0), r"max_num_patches=0 must be a positive int"),
    (dict(min_aspect=0.0), r"min_aspect=0.0 must be a number > 0"),
    (dict(max_aspect=0.2), r"max_aspect=0.2 must be None .* >= min_aspect=0.3"),
])
def test_bad_arguments_name_the_field(kwargs, match):
    args = dict(batch_size=2, grid_h=14, grid_w=14, num_masking_patches=75, min_num_patches=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        masking.block_mask(jax.random.key(0), **args)
