import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import masking


class RandomMaskingTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_exact_count_and_consistency(self):
        b, n, r = 8, 196, 0.75
        fn = self.variant(lambda k: masking.random_masking(k, b, n, r))
        m = fn(jax.random.key(0))
        keep = masking.num_visible(n, r)
        self.assertEqual(keep, 49)
        chex.assert_shape(m.ids_keep, (b, keep))
        chex.assert_shape(m.mask, (b, n))
        chex.assert_shape(m.ids_restore, (b, n))
        mask = np.asarray(m.mask)
        np.testing.assert_array_equal(mask.sum(1), n - keep)  # exact per sample
        ids_keep = np.asarray(m.ids_keep)
        restore = np.asarray(m.ids_restore)
        for i in range(b):
            # the kept patches are exactly the unmasked ones
            self.assertEqual(set(ids_keep[i]), set(np.flatnonzero(mask[i] == 0)))
            # ids_restore is a permutation that inverts the shuffle: kept patches rank first
            self.assertEqual(sorted(restore[i]), list(range(n)))
            np.testing.assert_array_equal(restore[i][ids_keep[i]], np.arange(keep))

    def test_samples_differ_and_key_determines_mask(self):
        m1 = masking.random_masking(jax.random.key(1), 4, 64, 0.75)
        m2 = masking.random_masking(jax.random.key(1), 4, 64, 0.75)
        m3 = masking.random_masking(jax.random.key(2), 4, 64, 0.75)
        np.testing.assert_array_equal(m1.mask, m2.mask)
        self.assertFalse(np.array_equal(m1.mask, m3.mask))
        rows = {tuple(r) for r in np.asarray(m1.mask)}
        self.assertEqual(len(rows), 4)

    def test_matches_reference_rule_on_given_noise(self):
        noise = jax.random.uniform(jax.random.key(3), (3, 16))
        m = masking.random_masking(None, 3, 16, 0.5, noise=noise)
        shuffle = np.argsort(np.asarray(noise), axis=1)
        np.testing.assert_array_equal(m.ids_keep, shuffle[:, :8])
        np.testing.assert_array_equal(m.ids_restore, np.argsort(shuffle, axis=1))
        ref_mask = np.ones((3, 16))
        ref_mask[:, :8] = 0
        np.testing.assert_array_equal(m.mask, np.take_along_axis(ref_mask, m.ids_restore, 1))

    def test_vmap_over_keys(self):
        keys = jax.random.split(jax.random.key(4), 3)
        masks = jax.vmap(lambda k: masking.random_masking(k, 2, 49, 0.75).mask)(keys)
        chex.assert_shape(masks, (3, 2, 49))
        np.testing.assert_array_equal(np.asarray(masks).sum(-1), 49 - 12)

    def test_no_host_round_trip_inside_jit(self):
        # Lowering must succeed with abstract inputs: any host sync (np.asarray, int()) of a
        # traced value would raise a ConcretizationTypeError here.
        lowered = jax.jit(lambda k: masking.random_masking(k, 16, 196, 0.75)).lower(
            jax.random.key(0))
        hlo = lowered.as_text()
        self.assertNotIn("custom_call_target=\"xla_python", hlo)
        self.assertNotIn("callback", hlo)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, "0.5"])
def test_bad_mask_ratio_names_the_argument(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio=.*open interval \(0, 1\)"):
        masking.random_masking(jax.random.key(0), 2, 16, ratio)


def test_noise_shape_checked():
    with pytest.raises(ValueError, match="noise has shape"):
        masking.random_masking(None, 2, 16, 0.5, noise=jnp.zeros((2, 15)))
