"""SimMIM: numerical parity of our objective with transformers' ViTForMaskedImageModeling and
SwinForMaskedImageModeling (same weights, images and bool_masked_pos), the SimMIM-ViT backbone
options against transformers' BeitModel, the mask generator, the loss and pixel shuffle, a
few optimisation steps, and the ViT / BEiT checkpoint converters."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import adam_losses, legacy_transformers_names  # noqa: E402
from mim_jax import masking, models, objectives  # noqa: E402
from mim_jax.convert import simmim_params_from_hf_vit, vit_params_from_hf_beit  # noqa: E402
from mim_jax.convert.hf_swin import config_from_hf, swin_params_from_hf  # noqa: E402
from mim_jax.objectives import simmim  # noqa: E402

IMAGE, PATCH, MASK_PATCH = 32, 4, 8
GRID = IMAGE // PATCH
VIT_HF = dict(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=64,
              num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="eager")
VIT_OURS = dict(name="vit", variant="Ti/4", width=64, depth=2, num_heads=4, mlp_dim=128)
# Two stages: 8x8 tokens in windows of 4 (shifted), then 4x4 = one window (unshifted).
SWIN_OURS = dict(name="swin", variant="T", embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                 window_size=4)
SWIN_STRIDE = PATCH * 2  # patch 4, one patch merging
# The SimMIM-ViT / BEiT options; BEiT's layer_norm_eps default is 1e-12, our ViT's is 1e-6.
BEIT_HF = dict(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=64,
               num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               layer_norm_eps=1e-6, hidden_act="gelu", use_mask_token=True,
               use_absolute_position_embeddings=False, use_shared_relative_position_bias=True,
               use_relative_position_bias=False, layer_scale_init_value=0.1,
               use_mean_pooling=False, attn_implementation="eager")
SIMMIM_VIT = dict(VIT_OURS, pos_embed="none", rel_pos_bias="shared", layer_scale_init=0.1,
                  qkv_bias="qv")


def simmim_config(model: dict, mask_patch_size: int = MASK_PATCH):
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=IMAGE, channels=3), model=dict(model),
        objective=dict(name="simmim", mask_ratio=0.6, mask_patch_size=mask_patch_size)))


def randomize(model, seed: int = 0, scale: float = 0.1):
    """float32 eval mode, every tensor perturbed: HF init leaves the mask token, relative
    position tables and biases at zero and LayerNorms at one, which would hide a swapped or
    dropped parameter."""
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model


def inputs(batch: int = 3, seed: int = 1):
    """NCHW images and a [B, L] patch mask (HF's bool_masked_pos)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)
    return images, torch.rand(batch, GRID * GRID, generator=gen) < 0.6


def nhwc(images) -> jnp.ndarray:
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def numpy_state_dict(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def same_structure(params, expected) -> bool:
    shapes = lambda tree: jax.tree.map(lambda x: tuple(np.shape(x)), tree)  # noqa: E731
    return shapes(params) == shapes(expected)


def objective_outputs(obj, params, images, bool_masked_pos):
    # Full float32 matmuls: the reference runs float32 on CPU.
    with jax.default_matmul_precision("highest"):
        loss, aux = jax.jit(obj.loss_fn, static_argnames=("train", "with_outputs"))(
            params, {}, {"image": nhwc(images)}, {}, train=False, with_outputs=True,
            token_mask=jnp.asarray(bool_masked_pos.numpy()))
    return float(loss), np.asarray(aux["outputs"]["reconstruction"])


def assert_parity(name, ref, loss, reconstruction, atol=1e-5):
    rec_err = float(np.abs(reconstruction - ref.reconstruction.permute(0, 2, 3, 1).numpy()).max())
    loss_err = abs(loss - float(ref.loss))
    print(f"{name}: max|drec|={rec_err:.2e} |dloss|={loss_err:.2e}")
    assert rec_err < atol and loss_err < atol


# ------------------------------------------------------------------ parity with transformers

@pytest.fixture(scope="module")
def hf_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(**VIT_HF, qkv_bias=True, encoder_stride=PATCH)
    return randomize(transformers.ViTForMaskedImageModeling(config))


def test_vit_parity(hf_vit):
    obj = objectives.build(simmim_config(dict(VIT_OURS, pos_embed="learned", cls_token=True,
                                              qkv_bias="qkv")))
    params = simmim_params_from_hf_vit(hf_vit.state_dict(), num_heads=4)
    assert same_structure(params, jax.eval_shape(obj.init, jax.random.key(0)))
    assert params["encoder"]["pos_embed"].shape == (1, 1 + GRID * GRID, 64)
    assert params["decoder"]["kernel"].shape == (1, 1, 64, PATCH**2 * 3)
    images, bool_masked_pos = inputs()
    with torch.no_grad():
        ref = hf_vit(pixel_values=images, bool_masked_pos=bool_masked_pos)
    loss, reconstruction = objective_outputs(obj, params, images, bool_masked_pos)
    assert_parity("ViT", ref, loss, reconstruction)


def test_swin_parity():
    obj = objectives.build(simmim_config(SWIN_OURS))
    cfg = obj.model.encoder.config
    torch.manual_seed(0)
    hf_cfg = transformers.SwinConfig(
        image_size=IMAGE, patch_size=PATCH, num_channels=3, embed_dim=16, depths=[2, 2],
        num_heads=[2, 4], window_size=4, encoder_stride=SWIN_STRIDE, hidden_act="gelu",
        attn_implementation="eager")
    assert config_from_hf(hf_cfg) == cfg and cfg.stride == SWIN_STRIDE
    model = randomize(transformers.SwinForMaskedImageModeling(hf_cfg))
    # hf_swin already returns the objective's layout: {'encoder': Swin, 'decoder': 1x1 conv}.
    params = swin_params_from_hf(model.state_dict(), config=cfg)
    assert same_structure(params, jax.eval_shape(obj.init, jax.random.key(0)))
    images, bool_masked_pos = inputs()
    with torch.no_grad():
        ref = model(pixel_values=images, bool_masked_pos=bool_masked_pos)
    loss, reconstruction = objective_outputs(obj, params, images, bool_masked_pos)
    assert_parity("Swin", ref, loss, reconstruction)


def beit_model(cls=None, **overrides):
    torch.manual_seed(0)
    config = transformers.BeitConfig(**dict(BEIT_HF, **overrides))
    if cls is None:
        return randomize(transformers.BeitModel(config, add_pooling_layer=False))
    return randomize(cls(config))


def beit_parity(ref_tokens, params, images, bool_masked_pos, name, **options):
    model = models.backbone_from_config(ml_collections.ConfigDict(dict(VIT_OURS, **options)),
                                        IMAGE, 3, use_mask_token=True)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)),
                              token_mask=jnp.zeros((1, GRID * GRID), bool))["params"]
    assert same_structure(params["encoder"], expected)
    with jax.default_matmul_precision("highest"):
        tokens = jax.jit(lambda p, x, m: model.apply({"params": p}, x, token_mask=m))(
            params["encoder"], nhwc(images), jnp.asarray(bool_masked_pos.numpy()))
    err = float(np.abs(np.asarray(tokens) - ref_tokens).max())
    print(f"{name}: max|dtokens|={err:.2e} (max|tokens|={np.abs(ref_tokens).max():.2f})")
    assert err < 1e-5


def test_simmim_vit_options_match_beit():
    """Shared relative position bias + q/v biases + layer scale, no absolute positions: the
    SimMIM ViT-B recipe, which is BEiT's encoder."""
    model = beit_model()
    params = vit_params_from_hf_beit(model.state_dict(), num_heads=4)
    images, bool_masked_pos = inputs()
    with torch.no_grad():
        ref = model(pixel_values=images, bool_masked_pos=bool_masked_pos).last_hidden_state
    beit_parity(ref.numpy(), params, images, bool_masked_pos, "BEiT shared",
                **{k: v for k, v in SIMMIM_VIT.items() if k != "name"})


def test_beit_per_layer_bias_absolute_positions_and_mim_head_norm():
    """BeitForMaskedImageModeling: the final norm is the top-level `layernorm` (the inner one
    is an identity with use_mean_pooling=True); per-layer tables and learned positions."""
    model = beit_model(transformers.BeitForMaskedImageModeling,
                       use_absolute_position_embeddings=True, use_mean_pooling=True,
                       use_shared_relative_position_bias=False, use_relative_position_bias=True)
    state = numpy_state_dict(model)
    with pytest.raises(ValueError, match="lm_head"):  # BEiT's own head is not ours
        vit_params_from_hf_beit(state, num_heads=4)
    params = vit_params_from_hf_beit(state, num_heads=4, strict=False)
    legacy = legacy_transformers_names(state, "beit.")
    assert "beit.encoder.layer.1.attention.attention.relative_position_bias." \
        "relative_position_bias_table" in legacy
    assert_same_tree(vit_params_from_hf_beit(legacy, num_heads=4, strict=False), params)
    images, bool_masked_pos = inputs()
    with torch.no_grad():
        hidden = model.beit(pixel_values=images, bool_masked_pos=bool_masked_pos)
        ref = model.layernorm(hidden.last_hidden_state)
    beit_parity(ref.numpy(), params, images, bool_masked_pos, "BEiT per-layer + abs pos",
                pos_embed="learned", rel_pos_bias="per_layer", layer_scale_init=0.1,
                qkv_bias="qv")


def test_simmim_vit_runs_and_uses_its_relative_position_bias():
    obj = objectives.build(simmim_config(SIMMIM_VIT))
    params = obj.init(jax.random.key(0))
    encoder = params["encoder"]
    assert "pos_embed" not in encoder and encoder["rel_pos_bias"]["table"].shape == (
        (2 * GRID - 1) ** 2 + 3, 4)
    assert not np.any(encoder["rel_pos_bias"]["table"])  # zero init, as BEiT
    np.testing.assert_array_equal(encoder["transformer"]["block_0"]["ls1"], np.float32(0.1))
    images = jax.random.normal(jax.random.key(1), (2, IMAGE, IMAGE, 3))
    run = jax.jit(lambda p: obj.loss_fn(p, {}, {"image": images}, {"mask": jax.random.key(2)},
                                        train=False, with_outputs=True))
    loss, aux = run(params)
    assert np.isfinite(float(loss))
    table = jax.random.normal(jax.random.key(3), encoder["rel_pos_bias"]["table"].shape)
    changed = {**params, "encoder": {**encoder, "rel_pos_bias": {"table": table}}}
    _, aux2 = run(changed)
    diff = np.abs(np.asarray(aux["outputs"]["reconstruction"])
                  - np.asarray(aux2["outputs"]["reconstruction"])).max()
    assert diff > 1e-3


# ------------------------------------------------------------------ mask generator

def test_simmim_mask_count_cells_and_orientation():
    key, b, ratio = jax.random.key(0), 5, 0.6
    mask = np.asarray(masking.simmim_mask(key, b, IMAGE, MASK_PATCH, PATCH, ratio))
    cells_side, scale = IMAGE // MASK_PATCH, MASK_PATCH // PATCH
    assert mask.shape == (b, GRID * GRID) and mask.dtype == bool
    # The reference rule on the same noise: the first ceil(r * cells) cells of a random
    # permutation, row-major, each upsampled to scale x scale model patches.
    order = np.argsort(np.asarray(jax.random.uniform(key, (b, cells_side**2))), axis=1)
    count = int(np.ceil(ratio * cells_side**2))
    assert count == 10
    cells = np.zeros((b, cells_side**2), bool)
    np.put_along_axis(cells, order[:, :count], True, axis=1)
    expected = np.stack([np.kron(c.reshape(cells_side, cells_side), np.ones((scale, scale)))
                         for c in cells]).reshape(b, -1).astype(bool)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(mask.sum(1), count * scale**2)
    assert len({tuple(m) for m in mask}) == b  # samples differ


def test_simmim_mask_keys_jit_and_vmap():
    fn = lambda k: masking.simmim_mask(k, 2, IMAGE, MASK_PATCH, PATCH, 0.6)  # noqa: E731
    a, b = fn(jax.random.key(1)), fn(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fn(jax.random.key(2)))
    np.testing.assert_array_equal(jax.jit(fn)(jax.random.key(1)), a)
    keys = jax.random.split(jax.random.key(3), 3)
    batched = jax.jit(jax.vmap(fn))(keys)
    assert batched.shape == (3, 2, GRID * GRID)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], fn(keys[i]))


@pytest.mark.parametrize("mask_patch", [6, 12])  # not a multiple of 4 / does not divide 32
def test_bad_mask_patch_size(mask_patch):
    with pytest.raises(ValueError, match=f"mask_patch_size={mask_patch}"):
        masking.simmim_mask(jax.random.key(0), 1, IMAGE, mask_patch, PATCH, 0.6)
    with pytest.raises(ValueError, match=f"objective.mask_patch_size={mask_patch}"):
        objectives.build(simmim_config(VIT_OURS, mask_patch_size=mask_patch))


# ------------------------------------------------------------------ loss and pixel shuffle

def test_loss_counts_only_masked_pixels():
    images = jax.random.normal(jax.random.key(0), (2, IMAGE, IMAGE, 3))
    recon = jax.random.normal(jax.random.key(1), images.shape)
    token_mask = masking.simmim_mask(jax.random.key(2), 2, IMAGE, MASK_PATCH, PATCH, 0.6)
    pixel_mask = simmim.upsample_mask(token_mask, GRID, PATCH)
    loss = float(simmim.masked_l1(recon, images, pixel_mask))
    m = np.asarray(pixel_mask)
    l1 = np.abs(np.asarray(recon, np.float64) - np.asarray(images))
    assert loss == pytest.approx((l1 * m).sum() / (m.sum() + 1e-5) / 3, rel=1e-5)
    noise = 5.0 * jax.random.normal(jax.random.key(3), images.shape)
    visible_changed = jnp.where(pixel_mask > 0, recon, recon + noise)
    assert float(simmim.masked_l1(visible_changed, images, pixel_mask)) == loss
    masked_changed = jnp.where(pixel_mask > 0, recon + noise, recon)
    assert float(simmim.masked_l1(masked_changed, images, pixel_mask)) != pytest.approx(loss)


def test_pixel_shuffle_matches_torch():
    r = 4
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 3 * r * r)).astype(np.float32)
    ours = np.asarray(simmim.pixel_shuffle(jnp.asarray(x), r))
    ref = torch.nn.PixelShuffle(r)(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())


# ------------------------------------------------------------------ optimisation

@pytest.mark.parametrize("model", [VIT_OURS, SWIN_OURS], ids=["vit", "swin"])
def test_gradient_steps_lower_the_loss(model):
    obj = objectives.build(simmim_config(model))
    params = obj.init(jax.random.key(0))
    batch = {"image": jax.random.uniform(jax.random.key(1), (4, IMAGE, IMAGE, 3))}
    losses = adam_losses(obj, params, batch, {"mask": jax.random.key(2)}, 3e-3, 15)
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------ converters

def assert_same_tree(a, b):
    assert same_structure(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_vit_converter_legacy_names_scan_and_errors(hf_vit):
    state = numpy_state_dict(hf_vit)
    params = simmim_params_from_hf_vit(state, num_heads=4)
    legacy = legacy_transformers_names(state, "vit.")
    assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
    assert_same_tree(simmim_params_from_hf_vit(legacy, num_heads=4), params)
    scanned = simmim_params_from_hf_vit(state, num_heads=4, scan=True)
    np.testing.assert_array_equal(
        scanned["encoder"]["transformer"]["blocks"]["fc1"]["kernel"][1],
        params["encoder"]["transformer"]["block_1"]["fc1"]["kernel"])
    # A bare ViTModel: no prefix, no decoder; its pooler is not ours.
    bare = transformers.ViTModel(transformers.ViTConfig(**VIT_HF), use_mask_token=False)
    with pytest.raises(ValueError, match="pooler.dense.weight"):
        simmim_params_from_hf_vit(bare.state_dict(), num_heads=4)
    encoder_only = simmim_params_from_hf_vit(bare.state_dict(), num_heads=4, strict=False)
    assert list(encoder_only) == ["encoder"] and "mask_token" not in encoder_only["encoder"]

    victim = "vit.layers.1.mlp.fc2.bias"
    with pytest.raises(ValueError, match=re.escape(victim)):
        simmim_params_from_hf_vit({k: v for k, v in state.items() if k != victim}, num_heads=4)
    with pytest.raises(ValueError, match="num_heads=0"):
        simmim_params_from_hf_vit(state, num_heads=0)
    clash = dict(state, **{"vit.encoder.layer.0.mlp.fc1.bias": state["vit.layers.0.mlp.fc1.bias"]})
    with pytest.raises(ValueError, match="old and new"):
        simmim_params_from_hf_vit(clash, num_heads=4)
    wrong_stride = dict(state, **{"decoder.0.weight": np.zeros((3 * 64, 64, 1, 1), np.float32),
                                  "decoder.0.bias": np.zeros((3 * 64,), np.float32)})
    with pytest.raises(ValueError, match="encoder_stride"):
        simmim_params_from_hf_vit(wrong_stride, num_heads=4)
    with pytest.raises(ValueError, match="position_embeddings"):
        simmim_params_from_hf_vit(dict(state, **{"vit.embeddings.position_embeddings": np.zeros(
            (1, 51, 64), np.float32)}), num_heads=4)  # 50 patches: not a square grid


def test_beit_converter_legacy_names_index_buffers_and_errors():
    model = beit_model()
    state = numpy_state_dict(model)
    params = vit_params_from_hf_beit(state, num_heads=4)
    # 4.x names with the (N, N) index buffers those files carry, from transformers' own rule.
    index = transformers.models.beit.modeling_beit.BeitRelativePositionBias \
        .generate_relative_position_index((GRID, GRID)).numpy()
    legacy = legacy_transformers_names(state, "")
    legacy["encoder.relative_position_bias.relative_position_index"] = index
    assert "encoder.relative_position_bias.relative_position_bias_table" in legacy
    assert "encoder.layer.0.attention.attention.key.weight" in legacy
    assert_same_tree(vit_params_from_hf_beit(legacy, num_heads=4), params)
    legacy["encoder.relative_position_bias.relative_position_index"] = index.T
    with pytest.raises(ValueError, match="relative_position_index"):
        vit_params_from_hf_beit(legacy, num_heads=4)

    qkv = params["encoder"]["transformer"]["block_0"]["attn"]["qkv"]
    assert not np.any(qkv["bias"][1])  # BEiT's k has no bias
    np.testing.assert_array_equal(qkv["bias"][2].reshape(-1),
                                  state["layers.0.attention.v_proj.bias"])
    with pytest.raises(ValueError, match=r"has 4 heads but num_heads=2"):
        vit_params_from_hf_beit(state, num_heads=2)
    scanned = vit_params_from_hf_beit(state, num_heads=4, scan=True)
    assert scanned["encoder"]["transformer"]["blocks"]["ls1"].shape == (2, 64)

    pooled = beit_model(use_mean_pooling=True)
    with pytest.raises(ValueError, match="pooler.layernorm"):
        vit_params_from_hf_beit(pooled.state_dict(), num_heads=4)
    no_ls1 = {k: v for k, v in state.items() if k != "layers.1.lambda_1"}
    with pytest.raises(ValueError, match=re.escape("layers.1.lambda_1")):
        vit_params_from_hf_beit(no_ls1, num_heads=4)
