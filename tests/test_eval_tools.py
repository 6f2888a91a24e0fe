"""Layer-wise lr decay, LARS, position-table resizing, kNN and the cached linear probe."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mim_jax import models, optim
from mim_jax.evaluators import knn, probe
from mim_jax.evaluators.reconstruction import best_constant, masked_error
from mim_jax.models import classifier, resize, vit


def _vit(depth=3, scan=False, **kw):
    cfg = ml_collections.ConfigDict(dict(name="vit", variant="Ti/4", width=32, depth=depth,
                                         num_heads=2, mlp_dim=64, scan=scan, **kw))
    return models.vit_from_config(cfg, 16, 3)


def _classifier_params(encoder):
    model = classifier.Classifier(encoder=encoder, num_classes=5)
    return model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]


def test_layer_decay_matches_reference_rule():
    """MAE's param_groups_lrd: layer_scales[i] = decay ** (depth + 1 - i); patch_embed, cls and
    pos are layer 0, block i is layer i + 1, norms and head the top (scale 1)."""
    params = _classifier_params(_vit(depth=3, pos_embed="learned"))
    scales = optim.layer_decay_scales(params, 0.5)
    enc = scales["encoder"]
    assert enc["patch_embed"]["kernel"] == pytest.approx(0.5 ** 4)
    assert enc["cls_token"] == pytest.approx(0.5 ** 4)
    assert enc["pos_embed"] == pytest.approx(0.5 ** 4)
    for i in range(3):
        for leaf in jax.tree.leaves(enc["transformer"][f"block_{i}"]):
            assert leaf == pytest.approx(0.5 ** (3 - i))
    assert scales["head"]["kernel"] == 1.0 and scales["fc_norm"]["scale"] == 1.0


def test_layer_decay_scanned_blocks_get_per_layer_scales():
    params = _classifier_params(_vit(depth=3, scan=True))
    kernel = optim.layer_decay_scales(params, 0.5)["encoder"]["transformer"]["blocks"]["fc1"][
        "kernel"]
    np.testing.assert_allclose(np.ravel(kernel), [0.125, 0.25, 0.5])


def test_layer_decay_swin_follows_simmim_rule():
    cfg = ml_collections.ConfigDict(dict(name="swin", variant="T", window_size=2, embed_dim=16,
                                         depths=(2, 1), num_heads=(2, 2)))
    encoder = models.swin_from_config(cfg, 16, 3)
    params = _classifier_params(encoder)
    ids, top = optim.layer_ids(params)
    enc = ids["encoder"]
    assert top == 4
    assert jax.tree.leaves(enc["patch_embed"]) == [0, 0]
    assert set(jax.tree.leaves(enc["stage_0"]["block_1"])) == {2}
    assert set(jax.tree.leaves(enc["stage_0"]["downsample"])) == {2}  # with the stage's last
    assert set(jax.tree.leaves(enc["stage_1"]["block_0"])) == {3}
    assert set(jax.tree.leaves(ids["head"])) == {4}


def test_layer_decay_scales_the_adamw_step():
    """With layer decay the whole AdamW step (update + weight decay) of a layer is scaled."""
    params = _classifier_params(_vit(depth=2))
    grads = jax.tree.map(jnp.ones_like, params)
    cfg = ml_collections.ConfigDict(dict(name="adamw", b1=0.9, b2=0.999, weight_decay=0.05,
                                         layer_decay=0.5, eps=1e-8))
    plain = dict(cfg.to_dict(), layer_decay=1.0)
    tx = optim.make_optimizer(cfg, 1e-3, params)
    tx_plain = optim.make_optimizer(ml_collections.ConfigDict(plain), 1e-3, params)
    up = tx.update(grads, tx.init(params), params)[0]
    up_plain = tx_plain.update(grads, tx_plain.init(params), params)[0]
    k = lambda t: t["encoder"]["transformer"]["block_0"]["fc1"]["kernel"]
    np.testing.assert_allclose(k(up), 0.25 * k(up_plain), rtol=1e-6)
    np.testing.assert_allclose(up["head"]["kernel"], up_plain["head"]["kernel"], rtol=1e-6)


def test_lars_matches_the_mae_update():
    w = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
         "b": jnp.ones((3,))}
    g = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), w)
    tx = optim.lars(0.5, momentum=0.9, weight_decay=0.0)
    state = tx.init(w)
    up, state = tx.update(g, state, w)
    trust = 0.001 * np.linalg.norm(w["w"]) / np.linalg.norm(g["w"])
    np.testing.assert_allclose(up["w"], -0.5 * trust * np.asarray(g["w"]), rtol=1e-5)
    np.testing.assert_allclose(up["b"], -0.5 * np.asarray(g["b"]), rtol=1e-6)  # no trust ratio


def test_pos_embed_resize_keeps_cls_and_is_exact_at_same_size():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)
    same = resize.resize_pos_embed(pos, 1, 4)
    np.testing.assert_array_equal(same, pos)
    bigger = resize.resize_pos_embed(pos, 1, 6)
    assert bigger.shape == (1, 37, 8)
    np.testing.assert_array_equal(bigger[:, 0], pos[:, 0])
    # A constant grid stays constant under interpolation.
    flat = np.concatenate([pos[:, :1], np.ones((1, 16, 8), np.float32)], axis=1)
    np.testing.assert_allclose(resize.resize_pos_embed(flat, 1, 7)[:, 1:], 1.0, atol=1e-5)


def test_fit_encoder_params_resizes_and_converts_shared_bias():
    src_model = _vit(depth=2, pos_embed="learned", rel_pos_bias="shared", qkv_bias="qv")
    src = src_model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    cfg = ml_collections.ConfigDict(dict(name="vit", variant="Ti/4", width=32, depth=2,
                                         num_heads=2, mlp_dim=64, pos_embed="learned",
                                         rel_pos_bias="per_layer", qkv_bias="qv"))
    dst_model = models.vit_from_config(cfg, 24, 3)
    target = jax.eval_shape(dst_model.init, jax.random.key(1), jnp.zeros((1, 24, 24, 3)))["params"]
    fitted, notes = resize.fit_encoder_params(src, target)
    assert jax.tree.map(np.shape, fitted) == jax.tree.map(lambda s: s.shape, target)
    table = fitted["transformer"]["block_1"]["rel_pos_bias"]["table"]
    np.testing.assert_array_equal(table[-3:], np.asarray(src["rel_pos_bias"]["table"])[-3:])
    assert any("shared relative position bias" in n for n in notes)
    dst_model.apply({"params": fitted}, jnp.zeros((1, 24, 24, 3)))  # it runs


def test_fit_encoder_params_lists_every_mismatch():
    src = _vit(depth=2).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    wider = models.vit_from_config(ml_collections.ConfigDict(dict(
        name="vit", variant="Ti/4", width=48, depth=3, num_heads=2, mlp_dim=64)), 16, 3)
    target = jax.eval_shape(wider.init, jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
    with pytest.raises(ValueError) as e:
        resize.fit_encoder_params(src, target)
    message = str(e.value)
    assert "transformer/block_2/fc1/kernel (48, 64) is missing" in message
    assert "patch_embed/kernel: checkpoint (4, 4, 3, 32) vs model (4, 4, 3, 48)" in message


def test_knn_on_separable_data_is_perfect_and_weighting_matters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 5
    train_y = np.repeat(np.arange(4), 50)
    test_y = np.repeat(np.arange(4), 10)
    train_x = centers[train_y] + rng.normal(size=(200, 16))
    test_x = centers[test_y] + rng.normal(size=(40, 16))
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 1.0
    # Shuffled labels: chance level, far from perfect.
    assert knn.knn_accuracy(train_x, rng.permutation(train_y), test_x, test_y) < 0.6


def test_linear_probe_learns_a_linear_rule_and_not_shuffled_labels():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 10)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    result = probe.linear_probe(x[:500], y[:500], x[500:], y[500:])
    assert result.accuracy > 0.95 and result.l2 in probe.DEFAULT_L2_GRID
    chance = probe.linear_probe(x[:500], rng.permutation(y[:500]), x[500:], y[500:]).accuracy
    assert chance < 0.75


def _three_class_problem(seed=3, n=300, d=12):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(3, d))[y]
    return (x * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)).astype(np.float32), y


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_logistic_fit_is_scikit_learns_logistic_regression(l2):
    """Same objective as LogisticRegression(C=1/(l2 n)), multinomial, unpenalised intercept:
    the same weights and the same probabilities on the same standardised data."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _three_class_problem()
    x, _ = probe.standardize(np.float64(x), np.float64(x))
    with jax.enable_x64(True):  # as the probe runs, and tight enough to compare weights
        params, iters = probe.fit_logistic(
            jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.float64(l2),
            {"w": jnp.zeros((12, 3), jnp.float64), "b": jnp.zeros(3, jnp.float64)}, tol=1e-9)
        params = jax.tree.map(np.asarray, params)
    assert int(iters) < 1000  # converged
    ref = sklearn.LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(params["w"].T, ref.coef_, atol=1e-6)
    logits = x @ params["w"] + params["b"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), ref.predict_proba(x),
                               atol=1e-6)


def test_linear_probe_chooses_l2_on_validation_and_refits_on_all_of_train():
    x, y = _three_class_problem(seed=4, n=400, d=40)
    test_x, test_y = _three_class_problem(seed=5, n=200, d=40)
    grid = (1e-4, 1e-2, 1.0)
    result = probe.linear_probe(x, y, test_x, test_y, l2_grid=grid, val_fraction=0.25)
    fit, val = probe.validation_split(len(x), 0.25)
    assert len(val) == 100 and not set(fit) & set(val) and len(fit) + len(val) == 400
    val_acc, val_ce, _ = probe.fit_and_score(x[fit], y[fit], x[val], y[val], grid,
                                             num_classes=3)
    best = min(range(3), key=lambda i: (-val_acc[i], val_ce[i]))
    assert result.l2 == grid[best] and result.val_accuracy == pytest.approx(val_acc[best])
    test_acc, _, _ = probe.fit_and_score(x, y, test_x, test_y, [grid[best]], num_classes=3)
    assert result.accuracy == pytest.approx(test_acc[0])


def test_best_constant_guess_errors():
    rng = np.random.default_rng(2)
    targets = rng.normal(size=(200, 5)) + np.arange(5)
    mask = np.ones_like(targets)
    mean_err = masked_error(np.broadcast_to(best_constant(targets, "mse"), targets.shape),
                            targets, mask, "mse")
    assert mean_err == pytest.approx(targets.var(0).mean())
    # The mean is the best constant for MSE; the median for L1.
    for metric, other in (("mse", np.median(targets, 0)), ("l1", targets.mean(0))):
        best = masked_error(np.broadcast_to(best_constant(targets, metric), targets.shape),
                            targets, mask, metric)
        worse = masked_error(np.broadcast_to(other, targets.shape), targets, mask, metric)
        assert best <= worse
