"""SimMIM: numerical parity of our objective with transformers' ViTForMaskedImageModeling and
SwinForMaskedImageModeling (same weights, images and bool_masked_pos), the SimMIM-ViT backbone
options against transformers' BeitModel, the mask generator, the loss and pixel shuffle, a
few optimisation steps, the ViT / BEiT checkpoint converters, and official microsoft/SimMIM
files (ViT and Swin, training checkpoints included) in both directions."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import adam_losses, legacy_transformers_names  # noqa: E402
from mim_jax import convert, masking, models, objectives, pretrained  # noqa: E402
from mim_jax.convert import (files, simmim_params_from_hf_vit,  # noqa: E402
                             vit_params_from_hf_beit)
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

    # A mean-pooling BeitModel normalises the pooled feature (its pooler's norm, which belongs
    # to a classifier): the encoder has no final norm, and the pooler is not ours to import.
    pooled = beit_model(use_mean_pooling=True)
    assert "norm" not in vit_params_from_hf_beit(pooled.state_dict(), num_heads=4)["encoder"]
    with_pooler = beit_model(transformers.BeitModel, use_mean_pooling=True)
    with pytest.raises(ValueError, match="pooler.layernorm"):
        vit_params_from_hf_beit(with_pooler.state_dict(), num_heads=4)
    no_ls1 = {k: v for k, v in state.items() if k != "layers.1.lambda_1"}
    with pytest.raises(ValueError, match=re.escape("layers.1.lambda_1")):
        vit_params_from_hf_beit(no_ls1, num_heads=4)


# ------------------------------------------------------------------ official microsoft/SimMIM files

# Three blocks in stage 0 (8x8 tokens, windows of 4 shifted by 2 on block 1 only), then a
# stage that fits one window (4x4 tokens: no shift, no attn_mask).
SWIN_OFFICIAL = dict(SWIN_OURS, depths=(3, 2))


def random_params(shapes, seed: int = 0, qv_bias: bool = False):
    """Random values in a parameter tree (an init's zeros and ones would hide a swapped
    tensor); with qv_bias, the k slot of the qkv biases is zero, as BEiT-style layouts (no key
    bias) give it back."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        if qv_bias and [getattr(p, "key", None) for p in path[-2:]] == ["qkv", "bias"]:
            x[1] = 0.0
        return x
    return jax.tree_util.tree_map_with_path(fill, shapes)


def save_official_training_file(path, model: dict, config: dict):
    """torch.save what the reference's utils.save_checkpoint writes: the state dict under
    'model' next to optimizer / scheduler state and the run's yacs CfgNode under 'config'. The
    CfgNode class comes from a stand-in module `yacs.config`, removed again before anything is
    loaded, so reading the file proves that nothing of it is unpickled as code."""
    import sys
    import types

    class CfgNode(dict):  # what yacs pickles: dict entries plus flags in the instance __dict__
        def __init__(self, entries):
            super().__init__({k: CfgNode(v) if isinstance(v, dict) else v
                              for k, v in entries.items()})
            self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(),
                                  "__renamed_keys__": {}, "__new_allowed__": False})

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    module.CfgNode, package.config = CfgNode, module
    assert "yacs" not in sys.modules
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-4)
        torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in model.items()},
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": {"milestones": [700], "gamma": 0.1, "warmup_t": 10,
                                     "base_values": [1e-4]},
                    "max_accuracy": 0.0, "epoch": 99, "config": CfgNode(config)}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def read_official_training_file(path) -> dict:
    import sys
    state = convert.load_torch_state_dict(str(path))
    assert "yacs" not in sys.modules and "yacs.config" not in sys.modules
    return state


def official_index(window: int) -> np.ndarray:
    """The reference WindowAttention's relative_position_index, step by step as it computes it."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).copy()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    return rel.sum(-1)


def official_attn_mask(size: int, window: int, shift: int) -> np.ndarray:
    """The reference SwinTransformerBlock's attn_mask, step by step as it computes it."""
    img_mask = np.zeros((size, size))
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for h in slices:
        for w in slices:
            img_mask[h, w] = count
            count += 1
    cells = size // window
    windows = img_mask.reshape(cells, window, cells, window).transpose(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def official_swin_simmim_shapes(image, patch, channels, embed_dim, depths, num_heads, window):
    """Key -> shape of the reference SimMIM(SwinTransformerForSimMIM(...)).state_dict(), written
    from models/swin_transformer.py and models/simmim.py (ape=False, patch_norm=True,
    qkv_bias=True, mlp_ratio=4): a window >= the stage resolution is clipped to it and that
    stage does not shift; odd blocks of the other stages shift by window // 2 and register an
    attn_mask buffer (nW, N, N); every attention registers relative_position_index (N, N)."""
    shapes = {"encoder.mask_token": (1, 1, embed_dim),
              "encoder.patch_embed.proj.weight": (embed_dim, channels, patch, patch),
              "encoder.patch_embed.proj.bias": (embed_dim,),
              "encoder.patch_embed.norm.weight": (embed_dim,),
              "encoder.patch_embed.norm.bias": (embed_dim,)}
    for i, depth in enumerate(depths):
        dim, size = embed_dim * 2**i, image // patch // 2**i
        ws, shift = (size, 0) if size <= window else (window, window // 2)
        for j in range(depth):
            p = f"encoder.layers.{i}.blocks.{j}."
            shapes.update({
                f"{p}norm1.weight": (dim,), f"{p}norm1.bias": (dim,),
                f"{p}attn.relative_position_bias_table": ((2 * ws - 1) ** 2, num_heads[i]),
                f"{p}attn.relative_position_index": (ws * ws, ws * ws),
                f"{p}attn.qkv.weight": (3 * dim, dim), f"{p}attn.qkv.bias": (3 * dim,),
                f"{p}attn.proj.weight": (dim, dim), f"{p}attn.proj.bias": (dim,),
                f"{p}norm2.weight": (dim,), f"{p}norm2.bias": (dim,),
                f"{p}mlp.fc1.weight": (4 * dim, dim), f"{p}mlp.fc1.bias": (4 * dim,),
                f"{p}mlp.fc2.weight": (dim, 4 * dim), f"{p}mlp.fc2.bias": (dim,)})
            if j % 2 and shift:
                shapes[f"{p}attn_mask"] = ((size // ws) ** 2, ws * ws, ws * ws)
        if i < len(depths) - 1:
            p = f"encoder.layers.{i}.downsample."
            shapes.update({f"{p}reduction.weight": (2 * dim, 4 * dim),
                           f"{p}norm.weight": (4 * dim,), f"{p}norm.bias": (4 * dim,)})
    features, stride = embed_dim * 2 ** (len(depths) - 1), patch * 2 ** (len(depths) - 1)
    shapes.update({"encoder.norm.weight": (features,), "encoder.norm.bias": (features,),
                   "decoder.0.weight": (stride**2 * 3, features, 1, 1),
                   "decoder.0.bias": (stride**2 * 3,)})
    return shapes


def test_official_vit_round_trip_through_a_training_file(tmp_path):
    """The SimMIM ViT-B recipe (shared relative position bias, q/v biases, layer scale, no
    absolute positions) in the reference's layout: BEiT's names under `encoder.`, the head as
    `decoder.0`; written, read back from a training checkpoint and converted back."""
    obj = objectives.build(simmim_config(SIMMIM_VIT))
    shapes = jax.eval_shape(obj.init, jax.random.key(0))
    params = random_params(shapes, qv_bias=True)
    official = convert.simmim_params_to_official(params)
    beit = convert.beit_params_to_official({"encoder": params["encoder"]})
    assert set(official) == {f"encoder.{k}" for k in beit} | {"decoder.0.weight",
                                                              "decoder.0.bias"}
    for key, value in beit.items():
        assert official[f"encoder.{key}"].dtype == value.dtype
        np.testing.assert_array_equal(official[f"encoder.{key}"], value, err_msg=key)
    assert official["encoder.rel_pos_bias.relative_position_index"].dtype == np.int64
    assert "encoder.blocks.1.attn.q_bias" in official and "encoder.pos_embed" not in official
    kernel = params["decoder"]["kernel"]  # (1, 1, D, p*p*3) <-> Conv2d weight (p*p*3, D, 1, 1)
    np.testing.assert_array_equal(official["decoder.0.weight"][:, :, 0, 0], kernel[0, 0].T)

    path = tmp_path / "ckpt_epoch_99.pth"
    save_official_training_file(path, official, {"MODEL": {"TYPE": "vit", "VIT": {
        "NUM_HEADS": 4, "USE_SHARED_RPB": True, "INIT_VALUES": 0.1}}, "DATA": {"IMG_SIZE": 32}})
    state = read_official_training_file(path)
    assert set(state) == set(official)
    # Its blocks' keys end like BEiT's (.attn.q_bias, .gamma_1): it is not a BEiT file.
    assert convert.is_official_simmim(state) and not convert.is_official_beit(state)
    back = convert.simmim_params_from_official(state, num_heads=4, expected=shapes)
    assert_same_tree(back, params)
    assert_same_tree(convert.simmim_params_from_official(state, num_heads=4), back)
    scanned = convert.simmim_params_from_official(state, num_heads=4, scan=True)
    np.testing.assert_array_equal(scanned["encoder"]["transformer"]["blocks"]["ls2"][1],
                                  params["encoder"]["transformer"]["block_1"]["ls2"])
    encoder_only = {k: v for k, v in state.items() if k.startswith("encoder.")}
    assert convert.is_official_simmim(encoder_only)
    assert list(convert.simmim_params_from_official(encoder_only, num_heads=4)) == ["encoder"]


def test_official_swin_key_names_buffers_and_round_trip(tmp_path):
    obj = objectives.build(simmim_config(SWIN_OFFICIAL))
    cfg = obj.model.encoder.config
    params = random_params(jax.eval_shape(obj.init, jax.random.key(0)))
    official = convert.simmim_params_to_official(params, swin_config=cfg)
    want = official_swin_simmim_shapes(IMAGE, PATCH, 3, 16, (3, 2), (2, 4), 4)
    assert {k: v.shape for k, v in official.items()} == want
    assert [k for k in official if k.endswith("attn_mask")] == [
        "encoder.layers.0.blocks.1.attn_mask"]
    for key, value in official.items():
        if key.endswith("relative_position_index"):
            assert value.dtype == np.int64
            np.testing.assert_array_equal(value, official_index(4), err_msg=key)
        else:
            assert value.dtype == np.float32, key
    np.testing.assert_array_equal(official["encoder.layers.0.blocks.1.attn_mask"],
                                  official_attn_mask(8, 4, 2))
    # The values sit where the reference reads them: fused rows [q; k; v], torch (out, in).
    block = params["encoder"]["stage_1"]["block_1"]
    np.testing.assert_array_equal(official["encoder.layers.1.blocks.1.attn.qkv.weight"],
                                  block["attn"]["qkv"]["kernel"].reshape(32, 96).T)
    np.testing.assert_array_equal(official["encoder.layers.1.blocks.1.attn.qkv.bias"],
                                  block["attn"]["qkv"]["bias"].reshape(-1))
    np.testing.assert_array_equal(official["encoder.layers.0.downsample.reduction.weight"],
                                  params["encoder"]["stage_0"]["downsample"]["reduction"]
                                  ["kernel"].T)

    path = tmp_path / "ckpt_epoch_99.pth"
    save_official_training_file(path, official, {"MODEL": {"TYPE": "swin", "SWIN": {
        "DEPTHS": [3, 2], "NUM_HEADS": [2, 4], "WINDOW_SIZE": 4}}, "DATA": {"IMG_SIZE": 32}})
    state = read_official_training_file(path)
    assert convert.is_official_simmim(state) and not convert.is_official_beit(state)
    assert convert.swin_config_from_official(state) == cfg
    assert_same_tree(convert.simmim_params_from_official(state, swin_config=cfg), params)
    # What the training file's config became: data (an OrderedDict), no yacs code.
    with torch.serialization.safe_globals(list(files._ALLOWED_GLOBALS)):
        whole = torch.load(path, map_location="cpu", weights_only=True)
    assert type(whole["config"]).__name__ == "OrderedDict"
    assert whole["config"]["MODEL"]["SWIN"]["DEPTHS"] == [3, 2]


def test_official_files_are_told_apart():
    vit_obj = objectives.build(simmim_config(SIMMIM_VIT))
    vit_params = random_params(jax.eval_shape(vit_obj.init, jax.random.key(0)), qv_bias=True)
    simmim_vit = convert.simmim_params_to_official(vit_params)
    beit = convert.beit_params_to_official({"encoder": vit_params["encoder"]})
    swin_obj = objectives.build(simmim_config(SWIN_OURS))
    swin_params = random_params(jax.eval_shape(swin_obj.init, jax.random.key(0)))
    cfg = swin_obj.model.encoder.config
    simmim_swin = convert.simmim_params_to_official(swin_params, swin_config=cfg)
    hf_swin = convert.swin_params_to_hf(swin_params, config=cfg)
    vqkd_like = {"encoder.patch_embed.proj.weight": 0, "encoder.blocks.0.attn.q_bias": 0,
                 "decoder.blocks.0.attn.q_bias": 0, "quantize.embedding.weight": 0}
    for state, simmim, beit_file in ((simmim_vit, True, False), (simmim_swin, True, False),
                                     ({"model": simmim_swin}, True, False),
                                     (beit, False, True), (hf_swin, False, False),
                                     (vqkd_like, False, False)):
        assert convert.is_official_simmim(state) == simmim
        assert convert.is_official_beit(state) == beit_file


def one_line_error(fn, *patterns) -> str:
    with pytest.raises(ValueError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def test_official_checkpoints_that_do_not_fit():
    obj = objectives.build(simmim_config(SWIN_OFFICIAL))
    cfg = obj.model.encoder.config
    swin_state = convert.simmim_params_to_official(
        random_params(jax.eval_shape(obj.init, jax.random.key(0))), swin_config=cfg)
    other = lambda **kw: dataclasses.replace(cfg, **kw)  # noqa: E731
    one_line_error(lambda: convert.simmim_params_from_official(
        swin_state, swin_config=other(window_size=2)),
        r"encoder\.layers\.0\.blocks\.\{0,1,2\}\.attn\.relative_position_index differ from the "
        r"index of a 2x2 window", "window_size=2")
    # Same window, another image size: only the shift masks tell.
    one_line_error(lambda: convert.simmim_params_from_official(
        swin_state, swin_config=other(image_size=64)),
        r"layers\.0\.blocks\.\{1\}\.attn_mask differ", r"layers\.1\.blocks\.\{1\}\.attn_mask "
        r"missing", "image_size=64")
    message = one_line_error(lambda: convert.simmim_params_from_official(
        swin_state, swin_config=other(num_heads=(4, 4))),
        "encoder/stage_0/block_2/attn/relative_position_bias_table", r"num_heads=\(4, 4\)")
    assert "stage_1" not in message
    one_line_error(lambda: convert.simmim_params_from_official(swin_state, num_heads=2),
                   "holds a Swin encoder", "swin_config")
    missing = {k: v for k, v in swin_state.items() if k != "encoder.layers.1.blocks.0.mlp.fc2.bias"}
    one_line_error(lambda: convert.simmim_params_from_official(missing, swin_config=cfg),
                   r"missing keys \['encoder\.layers\.1\.blocks\.0\.mlp\.fc2\.bias'\]")
    extra = dict(swin_state, **{"encoder.head.weight": np.zeros((3, 32), np.float32)})
    one_line_error(lambda: convert.simmim_params_from_official(extra, swin_config=cfg),
                   r"unexpected keys \['encoder\.head\.weight'\]")
    assert "decoder" in convert.simmim_params_from_official(extra, swin_config=cfg, strict=False)

    vit_obj = objectives.build(simmim_config(SIMMIM_VIT))
    vit_state = convert.simmim_params_to_official(
        random_params(jax.eval_shape(vit_obj.init, jax.random.key(0)), qv_bias=True))
    one_line_error(lambda: convert.simmim_params_from_official(vit_state, num_heads=2),
                   "has 4 heads but num_heads=2")
    one_line_error(lambda: convert.simmim_params_from_official(vit_state, swin_config=cfg),
                   "takes num_heads")
    one_line_error(lambda: convert.simmim_params_from_official(vit_state),
                   "pass num_heads .* or swin_config")
    wide = dict(vit_state, **{"decoder.0.weight": np.zeros((3 * 64, 64, 1, 1), np.float32),
                              "decoder.0.bias": np.zeros(3 * 64, np.float32)})
    one_line_error(lambda: convert.simmim_params_from_official(wide, num_heads=4),
                   r"decoder/kernel: decoder\.0\.weight \(192, 64, 1, 1\) converts to "
                   r"\(1, 1, 64, 192\), expected \(1, 1, 64, 48\)")


@pytest.mark.parametrize("model", [SIMMIM_VIT, SWIN_OFFICIAL], ids=["vit", "swin"])
def test_finetuning_reads_the_encoder_of_an_official_file(model, tmp_path):
    """finetune.pretrained=<official SimMIM .pth>: the encoder, fitted to the classifier's (a
    relative position table per ViT block; for Swin another window, the tables resized)."""
    obj = objectives.build(simmim_config(model))
    swin_config = obj.model.encoder.config if model is SWIN_OFFICIAL else None
    params = random_params(jax.eval_shape(obj.init, jax.random.key(0)),
                           qv_bias=swin_config is None)
    path = tmp_path / "simmim_pretrain.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in convert.simmim_params_to_official(
        params, swin_config=swin_config).items()}}, path)
    finetune_model = dict(model, rel_pos_bias="per_layer") if swin_config is None else \
        dict(model, window_size=2)
    config = ml_collections.ConfigDict(dict(
        model=finetune_model, data=dict(image_size=IMAGE, channels=3),
        finetune=dict(pretrained=str(path))))
    encoder = models.backbone_from_config(config.model, IMAGE, 3)
    target = jax.eval_shape(encoder.init, jax.random.key(0),
                            jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
    fitted = pretrained.fitted_encoder_params(config, target)
    assert same_structure(fitted, target)
    if swin_config is None:
        np.testing.assert_array_equal(fitted["transformer"]["block_1"]["rel_pos_bias"]["table"],
                                      params["encoder"]["rel_pos_bias"]["table"])
    else:
        np.testing.assert_array_equal(fitted["stage_0"]["block_2"]["fc1"]["kernel"],
                                      params["encoder"]["stage_0"]["block_2"]["fc1"]["kernel"])
