"""SparK: the mask, the densify step, the light decoder, the loss and the objective."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mim_jax import masking
from mim_jax.evaluators.reconstruction import masked_error
from mim_jax.models import sparse
from mim_jax.objectives import spark


class StandInBackbone(nn.Module):
    """The backbone interface with a few strided convs: maps at strides s, 2s, 4s, 8s (s = 4
    is the reference's 4..32), zeroed at masked positions, BatchNorm over visible ones."""
    stage_widths: tuple = (8, 16, 16, 32)
    first_stride: int = 4

    @nn.compact
    def __call__(self, images, active=None, *, train=False):
        x, outs = images, []
        for i, width in enumerate(self.stage_widths):
            x = nn.Conv(width, (3, 3), strides=self.first_stride if i == 0 else 2)(x)
            x = jax.nn.relu(sparse.MaskedBatchNorm()(x, active, train=train))
            outs.append(sparse.apply_mask(x, active))
        return outs


def _config(image_size=64, mask_ratio=0.6, decoder_width=64, densify_norm="bn",
            model="resnet", **model_fields):
    return ml_collections.ConfigDict(dict(
        objective=dict(name="spark", mask_ratio=mask_ratio, decoder_width=decoder_width,
                       densify_norm=densify_norm),
        data=dict(image_size=image_size, channels=3), model=dict(name=model, **model_fields)))


def _objective(backbone=None, **kw):
    return spark.build(_config(**kw), encoder=backbone or StandInBackbone())


# ------------------------------------------------------------------------------- mask ---

@pytest.mark.parametrize("grid,ratio,keep", [((7, 7), 0.6, 20), ((4, 4), 0.6, 6),
                                             ((2, 4), 0.5, 4), ((5, 1), 0.5, 2)])
def test_spark_mask_keeps_the_reference_count(grid, ratio, keep):
    # round(cells x (1 - r)) with Python's round: 19.6 -> 20, 2.5 -> 2 (half to even).
    assert masking.spark_num_active(grid[0] * grid[1], ratio) == keep
    active = masking.spark_mask(jax.random.key(3), 16, *grid, ratio)
    assert active.shape == (16, *grid) and active.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(active).sum(axis=(1, 2)), keep)


def test_spark_mask_is_a_function_of_the_key():
    draw = lambda seed: np.asarray(masking.spark_mask(jax.random.key(seed), 8, 7, 7, 0.6))
    np.testing.assert_array_equal(draw(0), draw(0))
    assert (draw(0) != draw(1)).any()
    rows = draw(0).reshape(8, -1)
    assert len({r.tobytes() for r in rows}) == 8  # per-sample masks


def test_spark_mask_refuses_a_grid_with_nothing_to_mask():
    with pytest.raises(ValueError, match=r"mask_ratio=0.1 keeps 4 of the 2x2 cells"):
        masking.spark_mask(jax.random.key(0), 1, 2, 2, 0.1)


# ------------------------------------------------------------------------------- loss ---

def test_loss_is_the_per_cell_normalised_l2_of_masked_cells():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
    rec = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
    active = np.array([[[True, False], [False, True]], [[True, True], [True, False]]])
    loss, _ = spark.masked_cell_loss(jnp.asarray(rec), jnp.asarray(images), jnp.asarray(active))
    errors = []
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if active[b, i, j]:
                    continue
                cell = images[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].ravel().astype(np.float64)
                target = (cell - cell.mean()) / np.sqrt(cell.var(ddof=1) + 1e-6)
                pred = rec[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].ravel()
                errors.append(np.mean((pred - target) ** 2))
    assert float(loss) == pytest.approx(np.mean(errors), rel=1e-5)
    # Any change of the prediction on visible cells leaves the loss as it is.
    visible = np.repeat(np.repeat(active, 2, 1), 2, 2)[..., None]
    changed = np.where(visible, rec + 100.0, rec)
    loss2, _ = spark.masked_cell_loss(jnp.asarray(changed), jnp.asarray(images),
                                      jnp.asarray(active))
    assert float(loss2) == float(loss)


# -------------------------------------------------------------------- densify, decoder ---

def test_densify_fills_exactly_the_masked_positions_with_the_mask_token():
    feats = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) + 3.0
    active = jax.random.bernoulli(jax.random.key(1), 0.5, (2, 4, 4))
    for norm in ("none", "bn"):
        layer = spark.Densify(out_width=8, kernel=0, norm=norm)
        variables = layer.init(jax.random.key(2), feats, active, train=False)
        token = variables["params"]["mask_token"]
        assert float(jnp.abs(token).max()) <= 0.02 and float(jnp.abs(token).min()) > 0
        out, _ = layer.apply(variables, feats, active, train=True, mutable=["batch_stats"])
        a = np.asarray(active)
        np.testing.assert_array_equal(np.asarray(out)[~a], np.broadcast_to(token, (
            (~a).sum(), 8)))
        if norm == "none":
            np.testing.assert_array_equal(np.asarray(out)[a], np.asarray(feats)[a])
        else:  # batch statistics over the visible positions only
            np.testing.assert_allclose(np.asarray(out)[a].mean(0), 0.0, atol=1e-5)
            np.testing.assert_allclose(np.asarray(out)[a].var(0), 1.0, atol=1e-3)


@pytest.mark.parametrize("size,in_width,out_width", [(5, 3, 3), ((4, 6), 5, 2)])
def test_decoder_upsampling_is_torch_conv_transpose(size, in_width, out_width):
    """spark.Upsample2x (a 2x2 conv per output phase) is PyTorch's ConvTranspose2d(4, 2, 1) and
    flax's nn.ConvTranspose on the same parameters, values and gradients."""
    torch = pytest.importorskip("torch")
    h, w = (size, size) if isinstance(size, int) else size
    x = np.random.default_rng(0).normal(size=(2, in_width, h, w)).astype(np.float32)
    ref = torch.nn.ConvTranspose2d(in_width, out_width, kernel_size=4, stride=2, padding=1)
    with torch.no_grad():
        ref.bias.normal_()
    up = {"kernel": jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 1, 0)),
          "bias": jnp.asarray(ref.bias.detach().numpy())}
    ours = spark.Upsample2x(out_width)
    assert ours.init(jax.random.key(0), jnp.zeros((1, h, w, in_width)))["params"][
        "kernel"].shape == up["kernel"].shape
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    got = ours.apply({"params": up}, x_nhwc)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2),
                               ref(torch.tensor(x)).detach().numpy(), atol=1e-5)
    flax_up = nn.ConvTranspose(out_width, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                               transpose_kernel=True)
    loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x)))
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(up, x_nhwc)
    g_flax = jax.grad(loss(flax_up), argnums=(0, 1))(up, x_nhwc)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_flax)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_decoder_block_keeps_the_reference_parameter_layout():
    block = spark.UNetBlock(out_width=3)
    variables = block.init(jax.random.key(0), jnp.zeros((1, 5, 5, 6)), train=False)
    assert variables["params"]["up"]["kernel"].shape == (4, 4, 6, 6)
    assert variables["params"]["up"]["bias"].shape == (6,)


@pytest.mark.parametrize("first_stride,size", [(4, 64), (1, 32)])
def test_decoder_output_has_the_image_shape(first_stride, size):
    obj = _objective(StandInBackbone(first_stride=first_stride), image_size=size)
    cell = obj.model.cell
    assert cell == 8 * first_stride
    params, state = jax.eval_shape(obj.init_variables, jax.random.key(0))
    assert set(params) == {"encoder", "decoder", "densify_0", "densify_1", "densify_2",
                           "densify_3"}
    assert set(state["batch_stats"]) >= {"encoder", "decoder", "densify_0"}
    images = jnp.zeros((2, size, size, 3))
    active = jnp.ones((2, size // cell, size // cell), bool)
    out = jax.eval_shape(lambda v: obj.model.apply(v, images, active, train=False),
                         {"params": params, **state})
    assert out.shape == images.shape
    # Widths: decoder 64 halving per scale; the deepest projection is 1x1, the others 3x3.
    assert params["densify_0"]["proj"]["kernel"].shape == (1, 1, 32, 64)
    assert params["densify_3"]["proj"]["kernel"].shape == (3, 3, 8, 8)


@pytest.mark.parametrize("model", [
    dict(name="resnet", variant="50", depths=(1, 1, 1, 1), stem_width=8, widths=(4, 8, 8, 16)),
    dict(name="convnext", variant="T", depths=(1, 1, 1, 1), dims=(8, 16, 16, 32))])
def test_builds_on_the_real_backbones(model):
    cfg = _config(densify_norm="bn" if model["name"] == "resnet" else "ln")
    cfg.model = ml_collections.ConfigDict(dict(model, drop_path_rate=0.1))
    obj = spark.build(cfg)
    params, state = jax.eval_shape(obj.init_variables, jax.random.key(0))
    assert obj.model.levels == tuple(zip((4, 8, 16, 32), (16, 32, 32, 64) if model["name"] ==
                                         "resnet" else (8, 16, 16, 32)))
    rngs = {"mask": jax.random.key(1), "drop_path": jax.random.key(2)}
    loss, aux = jax.eval_shape(lambda p, s: obj.loss_fn(
        p, s, {"image": jnp.zeros((2, 64, 64, 3))}, rngs, True, with_outputs=True),
        params, state)
    assert loss.shape == () and aux["outputs"]["reconstruction"].shape == (2, 64, 64, 3)
    assert jax.tree.structure(aux["model_state"]) == jax.tree.structure(state)


def test_deepest_densify_is_identity_when_widths_match():
    obj = _objective(StandInBackbone(stage_widths=(8, 16, 32, 64)))
    params, _ = obj.init_variables(jax.random.key(0))
    assert "proj" not in params["densify_0"] and "proj" in params["densify_1"]


# ---------------------------------------------------------------------- the objective ---

def test_loss_fn_outputs_and_state():
    obj = _objective()
    params, state = obj.init_variables(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    rngs = {"mask": jax.random.key(2), "drop_path": jax.random.key(3)}
    loss, aux = jax.jit(lambda p, s: obj.loss_fn(p, s, {"image": images}, rngs, True,
                                                 with_outputs=True))(params, state)
    out = aux["outputs"]
    mask = np.asarray(out["mask"])
    assert mask.shape == (4, 64, 64, 1)
    assert mask.reshape(4, -1).sum(1).tolist() == [32 * 32 * 2] * 4  # 2 of 4 cells masked
    np.testing.assert_array_equal(np.asarray(out["reconstruction"])[mask[..., 0] == 0],
                                  np.asarray(images)[mask[..., 0] == 0])
    assert masked_error(out["prediction"], out["target"], out["loss_mask"], "mse") == \
        pytest.approx(float(loss), rel=1e-5)
    assert obj.error_metric == "mse" and obj.encoder_keys == ("encoder",)
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), aux["model_state"], state)
    assert all(jax.tree.leaves(changed["batch_stats"]["decoder"]))  # statistics updated


def test_a_few_steps_lower_the_loss():
    obj = _objective(StandInBackbone(first_stride=1), image_size=32, decoder_width=32)
    params, state = obj.init_variables(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    images = images + jnp.linspace(-1, 1, 32)[None, :, None, None]  # learnable structure
    rngs = {"mask": jax.random.key(2), "drop_path": jax.random.key(3)}
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, state, opt_state):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: obj.loss_fn(p, state, {"image": images}, rngs, True),
            has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), aux["model_state"], opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(25):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("overrides,message", [
    (dict(model="vit"), r"^model.name='vit': SparK pretrains a ConvNet; allowed"),
    (dict(densify_norm="gn"), r"^objective.densify_norm='gn'; allowed"),
    (dict(image_size=48), r"^data.image_size=48 must be a multiple of 32 \(the total stride "
                          r"of model.name='resnet' with stem_stride=4\)"),
    (dict(image_size=36, stem_stride=1), r"^data.image_size=36 must be a multiple of 8 "),
    (dict(image_size=48, model="convnext"), r"^data.image_size=48 must be a multiple of 32 "
                                            r"\(the total stride of model.name='convnext'\)"),
    (dict(mask_ratio=1.5), r"^objective.mask_ratio=1.5 must be"),
    (dict(decoder_width=0), r"^objective.decoder_width=0 must be a positive integer"),
    (dict(decoder_width=16), r"^objective.decoder_width=16 must be at least 32"),
    (dict(image_size=32, mask_ratio=0.1), r"^objective.mask_ratio=0.1 keeps 1 of the 1x1 cells"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        _objective(**overrides)
    assert "\n" not in str(err.value)


# ------------------------------------------------------- through the trainer's evaluators ---

def test_short_run_through_the_reconstruction_and_knn_evaluators(tfds_dir, tmp_path,
                                                                 monkeypatch):
    """The stateful objective in the trainer with evaluators on: the reconstruction evaluator
    runs the loss on the run's BatchNorm statistics and the kNN evaluator extracts the
    encoder's last-stage features with them (in eval mode)."""
    import json
    import os

    from conftest import short_run

    from configs import spark as spark_config
    from mim_jax import checkpointing, train
    from mim_jax.evaluators import features

    c = spark_config.get_config("quickstart")  # total stride 8 on 32 px: a 4 x 4 grid
    c.model.update(stem_width=8, widths=(4, 8, 8, 16))
    c.objective.decoder_width = 32
    c.evaluators = ml_collections.ConfigDict(dict(
        reconstruction=dict(type="reconstruction", every_steps=4, num_images=2, error_images=8),
        knn=dict(type="knn", every_steps=100, train_split="train", eval_split="test",
                 max_train_examples=64, max_eval_examples=32, pool="gap", batch_size=32, k=5,
                 temperature=0.07)))
    short_run(c, tfds_dir)
    seen = []
    real_extract = features.extract

    def extract(*args, **kwargs):
        out = real_extract(*args, **kwargs)
        seen.append((jax.tree.map(np.asarray, kwargs["batch_stats"]), out[0].shape))
        return out
    monkeypatch.setattr(features, "extract", extract)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(c, workdir)

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    ratios = {r["step"]: r["masked_error_ratio"] for r in records if "masked_error_ratio" in r}
    assert sorted(ratios) == [4, 8] and all(0.0 < v < 2.0 for v in ratios.values()), ratios
    assert sorted(os.listdir(os.path.join(workdir, "reconstructions"))) == [
        "step_0000004.png", "step_0000008.png"]
    knn = [r["knn/top1"] for r in records if "knn/top1" in r]
    assert len(knn) == 1 and 0.0 <= knn[0] <= 1.0
    # Train and eval features (one extraction each), pooled from the last stage (4 x 16 wide),
    # on the encoder's statistics of the final step - not those of the initialisation.
    assert [shape for _, shape in seen] == [(64, 64), (32, 64)]
    final = checkpointing.restore_raw(os.path.join(workdir, "checkpoints"), 8, "model_state")
    for stats, _ in seen:
        same = jax.tree.map(np.array_equal, stats, final["batch_stats"]["encoder"])
        assert all(jax.tree.leaves(same))
    _, init_state = spark.build(c).init_variables(jax.random.key(0))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), seen[0][0],
                         jax.tree.map(np.asarray, init_state["batch_stats"]["encoder"]))
    assert any(jax.tree.leaves(moved))
