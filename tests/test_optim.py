import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import tiny_mae_config
from mim_jax import objectives, optim
from mim_jax.errors import ConfigError


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


def _reference_lamb(params, grads_per_step, lrs, wds, decayed, stacked, *, b1, b2, eps,
                    clip, always_adapt=False, bias_correction=True):
    """SparK's LAMB (timm's rule) in float64 numpy: clip by the global grad norm, Adam moments
    with bias correction (eps added to the corrected sqrt(v)), then, for the decayed group
    only and while its wd is non-zero, + wd * p and the unclipped trust ratio ||p|| / ||u||.
    `stacked` leaves are one tensor per leading index (scanned blocks): adapted separately.
    always_adapt / bias_correction=False: timm's Lamb flags of SparK's ResNet fine-tuning."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (grads, lr, wd) in enumerate(zip(grads_per_step, lrs, wds), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        scale = clip / norm if norm > clip else 1.0
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v2[k] = b2 * v2[k] + (1 - b2) * gk ** 2
            c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
            u = (m[k] / c1) / (np.sqrt(v2[k]) / np.sqrt(c2) + eps)
            if (decayed[k] and wd != 0) or always_adapt:
                if decayed[k]:
                    u = u + wd * p[k]
                parts = list(zip(p[k], u)) if stacked[k] else [(p[k], u)]
                adapted = []
                for pw, uw in parts:
                    wn, un = np.linalg.norm(pw), np.linalg.norm(uw)
                    adapted.append(uw * (wn / un if wn > 0 and un > 0 else 1.0))
                u = np.stack(adapted) if stacked[k] else adapted[0]
            p[k] = p[k] - lr * u
    return p


def _lamb_tree():
    rng = np.random.default_rng(0)
    shapes = {"conv/kernel": (3, 3, 2, 4), "conv/bias": (4,), "norm/scale": (4,),
              "mask_token": (1, 1, 4), "transformer/blocks/fc/kernel": (2, 4, 4),
              "transformer/blocks/fc/bias": (2, 4)}
    flat = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    flat["norm/scale"] = np.ones(4, np.float32)

    def nest(d):
        out = {}
        for k, v in d.items():
            node = out
            *head, last = k.split("/")
            for h in head:
                node = node.setdefault(h, {})
            node[last] = jnp.asarray(v)
        return out
    return flat, nest


@pytest.mark.parametrize("weight_decay_end,fine_tune_flags", [(None, False), (0.2, False),
                                                               (None, True)])
def test_lamb_matches_the_reference_rule(weight_decay_end, fine_tune_flags):
    """fine_tune_flags: trust_ratio='all', bias_correction=False (timm's always_adapt=True,
    bias_correction=False), with which SparK fine-tunes ResNets."""
    flat, nest = _lamb_tree()
    decayed = {"conv/kernel": True, "conv/bias": False, "norm/scale": False,
               "mask_token": False, "transformer/blocks/fc/kernel": True,
               "transformer/blocks/fc/bias": False}
    assert _flat(optim.decay_mask(nest(flat))) == decayed
    stacked = {k: "/blocks/" in k for k in flat}
    steps = 5
    cfg = ml_collections.ConfigDict(dict(name="lamb", b1=0.9, b2=0.95, eps=1e-6,
                                         weight_decay=0.04, weight_decay_end=weight_decay_end,
                                         grad_clip_norm=5.0))
    if fine_tune_flags:
        cfg.update(trust_ratio="all", bias_correction=False)
    sched = optim.make_schedule(0.05, total_steps=steps, warmup_steps=1, min_lr=0.001)
    tx = optim.make_optimizer(cfg, sched)
    rng = np.random.default_rng(1)
    # Step 2's gradients are large, so the global-norm clip acts there.
    grads = [{k: (20.0 if i == 1 else 0.5) * rng.normal(size=v.shape).astype(np.float32)
              for k, v in flat.items()} for i in range(steps)]
    params, state = nest(flat), tx.init(nest(flat))
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(nest(g), state, params)
        params = optax.apply_updates(params, updates)
    lrs = [float(sched(i)) for i in range(steps)]
    wds = ([0.04] * steps if weight_decay_end is None else
           [0.2 + (0.04 - 0.2) * 0.5 * (1 + np.cos(np.pi * i / (steps - 1)))
            for i in range(steps)])
    want = _reference_lamb(flat, grads, lrs, wds, decayed, stacked, b1=0.9, b2=0.95, eps=1e-6,
                           clip=5.0, always_adapt=fine_tune_flags,
                           bias_correction=not fine_tune_flags)
    if fine_tune_flags:  # the flags change every group's steps, so the test can fail
        plain = _reference_lamb(flat, grads, lrs, wds, decayed, stacked, b1=0.9, b2=0.95,
                                eps=1e-6, clip=5.0)
        assert all(not np.allclose(plain[k], want[k], rtol=1e-3) for k in flat)
    got = _flat(params)
    for k in flat:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
        assert not np.allclose(got[k], flat[k]), k  # every group moved


def test_lamb_without_weight_decay_is_adam():
    """The reference adapts a group only while its weight decay is non-zero."""
    flat, nest = _lamb_tree()
    cfg = ml_collections.ConfigDict(dict(name="lamb", b1=0.9, b2=0.95, eps=1e-6,
                                         weight_decay=0.0, grad_clip_norm=0.0))
    tx = optim.make_optimizer(cfg, lambda step: 0.01)
    adam = optax.adam(0.01, b1=0.9, b2=0.95, eps=1e-6)
    grads = nest({k: np.full(v.shape, 0.3, np.float32) for k, v in flat.items()})
    got, _ = tx.update(grads, tx.init(nest(flat)), nest(flat))
    want, _ = adam.update(grads, adam.init(nest(flat)), nest(flat))
    jax.tree.map(np.testing.assert_allclose, got, want)


def test_weight_decay_schedule_is_a_per_step_cosine():
    sched = optim.make_weight_decay_schedule(0.04, 0.2, total_steps=101)
    values = np.array([float(sched(s)) for s in range(101)])
    np.testing.assert_allclose(values[[0, 50, 100]], [0.04, 0.12, 0.2], atol=1e-7)
    np.testing.assert_allclose(values[25], 0.2 - 0.16 * 0.5 * (1 + np.cos(np.pi / 4)), atol=1e-7)
    assert np.all(np.diff(values) >= 0)
    assert float(sched(150)) == pytest.approx(0.2)  # past the end it stays at the end value


def test_adamw_weight_decay_follows_the_schedule_over_the_lr_schedules_steps():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    cfg = ml_collections.ConfigDict(dict(name="adamw", b1=0.9, b2=0.95, weight_decay=0.1,
                                         weight_decay_end=0.5, grad_clip_norm=0.0))
    sched = optim.make_schedule(1.0, total_steps=11, warmup_steps=0)
    tx = optim.make_optimizer(cfg, sched)
    zero = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    wd = optim.make_weight_decay_schedule(0.1, 0.5, 11)
    for step in range(11):
        updates, state = tx.update(zero, state, params)
        np.testing.assert_allclose(updates["dense"]["kernel"],
                                   -float(sched(step)) * float(wd(step)) * np.ones((2, 2)),
                                   rtol=1e-6)
        np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
    # A schedule without a run length needs one passed explicitly.
    with pytest.raises(ValueError, match="weight_decay_end"):
        optim.make_optimizer(cfg, lambda step: 0.1)
    optim.make_optimizer(cfg, lambda step: 0.1, total_steps=11)


def test_adamw_without_weight_decay_end_is_optax_adamw_bit_for_bit():
    flat, nest = _lamb_tree()
    cfg = ml_collections.ConfigDict(dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8,
                                         weight_decay=0.05, grad_clip_norm=0.0))
    sched = optim.make_schedule(1e-2, total_steps=10, warmup_steps=2)
    tx = optim.make_optimizer(cfg, sched)
    ref = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                      mask=optim.decay_mask)
    params = nest(flat)
    s, r = tx.init(params), ref.init(params)
    for i in range(3):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
        u, s = tx.update(grads, s, params)
        v, r = ref.update(grads, r, params)
        jax.tree.map(np.testing.assert_array_equal, u, v)


@pytest.mark.parametrize("field, value, message", [
    ("name", "lambda", r"^optimizer\.name='lambda' is not supported; allowed: "
                       r"\['adamw', 'lamb', 'lars'\]\.$"),
    ("weight_decay_end", -0.1, r"^optimizer\.weight_decay_end=-0\.1 must be a finite number >= 0"),
])
def test_bad_optimizer_fields_fail_with_one_line(field, value, message):
    cfg = ml_collections.ConfigDict(dict(name="lamb", base_lr=2e-4, b1=0.9, b2=0.95, eps=1e-6,
                                         weight_decay=0.04, weight_decay_end=0.2))
    optim.validate_config(cfg)
    cfg[field] = value
    with pytest.raises(ConfigError, match=message) as info:
        optim.validate_config(cfg)
    assert "\n" not in str(info.value)


def test_warmup_can_start_above_zero():
    """SparK's schedules: warmup from 0.005 x the peak, cosine down to min_lr."""
    sched = optim.make_schedule(2.0, total_steps=110, warmup_steps=10, min_lr=0.002,
                                warmup_start_factor=0.005)
    np.testing.assert_allclose(float(sched(0)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(sched(5)), 0.01 + 1.99 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(110)), 0.002, rtol=1e-5)
    assert float(optim.make_schedule(2.0, 110, 10)(0)) == 0.0  # the default stays MAE's


@pytest.mark.parametrize("field,value,message", [
    ("warmup_start_factor", 1.5, r"^optimizer\.warmup_start_factor=1\.5 must be in \[0, 1\]"),
    ("trust_ratio", "some", r"^optimizer\.trust_ratio='some' is not supported; allowed: "
                            r"\['decayed', 'all'\]\.$"),
    ("bias_correction", "no", r"^optimizer\.bias_correction='no' must be true or false\.$"),
])
def test_lamb_fine_tuning_fields_are_checked(field, value, message):
    cfg = ml_collections.ConfigDict(dict(name="lamb", base_lr=2e-3, b1=0.9, b2=0.999,
                                         eps=1e-6, weight_decay=0.02))
    cfg[field] = value
    with pytest.raises(ValueError, match=message):
        optim.validate_config(cfg)
