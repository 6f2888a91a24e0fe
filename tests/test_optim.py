import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_mae_config
from mim_jax import objectives, optim


def _flat(tree):
    return {"/".join(getattr(k, "key", str(k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scan", [False, True])
def test_no_weight_decay_on_biases_norms_tokens_and_positions(scan):
    cfg = tiny_mae_config()
    cfg.model.update(scan=scan, pos_embed="learned", rel_pos_bias="none")
    params = jax.eval_shape(objectives.build(cfg).init, jax.random.key(0))
    mask = _flat(optim.decay_mask(params))
    decayed = {k for k, v in mask.items() if v}
    for name, value in mask.items():
        leaf = name.split("/")[-1]
        if leaf in ("bias", "scale", "cls_token", "mask_token", "pos_embed"):
            assert not value, name
        if leaf == "kernel":
            assert value, name
    assert "encoder/patch_embed/kernel" in decayed


def test_relative_position_tables_are_not_decayed():
    cfg = tiny_mae_config()
    cfg.objective = ml_collections.ConfigDict(dict(name="simmim", mask_ratio=0.6,
                                                   mask_patch_size=8))
    cfg.model.update(pos_embed="none", rel_pos_bias="per_layer", layer_scale_init=0.1)
    params = jax.eval_shape(objectives.build(cfg).init, jax.random.key(0))
    mask = _flat(optim.decay_mask(params))
    tables = [k for k in mask if "rel_pos_bias" in k]
    assert tables and not any(mask[k] for k in tables)
    assert not any(mask[k] for k in mask if k.endswith(("ls1", "ls2")))


def test_schedule_warmup_then_half_cosine():
    sched = optim.make_schedule(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    values = np.array([float(sched(s)) for s in range(111)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 1, 11), atol=1e-6)  # per-step warmup
    np.testing.assert_allclose(values[60], 0.1 + 0.9 * 0.5, atol=1e-6)  # cosine midpoint
    np.testing.assert_allclose(values[110], 0.1, atol=1e-6)
    assert np.all(np.diff(values[10:]) <= 1e-7)


def test_lr_scales_with_batch():
    cfg = ml_collections.ConfigDict(dict(base_lr=1.5e-4, lr_batch_divisor=256))
    assert optim.peak_learning_rate(cfg, 4096) == pytest.approx(2.4e-3)
    cfg.lr_batch_divisor = 512
    assert optim.peak_learning_rate(cfg, 2048) == pytest.approx(6e-4)


def test_weight_decay_is_applied_only_where_masked():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    cfg = ml_collections.ConfigDict(dict(name="adamw", b1=0.9, b2=0.95, weight_decay=0.5,
                                         grad_clip_norm=0.0))
    tx = optim.make_optimizer(cfg, lambda step: 0.1)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)))
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)


def test_unknown_optimizer_named():
    cfg = ml_collections.ConfigDict(dict(name="sgdx"))
    with pytest.raises(ValueError, match=r"optimizer.name='sgdx'"):
        optim.make_optimizer(cfg, lambda s: 0.1)
