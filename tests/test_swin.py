"""Swin encoder: numerical parity with transformers' SwinForMaskedImageModeling (encoder
features, SimMIM reconstruction and loss), shifted-window masking, the mask token, stochastic
depth, the Hugging Face converter and named errors."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mim_jax.convert.hf_swin import (config_from_hf, swin_params_from_hf,  # noqa: E402
                                     swin_params_to_hf)
from mim_jax.models import swin  # noqa: E402

# Two stages: shifted windows in both (grid 8 -> 4, window 2; grid 16 -> 8, window 4). Four
# stages: shifts in the first three, the last (2x2) is exactly one window, so it is unshifted.
TWO_STAGES = dict(image_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=2)
WINDOW_4 = dict(image_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
FOUR_STAGES = dict(image_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                   window_size=2)
# Trainable parameters of SwinModel Swin-B at 192 px / window 6 (SimMIM's pretraining setup);
# the pooler is a parameter-free average pool. It is the familiar 87.77M of Swin-B/224 minus the
# 1024x1000 classifier (86,743,224) minus 376 heads x (13^2 - 11^2) smaller bias tables.
SWIN_B_192_W6_PARAMS = 86_725_176


def our_config(arch: dict) -> swin.SwinConfig:
    rest = {k: v for k, v in arch.items() if k != "image_size"}
    return swin.resolve_swin_config("T", arch["image_size"], 3, patch_size=4, **rest)


def hf_config(arch: dict, encoder_stride: int):
    return transformers.SwinConfig(
        image_size=arch["image_size"], patch_size=4, num_channels=3,
        embed_dim=arch["embed_dim"], depths=list(arch["depths"]),
        num_heads=list(arch["num_heads"]), window_size=arch["window_size"], mlp_ratio=4.0,
        encoder_stride=encoder_stride, layer_norm_eps=1e-5, drop_path_rate=0.0,
        hidden_act="gelu", attn_implementation="eager")


def reference_model(arch: dict, seed: int = 0):
    """A float32 eval-mode HF model whose every tensor is random and non-trivial: HF init
    leaves the bias tables and the mask token at zero and LayerNorms at ones/zeros, which
    would hide a swapped or dropped parameter."""
    torch.manual_seed(seed)
    model = transformers.SwinForMaskedImageModeling(
        hf_config(arch, our_config(arch).stride)).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def pixel_shuffle(x, r: int):
    """NHWC depth-to-space in torch.nn.PixelShuffle's channel order: input channel
    c * r * r + i * r + j goes to output pixel (h * r + i, w * r + j), channel c."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


def simmim_loss(reconstruction, images, token_mask, patch_size):
    """The HF/official SimMIM loss in numpy: mean L1 over masked pixels and channels, with
    the patch mask upsampled to pixels and 1e-5 added to the masked-pixel count."""
    b, side, _, channels = images.shape
    g = side // patch_size
    mask = token_mask.reshape(b, g, g).repeat(patch_size, 1).repeat(patch_size, 2)[..., None]
    l1 = np.abs(reconstruction.astype(np.float64) - images)
    return float((l1 * mask).sum() / (mask.sum() + 1e-5) / channels)


def random_params(shapes, seed: int = 0, scale: float = 0.3):
    """Non-trivial parameters for a tree of shapes, without compiling an init function."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape).astype(np.float32), shapes)


def numpy_state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def tree_max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module", params=["two_stages", "window_4", "four_stages"])
def case(request):
    arch = dict(two_stages=TWO_STAGES, window_4=WINDOW_4, four_stages=FOUR_STAGES)[request.param]
    model = reference_model(arch)
    return arch, our_config(arch), model


# ------------------------------------------------------------------ parity with transformers

def test_simmim_parity(case):
    arch, cfg, model = case
    params = swin_params_from_hf(model.state_dict(), config=cfg)
    encoder = swin.Swin(cfg, use_mask_token=True)
    expected = jax.eval_shape(encoder.init, jax.random.key(0),
                              jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))["params"]
    assert jax.tree.structure(expected) == jax.tree.structure(params["encoder"])
    assert [e.shape for e in jax.tree.leaves(expected)] == [
        p.shape for p in jax.tree.leaves(params["encoder"])]
    assert params["decoder"]["kernel"].shape == (1, 1, cfg.num_features, cfg.stride**2 * 3)

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=gen)
    bool_masked_pos = torch.rand(3, cfg.num_patches, generator=gen) < 0.6
    with torch.no_grad():
        ref = model(pixel_values=images, bool_masked_pos=bool_masked_pos)
        ref_features = model.swin(images, bool_masked_pos=bool_masked_pos).last_hidden_state

    @jax.jit
    def forward(params, x, token_mask):
        features = encoder.apply({"params": params["encoder"]}, x, token_mask=token_mask)
        dec = params["decoder"]
        head = features @ dec["kernel"][0, 0] + dec["bias"]  # the 1x1 conv
        return features, pixel_shuffle(head, cfg.stride)

    x = images.permute(0, 2, 3, 1).numpy()  # NHWC
    token_mask = bool_masked_pos.numpy()
    with jax.default_matmul_precision("highest"):  # the reference runs float32 on CPU
        features, reconstruction = map(np.asarray, forward(params, x, token_mask))

    side = cfg.feature_size
    assert features.shape == (3, side, side, cfg.num_features)
    feat_err = np.abs(features - ref_features.numpy().reshape(features.shape)).max()
    rec_err = np.abs(reconstruction - ref.reconstruction.permute(0, 2, 3, 1).numpy()).max()
    loss = simmim_loss(reconstruction, x, token_mask, cfg.patch_size)
    loss_err = abs(loss - float(ref.loss))
    print(f"{cfg.depths} window {cfg.window_size}: max|dfeat|={feat_err:.2e} "
          f"max|drec|={rec_err:.2e} |dloss|={loss_err:.2e}")
    assert feat_err < 1e-5 and rec_err < 1e-5 and loss_err < 1e-5


def test_hf_round_trip_and_legacy_names(case):
    arch, cfg, model = case
    assert config_from_hf(model.config) == cfg
    assert config_from_hf(model.config.to_dict()) == cfg
    state = numpy_state_dict(model)
    params = swin_params_from_hf(state, config=cfg)
    exported = swin_params_to_hf(params, config=cfg)
    assert set(exported) == set(state)
    for key in state:
        np.testing.assert_array_equal(exported[key], state[key], err_msg=key)
    fresh = transformers.SwinForMaskedImageModeling(hf_config(arch, cfg.stride))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)

    # transformers 4.x names, with the persistent (N, N) index buffers those files carry.
    legacy = {}
    for key, value in state.items():
        for new, old in ((".attention.q_proj.", ".attention.self.query."),
                         (".attention.k_proj.", ".attention.self.key."),
                         (".attention.v_proj.", ".attention.self.value."),
                         (".attention.o_proj.", ".attention.output.dense."),
                         (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."),
                         (".attention.relative_position_bias.", ".attention.self.")):
            key = key.replace(new, old)
        legacy[key] = value
    for name, buf in model.named_buffers():
        legacy[name.replace(".relative_position_bias.", ".self.")] = (
            buf.numpy().reshape(int(buf.numel() ** 0.5), -1))
    assert "swin.encoder.layers.0.blocks.1.attention.self.relative_position_index" in legacy
    assert "swin.encoder.layers.1.blocks.0.output.dense.weight" in legacy
    again = swin_params_from_hf(legacy, config=cfg)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert tree_max_abs_diff(again, params) == 0.0

    # A bare SwinModel (no prefix, no mask token, no decoder).
    bare = {k[len("swin."):]: v for k, v in state.items()
            if k.startswith("swin.") and "mask_token" not in k}
    encoder_only = swin_params_from_hf(bare, config=cfg)
    assert list(encoder_only) == ["encoder"] and "mask_token" not in encoder_only["encoder"]


def test_converter_errors(case):
    arch, cfg, model = case
    state = numpy_state_dict(model)
    victim = "swin.encoder.layers.1.blocks.1.mlp.fc2.bias"
    with pytest.raises(ValueError, match=re.escape(victim)):
        swin_params_from_hf({k: v for k, v in state.items() if k != victim}, config=cfg)
    extra = dict(state, **{"classifier.weight": np.zeros((10, 4), np.float32)})
    with pytest.raises(ValueError, match="classifier.weight"):
        swin_params_from_hf(extra, config=cfg)
    swin_params_from_hf(extra, config=cfg, strict=False)
    # A wrong window size: caught by the table shapes, and by stored index buffers if any.
    wrong = our_config(dict(arch, window_size=2 * arch["window_size"]))
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        swin_params_from_hf(state, config=wrong)
    index_key = "swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"
    with pytest.raises(ValueError, match=re.escape(index_key)):
        swin_params_from_hf(dict(state, **{index_key: np.zeros((4, 4), np.int64)}), config=cfg)
    with pytest.raises(ValueError, match="use_absolute_embeddings=True"):
        config_from_hf(dict(model.config.to_dict(), use_absolute_embeddings=True))
    # The HF encoder_stride must equal our stride.
    bad_head = dict(state, **{"decoder.0.weight": state["decoder.0.weight"][:48],
                              "decoder.0.bias": state["decoder.0.bias"][:48]})
    with pytest.raises(ValueError, match="encoder_stride"):
        swin_params_from_hf(bad_head, config=cfg)


# ------------------------------------------------------------------ shifted windows

@pytest.mark.parametrize("size,window", [(8, 4), (12, 6), (14, 7), (8, 2)])
def test_shift_mask_blocks_exactly_wrapped_pairs(size, window):
    """Within a window of the rolled map, a pair may attend iff the two tokens were within one
    window's reach of each other in the original image, i.e. the roll did not wrap them apart."""
    shift = window // 2
    mask = swin.shifted_window_mask(size, window, shift)
    n = window * window
    assert mask.shape == ((size // window) ** 2, n, n)
    assert set(np.unique(mask)) == {0.0, swin.SHIFT_MASK_VALUE}
    # Original coordinates of each rolled position, partitioned into windows like activations.
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    orig = np.stack([(rows + shift) % size, (cols + shift) % size], -1)
    orig = np.asarray(swin.window_partition(orig[None], window))[0]  # [nW, N, 2]
    distance = np.abs(orig[:, :, None] - orig[:, None, :]).max(-1)
    np.testing.assert_array_equal(mask != 0, distance >= window)
    assert not (mask == 0).all()
    assert swin.shifted_window_mask(size, window, 0) is None


def _dependencies(block, params, x):
    """[token_out, token_in] bool: does any output channel depend on any input channel."""
    flat = lambda y: block.apply({"params": params}, y).reshape(-1, x.shape[-1])
    jac = jax.jit(jax.jacrev(lambda y: flat(y.reshape(x.shape))))(x.reshape(-1, x.shape[-1]))
    return np.abs(np.asarray(jac)).sum((1, 3)) > 1e-8


def test_shifted_block_only_mixes_within_windows():
    size, window, shift = 8, 4, 2
    x = jax.random.normal(jax.random.key(0), (1, size, size, 8))
    rows, cols = [a.reshape(-1) for a in np.meshgrid(np.arange(size), np.arange(size),
                                                     indexing="ij")]
    for s in (0, shift):
        block = swin.SwinBlock(num_heads=2, window_size=window, shift_size=s)
        params = random_params(jax.eval_shape(block.init, jax.random.key(1), x)["params"])
        deps = _dependencies(block, params, x)
        # Expected: same window after rolling by -s, and no wrap-around between them.
        r, c = (rows - s) % size // window, (cols - s) % size // window
        same_window = (r[:, None] == r[None]) & (c[:, None] == c[None])
        near = np.maximum(np.abs(rows[:, None] - rows[None]), np.abs(cols[:, None] - cols[None]))
        np.testing.assert_array_equal(deps, same_window & (near < window), err_msg=f"shift={s}")
    # Perturbing the top-left token reaches only the 2x2 corner it shares a region with.
    corner = deps[:, 0].reshape(size, size)
    assert corner[:2, :2].all() and corner.sum() == 4


# ------------------------------------------------------------------ sizes and param counts

def test_window_6_and_7_and_swin_b_param_count():
    for variant, image_size, window in (("B", 192, 6), ("T", 224, 7)):
        cfg = swin.resolve_swin_config(variant, image_size, window_size=window)
        assert [cfg.stage_resolution(s) for s in range(4)] == [image_size // 4 // 2**s
                                                               for s in range(4)]
        assert cfg.stage_window(3) == window and cfg.stage_shift(3) == 0
        assert cfg.stage_shift(0) == window // 2
        model = swin.Swin(cfg)
        images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
        shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
        out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), shapes, images)
        assert out.shape == (2, image_size // 32, image_size // 32, cfg.num_features)
        assert model.stride == 32 and model.num_features == cfg.embed_dim * 8
        ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        with torch.device("meta"):  # no allocation
            ref = transformers.SwinModel(transformers.SwinConfig(
                image_size=image_size, embed_dim=cfg.embed_dim, depths=list(cfg.depths),
                num_heads=list(cfg.num_heads), window_size=window))
        ref_count = sum(p.numel() for p in ref.parameters() if p.requires_grad)
        print(f"Swin-{variant} {image_size}px window {window}: ours={ours:,} HF={ref_count:,}")
        assert ours == ref_count
        if variant == "B":
            assert ours == SWIN_B_192_W6_PARAMS


# ------------------------------------------------------------------ mask token, drop path, remat

@pytest.fixture(scope="module")
def tiny():
    """A two-stage model with real init, and one jitted apply shared by the tests below (a
    token mask of all False leaves the embeddings exactly as they are)."""
    cfg = our_config(TWO_STAGES)
    model = swin.Swin(cfg, use_mask_token=True, drop_path_rate=0.3)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]

    @jax.jit
    def run(x, token_mask, rng=None):
        if rng is None:
            return model.apply({"params": params}, x, token_mask=token_mask)
        return model.apply({"params": params}, x, token_mask=token_mask, train=True,
                           rngs={"drop_path": rng})

    return cfg, model, params, x, run


def test_masked_pixels_do_not_reach_the_output(tiny):
    cfg, model, params, x, run = tiny
    token_mask = jax.random.bernoulli(jax.random.key(2), 0.5, (2, cfg.num_patches))
    pixel_mask = jnp.repeat(jnp.repeat(token_mask.reshape(2, 8, 8), 4, 1), 4, 2)[..., None]
    noise = 10.0 * jax.random.normal(jax.random.key(3), x.shape)
    base = np.asarray(run(x, token_mask))
    np.testing.assert_array_equal(np.asarray(run(x + noise * pixel_mask, token_mask)), base)
    # ... while visible pixels do, and without a mask every pixel does.
    assert not np.allclose(np.asarray(run(x + noise * (1 - pixel_mask), token_mask)), base)
    assert not np.allclose(np.asarray(run(x, jnp.zeros_like(token_mask))), base)


def test_drop_path_rates_and_rng(tiny):
    cfg, model, params, x, run = tiny
    rates = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, swin.SwinBlock) and context.method_name == "__call__":
            rates.append(context.module.drop_rate)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # at trace time: nothing is computed
        jax.eval_shape(lambda: model.apply({"params": params}, x))
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.3, sum(cfg.depths)))

    visible = jnp.zeros((2, cfg.num_patches), bool)
    eval_out = np.asarray(run(x, visible))  # train=False: no RNG given, none needed
    with pytest.raises(Exception, match="drop_path"):
        jax.eval_shape(lambda: model.apply({"params": params}, x, train=True))
    train = lambda seed: np.asarray(run(x, visible, jax.random.key(seed)))
    assert not np.allclose(train(0), eval_out) and not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(train(0), train(0))
    # With stochastic depth off, training needs no 'drop_path' RNG.
    no_drop = swin.Swin(cfg, use_mask_token=True)
    jax.eval_shape(lambda: no_drop.apply({"params": params}, x, train=True))


def test_remat_matches():
    cfg = swin.resolve_swin_config("T", 16, embed_dim=8, depths=(2,), num_heads=(2,),
                                   window_size=2)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    models = [swin.Swin(cfg, drop_path_rate=0.3, remat=r) for r in (False, True)]
    params = random_params(jax.eval_shape(models[0].init, jax.random.key(1), x)["params"])
    loss = lambda m: jax.jit(jax.value_and_grad(
        lambda p: jnp.mean(m.apply({"params": p}, x, train=True,
                                   rngs={"drop_path": jax.random.key(5)}) ** 2)))(params)
    (a, ga), (b, gb) = map(loss, models)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ga))
    print(f"remat: max|dgrad|={tree_max_abs_diff(ga, gb):.2e} (grad scale {scale:.2e})")
    assert tree_max_abs_diff(ga, gb) < 1e-5 * scale


def test_init_statistics(tiny):
    cfg, model, params, x, _ = tiny
    block = params["stage_0"]["block_0"]
    assert np.all(block["fc1"]["bias"] == 0) and np.all(block["norm1"]["scale"] == 1)
    assert np.all(block["attn"]["qkv"]["bias"] == 0)
    weights = np.concatenate([np.ravel(params[f"stage_{s}"][f"block_{j}"][name]["kernel"])
                              for s in range(2) for j in range(2) for name in ("fc1", "fc2")])
    assert abs(weights.std() - 0.02) < 0.001 and abs(weights.mean()) < 0.001
    table = np.asarray(block["attn"]["relative_position_bias_table"])
    assert table.shape == (9, 2) and 0 < np.abs(table).max() < 0.2
    assert abs(np.asarray(params["mask_token"]).std() - 0.02) < 0.01
    conv = np.asarray(params["patch_embed"]["kernel"])  # torch default: U(+-1/sqrt(fan_in))
    bound = 1 / np.sqrt(4 * 4 * 3)
    assert np.abs(conv).max() <= bound and np.abs(conv).max() > 0.9 * bound
    assert np.abs(np.asarray(params["patch_embed"]["bias"])).max() <= bound
    assert list(params["stage_0"]["downsample"]["reduction"]) == ["kernel"]  # no bias


def test_bfloat16_compute_float32_params():
    cfg = our_config(FOUR_STAGES)
    model = swin.Swin(cfg, use_mask_token=True, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    mask = jax.ShapeDtypeStruct((2, cfg.num_patches), jnp.bool_)
    out = jax.eval_shape(lambda p, y, m: model.apply({"params": p}, y, token_mask=m),
                         params, x, mask)
    assert out.shape == (2, 2, 2, 128) and out.dtype == jnp.bfloat16


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="X"), "variant='X'"),
    (dict(variant="B/4"), "variant='B/4'"),
    (dict(image_size=200), "image_size=200"),
    (dict(image_size=224, window_size=6), "window_size=6"),
    (dict(depths=(2, 2)), "depths=\\(2, 2\\)"),
    (dict(num_heads=(5, 6, 12, 24)), "num_heads"),
    (dict(window_size=0), "window_size=0"),
    (dict(mlp_ratio=0), "mlp_ratio=0"),
])
def test_config_errors(kwargs, match):
    args = dict(variant="T", image_size=192, window_size=6)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        swin.resolve_swin_config(args.pop("variant"), args.pop("image_size"), **args)


def test_call_errors(tiny):
    cfg, model, params, x, _ = tiny
    trace = lambda f: jax.eval_shape(f)  # errors are raised while tracing; nothing runs
    with pytest.raises(ValueError, match="NHWC"):
        trace(lambda: model.apply({"params": params}, jnp.zeros((2, 3, 32, 32))))
    with pytest.raises(ValueError, match="token_mask has shape"):
        trace(lambda: model.apply({"params": params}, x, token_mask=jnp.zeros((2, 8, 8), bool)))
    with pytest.raises(ValueError, match="use_mask_token=False"):
        trace(lambda: swin.Swin(cfg).init(jax.random.key(0), x,
                                          token_mask=jnp.zeros((2, 64), bool)))
    with pytest.raises(ValueError, match="drop_path_rate=1.0"):
        trace(lambda: swin.Swin(cfg, drop_path_rate=1.0).init(jax.random.key(0), x))
