import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import adam_losses, tiny_mae_config
from mim_jax import objectives
from mim_jax.models import vit
from mim_jax.objectives import mae


def _images(b=4, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


def test_patchify_roundtrip_and_order():
    x = _images(2)
    patches = mae.patchify(x, 4)
    assert patches.shape == (2, 64, 48)
    np.testing.assert_array_equal(mae.unpatchify(patches, 4, 3), x)
    # patch 1 is row 0, columns 4..7; features ordered (row-in-patch, col-in-patch, channel)
    np.testing.assert_array_equal(patches[0, 1].reshape(4, 4, 3), x[0, 0:4, 4:8])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_only_counts_masked_patches(norm_pix):
    target = jax.random.normal(jax.random.key(0), (2, 16, 12))
    pred = jax.random.normal(jax.random.key(1), (2, 16, 12))
    mask = (jax.random.uniform(jax.random.key(2), (2, 16)) > 0.5).astype(jnp.float32)
    loss = mae.masked_mse(pred, target, mask, norm_pix)
    # change predictions on visible patches only: loss must not move
    noise = jax.random.normal(jax.random.key(3), pred.shape) * 10
    pred_vis_changed = pred + noise * (1 - mask)[..., None]
    np.testing.assert_allclose(mae.masked_mse(pred_vis_changed, target, mask, norm_pix), loss,
                               rtol=1e-6)
    # ... while changing a masked patch does move it
    pred_masked_changed = pred + noise * mask[..., None]
    assert abs(float(mae.masked_mse(pred_masked_changed, target, mask, norm_pix) - loss)) > 1e-3


def test_norm_pix_uses_unbiased_variance():
    target = jnp.arange(12.0).reshape(1, 1, 12)
    mean, std = mae.patch_stats(target)
    np.testing.assert_allclose(std[0, 0, 0], np.sqrt(np.var(np.arange(12.0), ddof=1) + 1e-6),
                               rtol=1e-6)


def test_objective_outputs_and_encoder_keys():
    obj = objectives.build(tiny_mae_config())
    params = obj.init(jax.random.key(0))
    assert obj.encoder_keys == ("encoder",)
    assert set(obj.encoder_params(params)) == {"encoder"}
    loss, aux = obj.loss_fn(params, {}, {"image": _images()}, {"mask": jax.random.key(1)},
                            train=False, with_outputs=True)
    assert np.isfinite(loss)
    assert aux["outputs"]["reconstruction"].shape == (4, 32, 32, 3)
    assert aux["outputs"]["mask"].shape == (4, 32, 32, 1)
    np.testing.assert_allclose(aux["metrics"]["mask_ratio"], 48 / 64)


def test_gradient_steps_lower_the_loss_on_a_fixed_batch():
    obj = objectives.build(tiny_mae_config())
    params = obj.init(jax.random.key(0))
    batch = {"image": _images(8)}
    losses = adam_losses(obj, params, batch, {"mask": jax.random.key(1)}, 1e-3, 30)
    assert losses[-1] < 0.7 * losses[0], losses


def test_drop_path_uses_its_own_stream_and_only_in_training():
    cfg = tiny_mae_config()
    cfg.model.drop_path_rate = 0.5
    obj = objectives.build(cfg)
    params = obj.init(jax.random.key(0))
    batch = {"image": _images()}
    loss = lambda dp, train: obj.loss_fn(
        params, {}, batch, {"mask": jax.random.key(1), "drop_path": jax.random.key(dp)},
        train=train)[0]
    assert loss(0, False) == loss(1, False)  # eval: deterministic
    assert loss(0, True) != loss(1, True)  # train: drop path draws from 'drop_path'
    assert loss(0, True) == loss(0, True)


@pytest.mark.parametrize("option,value", [("scan", True), ("remat", True), ("remat", "dots"),
                                          ("remat", "dots_no_batch")])
def test_scan_and_remat_give_the_same_loss(option, value):
    base = objectives.build(tiny_mae_config())
    params = base.init(jax.random.key(0))
    cfg = tiny_mae_config()
    cfg.model[option] = value
    other = objectives.build(cfg)
    other_params = params
    if option == "scan":
        other_params = jax.tree.map(lambda x: x, params)
        other_params["encoder"]["transformer"] = vit.stack_block_params(
            params["encoder"]["transformer"], 2)
        other_params["decoder"]["transformer"] = vit.stack_block_params(
            params["decoder"]["transformer"], 1)
        shapes = jax.eval_shape(other.init, jax.random.key(0))
        assert jax.tree.structure(shapes) == jax.tree.structure(other_params)
    batch, rngs = {"image": _images()}, {"mask": jax.random.key(1)}
    grad = lambda o, p: jax.grad(lambda q: o.loss_fn(q, {}, batch, rngs, train=True)[0])(p)
    np.testing.assert_allclose(other.loss_fn(other_params, {}, batch, rngs, train=True)[0],
                               base.loss_fn(params, {}, batch, rngs, train=True)[0], rtol=1e-6)
    g_base, g_other = grad(base, params), grad(other, other_params)
    if option == "scan":
        g_other["encoder"]["transformer"] = vit.unstack_block_params(
            g_other["encoder"]["transformer"])
        g_other["decoder"]["transformer"] = vit.unstack_block_params(
            g_other["decoder"]["transformer"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g_base, g_other)


def test_bf16_compute_with_float32_params():
    cfg = tiny_mae_config()
    cfg.model.dtype = "bfloat16"
    obj = objectives.build(cfg)
    params = obj.init(jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    loss, aux = obj.loss_fn(params, {}, {"image": _images()}, {"mask": jax.random.key(1)},
                            train=False, with_outputs=True)
    assert aux["outputs"]["prediction"].dtype == jnp.bfloat16
    assert loss.dtype == jnp.float32 and np.isfinite(loss)


@pytest.mark.parametrize("field,value,match", [
    ("variant", "X/16", r"variant='X/16'.*allowed"),
    ("variant", "B16", r"variant='B16'.*allowed"),
    ("patch_size", 5, r"image_size=32 is not divisible by patch_size=5"),
    ("dtype", "float64", r"model.dtype='float64'.*allowed"),
])
def test_bad_model_arguments_raise_named_errors(field, value, match):
    cfg = tiny_mae_config()
    cfg.model[field] = value
    with pytest.raises(ValueError, match=match):
        objectives.build(cfg)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2])
def test_bad_mask_ratio_in_config(ratio):
    with pytest.raises(ValueError, match=r"objective.mask_ratio=.*\(0, 1\)"):
        objectives.build(tiny_mae_config(mask_ratio=ratio))


def test_unknown_objective():
    allowed = re.escape(str(objectives.names()))
    assert "'mae'" in allowed and "'simmim'" in allowed
    with pytest.raises(ValueError, match=rf"objective.name='nope'.*allowed: {allowed}"):
        objectives.build(tiny_mae_config(name="nope"))


def test_image_shape_checked():
    obj = objectives.build(tiny_mae_config())
    params = obj.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"images has shape \(2, 28, 28, 3\); expected"):
        obj.loss_fn(params, {}, {"image": jnp.zeros((2, 28, 28, 3))}, {"mask": jax.random.key(0)},
                    train=False)


def test_variants_resolve():
    assert vit.parse_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                             patch_size=16)
    assert vit.parse_variant("H/14")["depth"] == 32
    assert vit.resolve_vit_config("Ti/4", 28).num_patches == 49


def test_unknown_remat_policy_is_refused_with_the_allowed_ones():
    cfg = tiny_mae_config()
    cfg.model.remat = "everything"
    with pytest.raises(ValueError, match=r"model.remat='everything'; allowed: .*'dots'"):
        objectives.build(cfg)


def test_scan_with_remat_and_drop_path_runs():
    cfg = tiny_mae_config()
    cfg.model.update(scan=True, remat=True, drop_path_rate=0.1)
    obj = objectives.build(cfg)
    params = obj.init(jax.random.key(0))
    rngs = {"mask": jax.random.key(1), "drop_path": jax.random.key(2)}
    grads = jax.jit(jax.grad(
        lambda p: obj.loss_fn(p, {}, {"image": _images()}, rngs, train=True)[0]))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
