"""ResNet and ConvNeXt: parity with timm's models on the same weights (stage features, logits,
export back into timm), SparK's sparse mode (masked pixels never reach visible outputs, masked
BatchNorm statistics as the reference's gathered BatchNorm1d, an all-visible mask is the dense
network), parameter counts of the real variants and named errors."""
from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("timm") is None:  # importorskip would also skip on torchvision
    pytest.skip("timm is not installed", allow_module_level=True)

from mim_jax import models  # noqa: E402
from mim_jax.convert import timm_convnet  # noqa: E402
from mim_jax.models import classifier, convnext, resnet, sparse  # noqa: E402
from timm_stub import import_timm  # noqa: E402


timm = import_timm()
timm_resnet, timm_convnext = timm.models.resnet, timm.models.convnext

SIZE, BATCH, CLASSES = 64, 2, 10
RESNET = resnet.ResNetConfig(depths=(1, 2, 1, 1), stem_width=64, widths=(8, 16, 32, 64))
CONVNEXT = convnext.ConvNeXtConfig(depths=(1, 2, 1, 1), dims=(16, 32, 64, 128))


def _randomize(model, seed):
    """Every parameter and BN statistic random and non-trivial (init leaves zeros / ones that
    would hide a dropped or swapped tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    return model.float().eval()


def _timm_resnet(seed=0):
    return _randomize(timm_resnet.ResNet(block=timm_resnet.Bottleneck, layers=RESNET.depths,
                                         channels=RESNET.widths, num_classes=CLASSES), seed)


def _timm_convnext(seed=0):
    return _randomize(timm_convnext.ConvNeXt(depths=CONVNEXT.depths, dims=CONVNEXT.dims,
                                             num_classes=CLASSES), seed)


def _features(model, images):
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        feats = model.forward_intermediates(x, indices=[1, 2, 3, 4] if hasattr(model, "layer1")
                                            else None, intermediates_only=True)
        logits = model(x)
    return [f.permute(0, 2, 3, 1).numpy() for f in feats], logits.numpy()


def _encoder_variables(variables):
    return {name: tree["encoder"] for name, tree in variables.items()}


@pytest.fixture(scope="module", params=["resnet", "convnext"])
def case(request):
    """(name, timm model, its stage features and logits, our module, our variables, images)."""
    images = np.random.RandomState(0).randn(BATCH, SIZE, SIZE, 3).astype(np.float32)
    if request.param == "resnet":
        ref, ours, cfg = _timm_resnet(), resnet.ResNet(RESNET), RESNET
    else:
        ref, ours, cfg = _timm_convnext(), convnext.ConvNeXt(CONVNEXT), CONVNEXT
    variables = timm_convnet.convnet_variables_from_timm(ref.state_dict(), config=cfg)
    feats, logits = _features(ref, images)
    return dict(name=request.param, ref=ref, feats=feats, logits=logits, model=ours, cfg=cfg,
                variables=variables, images=images)


def _mask(seed=1):
    active = np.random.RandomState(seed).rand(BATCH, SIZE // 32, SIZE // 32) > 0.5
    active[0, 0, 0], active[0, 1, 1] = True, False  # both kinds in every batch
    return jnp.asarray(active)


# ---------------------------------------------------------------- parity with timm

def test_stage_features_match_timm(case):
    feats = case["model"].apply(_encoder_variables(case["variables"]), case["images"])
    assert case["model"].stage_widths == case["cfg"].stage_widths
    for stage, (ours, theirs) in enumerate(zip(feats, case["feats"])):
        assert ours.shape == (BATCH, SIZE // 4 // 2**stage, SIZE // 4 // 2**stage,
                              case["cfg"].stage_widths[stage])
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)


def test_classifier_logits_match_timm(case):
    """The last stage through classifier.Classifier is timm's whole network: ResNet's head is
    pool -> fc, ConvNeXt's pool -> LayerNorm (Classifier's fc_norm) -> fc."""
    encoder = case["model"].clone(last_stage_only=True)
    model = classifier.Classifier(encoder=encoder, num_classes=CLASSES,
                                  fc_norm=case["name"] == "convnext")
    logits = model.apply(case["variables"], case["images"])
    np.testing.assert_allclose(np.asarray(logits), case["logits"], atol=1e-4, rtol=1e-4)


def test_export_loads_strictly_into_timm(case):
    state = timm_convnet.convnet_variables_to_timm(case["variables"], config=case["cfg"])
    fresh = _timm_resnet(seed=5) if case["name"] == "resnet" else _timm_convnext(seed=5)
    original = case["ref"].state_dict()
    assert set(state) == set(original)
    fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                          strict=True)
    for key, value in original.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), key)
    feats, logits = _features(fresh, case["images"])
    for ours, theirs in zip(feats, case["feats"]):
        np.testing.assert_array_equal(ours, theirs)


def test_mismatched_checkpoint_lists_every_problem(case):
    state = case["ref"].state_dict()
    if case["name"] == "resnet":
        wrong = resnet.ResNetConfig(depths=RESNET.depths, stem_width=64, widths=(8, 16, 32, 32))
    else:
        wrong = convnext.ConvNeXtConfig(depths=CONVNEXT.depths, dims=(16, 32, 64, 96))
    with pytest.raises(ValueError, match=r"does not fit config .*\(\d+ problems\).*expected"):
        timm_convnet.convnet_variables_from_timm(state, config=wrong)
    deeper = dict(depths=(1, 2, 2, 1))
    cfg = (resnet.ResNetConfig(**dict(vars(RESNET), **deeper)) if case["name"] == "resnet"
           else convnext.ConvNeXtConfig(**dict(vars(CONVNEXT), **deeper)))
    with pytest.raises(ValueError, match=r"missing keys \[.*\.1\."):
        timm_convnet.convnet_variables_from_timm(state, config=cfg)
    extra = dict(state, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        timm_convnet.convnet_variables_from_timm(extra, config=case["cfg"])
    timm_convnet.convnet_variables_from_timm(extra, config=case["cfg"], strict=False)


# ---------------------------------------------------------------- sparse (SparK) mode

@pytest.mark.parametrize("train", [False, True])
def test_masked_pixels_never_reach_visible_outputs(case, train):
    active = _mask()
    variables = _encoder_variables(case["variables"])
    visible = np.repeat(np.repeat(np.asarray(active), 32, 1), 32, 2)[..., None]
    noise = np.random.RandomState(2).randn(*case["images"].shape).astype(np.float32) * 100
    perturbed = np.where(visible, case["images"], noise)
    run = lambda x: case["model"].apply(variables, x, active=active, train=train,
                                        mutable=["batch_stats"])
    (feats, stats), (feats_p, stats_p) = run(case["images"]), run(perturbed)
    for f, fp in zip(feats, feats_p):
        keep = np.asarray(sparse.upsample_mask(active, f.shape[1], f.shape[2]))
        np.testing.assert_array_equal(np.asarray(f), np.asarray(fp))
        assert np.all(np.asarray(f)[np.broadcast_to(~keep, f.shape)] == 0)
        assert np.abs(np.asarray(f)[np.broadcast_to(keep, f.shape)]).max() > 0
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), stats, stats_p)
    assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.parametrize("train", [False, True])
def test_all_visible_mask_is_the_dense_network(case, train):
    variables = _encoder_variables(case["variables"])
    run = lambda **kw: case["model"].apply(variables, case["images"], train=train,
                                           mutable=["batch_stats"], **kw)
    (dense, dense_stats) = run()
    (masked, masked_stats) = run(active=jnp.ones((BATCH, SIZE // 32, SIZE // 32), bool))
    for a, b in zip(dense, masked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), dense_stats, masked_stats)
    assert all(jax.tree_util.tree_leaves(same))


def test_convnext_visible_gather_is_the_dense_masked_branch():
    """SparK's ConvNeXt with visible_cells runs its blocks' per-position layers on the visible
    rows only: same features and same gradients as the dense masked branch, and masked
    positions still exactly zero."""
    size, batch = 128, 2  # a 4 x 4 grid, 6 visible cells in every sample
    rng = np.random.RandomState(4)
    active = np.zeros((batch, 16), bool)
    for row in active:
        row[rng.permutation(16)[:6]] = True
    active = jnp.asarray(active.reshape(batch, 4, 4))
    images = rng.randn(batch, size, size, 3).astype(np.float32)
    model = convnext.ConvNeXt(CONVNEXT)
    variables = model.init(jax.random.key(0), images)
    # layer scale 1 instead of 1e-6, so the branches matter in the comparison
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.ones_like(v) if "gamma" in jax.tree_util.keystr(p) else v,
        variables["params"])

    def loss(params, **kw):
        feats = model.apply({"params": params}, images, active=active, train=True, **kw)
        return sum(jnp.sum(jnp.sin(f)) for f in feats), feats
    (l_dense, f_dense), g_dense = jax.value_and_grad(loss, has_aux=True)(params)
    (l_gather, f_gather), g_gather = jax.value_and_grad(loss, has_aux=True)(
        params, visible_cells=6)
    for a, b in zip(f_dense, f_gather):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
        keep = np.asarray(sparse.upsample_mask(active, a.shape[1], a.shape[2]))
        assert np.all(np.asarray(b)[np.broadcast_to(~keep, b.shape)] == 0)
    np.testing.assert_allclose(float(l_gather), float(l_dense), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_dense),
                            jax.tree_util.tree_leaves(g_gather)):
        # float32 sums in another order: tolerance relative to the tensor's largest entry
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4,
                                   atol=1e-6 * float(np.abs(a).max()),
                                   err_msg=jax.tree_util.keystr(path))
    positions = sparse.visible_positions(active, 32, 32, 6)  # stage 0: 8 x 8 per cell
    assert positions.shape == (batch, 6 * 64)
    flat = np.asarray(sparse.upsample_mask(active, 32, 32)).reshape(batch, -1)
    for b in range(batch):
        np.testing.assert_array_equal(np.asarray(positions[b]), np.flatnonzero(flat[b]))


def test_masked_batchnorm_is_the_references_gathered_batchnorm1d():
    """SparK's SparseBatchNorm2d: gather the active positions, BatchNorm1d them (statistics and
    running-stat update included), scatter back into zeros."""
    rng = np.random.RandomState(3)
    x = rng.randn(3, 8, 8, 5).astype(np.float32) * 2 + 1
    active = jnp.asarray(rng.rand(3, 2, 2) > 0.4)
    bn = sparse.MaskedBatchNorm()
    variables = bn.init(jax.random.key(0), x, active, train=True)
    scale, bias = rng.rand(5).astype(np.float32) + 0.5, rng.randn(5).astype(np.float32)
    mean0, var0 = rng.randn(5).astype(np.float32), rng.rand(5).astype(np.float32) + 0.5
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": mean0, "var": var0}}
    y, updates = bn.apply(variables, x, active, train=True, mutable=["batch_stats"])

    keep = np.asarray(sparse.upsample_mask(active, 8, 8))[..., 0]
    ref = torch.nn.BatchNorm1d(5, eps=1e-5, momentum=0.1).train()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        ref.bias.copy_(torch.from_numpy(bias))
        ref.running_mean.copy_(torch.from_numpy(mean0))
        ref.running_var.copy_(torch.from_numpy(var0))
        gathered = ref(torch.from_numpy(x[keep])).numpy()
    expected = np.zeros_like(x)
    expected[keep] = gathered
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], ref.running_mean.numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], ref.running_var.numpy(),
                               rtol=1e-5)
    # And by hand: the mean over active positions only, the unbiased variance.
    by_hand = x[keep]
    np.testing.assert_allclose(updates["batch_stats"]["mean"],
                               0.9 * mean0 + 0.1 * by_hand.mean(0), atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"],
                               0.9 * var0 + 0.1 * by_hand.var(0, ddof=1), rtol=1e-5)


def test_remat_and_drop_path_keep_the_forward():
    # zero_init_last=False: with timm's zero-initialised last BN every branch would be zero.
    model = resnet.ResNet(resnet.ResNetConfig(**dict(vars(RESNET), zero_init_last=False)),
                          drop_path_rate=0.2)
    images = jnp.asarray(np.random.RandomState(4).randn(BATCH, SIZE, SIZE, 3), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    rngs = {"drop_path": jax.random.key(1)}
    run = lambda m: m.apply(variables, images, active=_mask(), train=True, rngs=rngs,
                            mutable=["batch_stats"])
    (plain, _), (remat, _) = run(model), run(model.clone(remat=True))
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    (no_drop, _) = run(model.clone(drop_path_rate=0.0))
    assert not np.allclose(np.asarray(plain[-1]), np.asarray(no_drop[-1]))


# ---------------------------------------------------------------- variants, config, errors

def _param_count(model) -> int:
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def test_variant_parameter_counts():
    """timm's resnet50 (25,557,032 with its 1000-class fc) and convnext_tiny (28,589,128)."""
    r50 = models.backbone_from_config(ml_collections.ConfigDict(
        dict(name="resnet", variant="50")), 224, 3, last_stage_only=True)
    assert _param_count(r50) == 23_508_032
    assert _param_count(classifier.Classifier(r50, 1000, fc_norm=False)) == 25_557_032
    tiny = models.backbone_from_config(ml_collections.ConfigDict(
        dict(name="convnext", variant="T")), 224, 3, last_stage_only=True)
    assert _param_count(classifier.Classifier(tiny, 1000, fc_norm=True)) == 28_589_128
    assert r50.stage_widths == (256, 512, 1024, 2048)
    assert tiny.stage_widths == (96, 192, 384, 768)


@pytest.mark.parametrize("fields, image_size, message", [
    (dict(name="resnet", variant="34"), 224, r"^model.variant='34' is not a ResNet variant; "
                                             r"allowed: \['50', '101', '152', '200'\]"),
    (dict(name="resnet", variant="50", depths=(1, 1, 1)), 224, r"^model.depths=\(1, 1, 1\) must"),
    (dict(name="convnext", variant="XL"), 224, r"^model.variant='XL' .*\['T', 'S', 'B', 'L'\]"),
    (dict(name="convnext", variant="T", dims=(8, 0, 8, 8)), 224, r"^model.dims="),
    (dict(name="convnext", variant="T", drop_path_rate=1.0), 224, r"^model.drop_path_rate="),
    (dict(name="resnet", variant="50"), 200, r"^data.image_size=200 is not a multiple of 32"),
])
def test_config_errors_name_the_field(fields, image_size, message):
    with pytest.raises(ValueError, match=message):
        models.backbone_from_config(ml_collections.ConfigDict(fields), image_size, 3)


def test_bad_inputs_fail_with_named_errors():
    model = convnext.ConvNeXt(CONVNEXT)
    images = jnp.zeros((BATCH, SIZE, SIZE, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    with pytest.raises(ValueError, match=r"active has shape \(2, 4, 4\).*expected bool"):
        model.apply(variables, images, active=jnp.ones((BATCH, 4, 4), bool))
    with pytest.raises(ValueError, match=r"active .* dtype float32"):
        model.apply(variables, images, active=jnp.ones((BATCH, 2, 2)))
    with pytest.raises(ValueError, match=r"images has shape \(2, 48, 48, 3\).*multiples of 32"):
        model.apply(variables, jnp.zeros((BATCH, 48, 48, 3)))


# ------------------------------------------------------------------- stem stride option

@pytest.mark.parametrize("stem_stride, strides", [(1, (1, 2, 4, 8)), (2, (2, 4, 8, 16))])
def test_stem_stride_sets_the_total_stride_and_the_mask_grid(stem_stride, strides):
    cfg = resnet.ResNetConfig(**dict(vars(RESNET), stem_stride=stem_stride))
    model = resnet.ResNet(cfg)
    assert model.stride == strides[-1]
    images = jnp.asarray(np.random.RandomState(0).randn(BATCH, 32, 32, 3), jnp.float32)
    variables = model.init(jax.random.key(0), images)
    # The same parameters as the default stem (only the conv's stride and the pool differ).
    default = jax.eval_shape(resnet.ResNet(RESNET).init, jax.random.key(0), images)
    assert (jax.tree_util.tree_map(np.shape, default)
            == jax.tree_util.tree_map(np.shape, variables))
    feats = model.apply(variables, images)
    assert [32 // f.shape[1] for f in feats] == list(strides)
    grid = 32 // strides[-1]
    active = jnp.asarray(np.random.RandomState(1).rand(BATCH, grid, grid) < 0.5).at[:, 0, 0].set(
        True)
    visible = np.asarray(sparse.upsample_mask(active, 32, 32))
    noise = np.random.RandomState(2).randn(*images.shape).astype(np.float32) * 100
    run = lambda x: model.apply(variables, x, active=active, train=True,
                                mutable=["batch_stats"])[0]
    for f, fp in zip(run(images), run(np.where(visible, images, noise))):
        np.testing.assert_array_equal(np.asarray(f), np.asarray(fp))
    with pytest.raises(ValueError, match=rf"active has shape \(2, 1, 1\).*H/{strides[-1]}"):
        model.apply(variables, images, active=jnp.ones((BATCH, 1, 1), bool))


@pytest.mark.parametrize("stem_stride, image_size, message", [
    (3, 32, r"^model.stem_stride=3; allowed: \[1, 2, 4\]\.$"),
    (True, 32, r"^model.stem_stride=True; allowed"),
    (1, 36, r"^data.image_size=36 is not a multiple of 8, the stride of model.name='resnet'"),
])
def test_stem_stride_errors_name_the_field(stem_stride, image_size, message):
    fields = dict(name="resnet", variant="50", stem_stride=stem_stride)
    with pytest.raises(ValueError, match=message):
        models.backbone_from_config(ml_collections.ConfigDict(fields), image_size, 3)
    if image_size == 36:  # the same field at a multiple of 8 builds
        assert models.backbone_from_config(ml_collections.ConfigDict(fields), 40, 3).stride == 8


# ------------------------------------------------- layer-wise lr decay (SparK's fine-tuning)

def _spark_layer_id(name: str, depths) -> tuple:
    """(layer id, top) of a timm parameter name under SparK's fine-tuning groups, written from
    its description: ResNet stages 2 and 3 in groups of (2, 3) blocks ((4, 4) when stage 2 has
    8 or more blocks), the last stage and the head on top; ConvNeXt (its official names:
    downsample_layers.i, stages.i.j) stage 2 in groups of 3, 12 or 6 groups in all."""
    parts = name.split(".")
    if parts[0].startswith("layer") or parts[0] in ("conv1", "bn1", "fc"):  # ResNet
        b2, b3 = (4, 4) if depths[1] >= 8 else (2, 3)
        n2, n3 = -(-depths[1] // b2), -(-depths[2] // b3)
        top = 2 + n2 + n3
    if parts[0].startswith("layer"):
        stage, block = int(parts[0][5:]), int(parts[1])
        return {1: 1, 2: 2 + block // b2, 3: 2 + n2 + block // b3, 4: top}[stage], top + 1
    if parts[0] in ("conv1", "bn1"):
        return 0, top + 1
    if parts[0] == "fc":
        return top + 1, top + 1
    # ConvNeXt: timm's names -> the official ones the reference rule reads.
    top = 12 if depths[2] > 9 else 6
    if parts[0] == "stem":
        official = "downsample_layers.0"
    elif parts[0] == "stages" and parts[2] == "downsample":
        official = f"downsample_layers.{parts[1]}"
    elif parts[0] == "stages":
        official = f"stages.{parts[1]}.{parts[3]}"
    else:
        return top + 1, top + 1  # head.norm, head.fc
    kind, stage, *rest = official.split(".")
    stage = int(stage)
    if kind == "downsample_layers":
        return {0: 0, 1: 2, 2: 3, 3: top}[stage], top + 1
    return {0: 1, 1: 2, 2: 3 + int(rest[0]) // 3, 3: top}[stage], top + 1


@pytest.mark.parametrize("kind,depths", [("resnet", (3, 4, 6, 3)), ("resnet", (3, 4, 23, 3)),
                                         ("resnet", (3, 8, 36, 3)),
                                         ("convnext", (3, 3, 9, 3)),
                                         ("convnext", (3, 3, 27, 3))])
def test_layer_decay_groups_are_sparks(kind, depths):
    """Every timm tensor filled with its SparK layer id, converted to our layout, must equal
    optim.layer_ids of our tree: the grouping and the name mapping are checked together."""
    from mim_jax import optim
    if kind == "resnet":
        cfg = resnet.ResNetConfig(depths=depths, stem_width=64, widths=(4, 4, 4, 4))
        ref = timm_resnet.ResNet(block=timm_resnet.Bottleneck, layers=depths,
                                 channels=cfg.widths, num_classes=3)
    else:
        cfg = convnext.ConvNeXtConfig(depths=depths, dims=(4, 4, 4, 4))
        ref = timm_convnext.ConvNeXt(depths=depths, dims=cfg.dims, num_classes=3)
    state, tops = {}, set()
    for key, value in ref.state_dict().items():
        layer, top = _spark_layer_id(key, depths)
        tops.add(top)
        state[key] = np.full(value.shape, layer, np.float32)
    variables = timm_convnet.convnet_variables_from_timm(state, config=cfg)
    ids, top = optim.layer_ids(variables["params"])
    assert tops == {top}
    want = jax.tree_util.tree_leaves_with_path(variables["params"])
    got = dict(jax.tree_util.tree_leaves_with_path(ids))
    for path, filled in want:
        np.testing.assert_array_equal(np.broadcast_to(got[path], filled.shape), filled,
                                      jax.tree_util.keystr(path))
    assert len({float(np.ravel(v)[0]) for _, v in want}) == top + 1  # every id is used
