"""Numerical parity of the mim_jax MAE objective with the Hugging Face transformers ViTMAE
reference (same weights, images and masking noise), and the checkpoint converters for the
Hugging Face and the official facebookresearch/mae layouts."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import legacy_transformers_names  # noqa: E402
from mim_jax import masking, objectives  # noqa: E402
from mim_jax.convert import (encoder_params_to_hf, load_torch_state_dict,  # noqa: E402
                             mae_params_from_hf, mae_params_from_official, mae_params_to_hf,
                             mae_params_to_official)
from mim_jax.models import vit  # noqa: E402

SMALL = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=128, decoder_hidden_size=32,
             decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
             decoder_intermediate_size=128)
# ViTMAE defaults are the paper's ViT-B/16 + 8x512 decoder; eps 1e-6 is the official value
# (the HF config default is 1e-12).
B16 = dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
           num_attention_heads=12, intermediate_size=3072, decoder_hidden_size=512,
           decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
           decoder_intermediate_size=2048)
# Trainable parameters of ViT-B/16 without head (85,647,360) + the 8-block 512-wide decoder
# with its embed/pred projections and mask token (26,008,320); see test_b16_param_count.
B16_PARAM_COUNT = 111_655_680


def hf_config(arch: dict, norm_pix_loss: bool = True):
    return transformers.ViTMAEConfig(
        **arch, mask_ratio=0.75, norm_pix_loss=norm_pix_loss, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, attn_implementation="eager")


def reference_model(config, cls=None, seed: int = 0):
    """A float32 eval-mode HF model whose every trainable tensor is random and non-trivial.

    transformers 5.x random init leaves the fixed sin-cos position embeddings (and cls/mask
    tokens) at zero, so we run HF's own sin-cos initialisers explicitly: the table is the
    reference's, not ours. Biases, LayerNorm scales and tokens get noise so that a swapped
    or dropped parameter cannot hide behind a zero or one.
    """
    model = (cls or transformers.ViTMAEForPreTraining)(config).float().eval()
    vit_model = getattr(model, "vit", model)
    vit_model.embeddings.patch_embeddings.projection._is_hf_initialized = False
    vit_model.embeddings.initialize_weights()
    if hasattr(model, "decoder"):
        model.decoder.initialize_weights(vit_model.embeddings.patch_embeddings.num_patches)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # position embeddings are frozen (requires_grad=False)
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return model


def mim_config(arch: dict, norm_pix_loss: bool = True, scan: bool = False):
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=arch["image_size"], channels=arch["num_channels"]),
        model=dict(variant=f"B/{arch['patch_size']}", width=arch["hidden_size"],
                   depth=arch["num_hidden_layers"], num_heads=arch["num_attention_heads"],
                   mlp_dim=arch["intermediate_size"], scan=scan),
        objective=dict(name="mae", mask_ratio=0.75, norm_pix_loss=norm_pix_loss,
                       decoder_width=arch["decoder_hidden_size"],
                       decoder_depth=arch["decoder_num_hidden_layers"],
                       decoder_heads=arch["decoder_num_attention_heads"])))


def heads(arch: dict) -> dict:
    return dict(num_heads=arch["num_attention_heads"],
                decoder_num_heads=arch["decoder_num_attention_heads"])


def inputs(arch: dict, batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    side, num = arch["image_size"], (arch["image_size"] // arch["patch_size"]) ** 2
    images = torch.randn(batch, arch["num_channels"], side, side, generator=gen)  # NCHW
    noise = torch.rand(batch, num, generator=gen)
    return images, noise


def run_both(model, obj, params, images, noise):
    with torch.no_grad():
        ref = model(pixel_values=images, noise=noise)
    x = jnp.asarray(images.permute(0, 2, 3, 1).numpy())  # NHWC
    # Full float32 matmuls: on GPUs/TPUs the default would be TF32/bf16 passes, and the
    # reference here runs in float32 on CPU.
    with jax.default_matmul_precision("highest"):
        loss, aux = jax.jit(obj.loss_fn, static_argnames=("train", "with_outputs"))(
            params, {}, {"image": x}, {}, train=False, with_outputs=True,
            noise=jnp.asarray(noise.numpy()))
    return ref, float(loss), aux["outputs"]


def assert_same_tree(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x in jax.tree_util.tree_leaves_with_path(a):
        y = b
        for entry in path:
            y = y[entry.key]
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def numpy_state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def small_model():
    return reference_model(hf_config(SMALL))


@pytest.fixture(scope="module")
def small_params(small_model):
    return mae_params_from_hf(small_model.state_dict(), **heads(SMALL))


# ------------------------------------------------------------------ forward parity

@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_small_parity(small_model, norm_pix_loss, scan):
    small_model.config.norm_pix_loss = norm_pix_loss  # read at forward time
    obj = objectives.build(mim_config(SMALL, norm_pix_loss, scan))
    params = mae_params_from_hf(small_model.state_dict(), **heads(SMALL), scan=scan)
    # The converted tree is exactly the one our model initialises (structure and shapes).
    expected = jax.eval_shape(obj.init, jax.random.key(0))
    assert jax.tree.structure(expected) == jax.tree.structure(params)
    assert [e.shape for e in jax.tree.leaves(expected)] == [p.shape for p in
                                                            jax.tree.leaves(params)]

    images, noise = inputs(SMALL, batch=4)
    ref, loss, out = run_both(small_model, obj, params, images, noise)
    m = masking.random_masking(None, 4, 64, 0.75, jnp.asarray(noise.numpy()))
    np.testing.assert_array_equal(np.asarray(m.ids_restore), ref.ids_restore.numpy())
    np.testing.assert_array_equal(np.asarray(out["patch_mask"]), ref.mask.numpy())
    pred_err = float(np.max(np.abs(np.asarray(out["prediction"]) - ref.logits.numpy())))
    loss_err = abs(loss - float(ref.loss))
    print(f"small norm_pix={norm_pix_loss} scan={scan}: |dloss|={loss_err:.2e} "
          f"max|dpred|={pred_err:.2e}")
    assert loss_err < 1e-5
    assert pred_err < 1e-5


@pytest.fixture(scope="module")
def b16_model():
    torch.manual_seed(0)  # HF's own init of the matrices draws from the global generator
    return reference_model(hf_config(B16, norm_pix_loss=True))


def test_b16_parity(b16_model):
    obj = objectives.build(mim_config(B16, norm_pix_loss=True))
    params = mae_params_from_hf(b16_model.state_dict(), **heads(B16))
    images, noise = inputs(B16, batch=2)
    ref, loss, out = run_both(b16_model, obj, params, images, noise)
    np.testing.assert_array_equal(np.asarray(out["patch_mask"]), ref.mask.numpy())
    pred_err = float(np.max(np.abs(np.asarray(out["prediction"]) - ref.logits.numpy())))
    loss_rel = abs(loss - float(ref.loss)) / abs(float(ref.loss))
    print(f"B/16: loss={loss:.6f} ref={float(ref.loss):.6f} rel={loss_rel:.2e} "
          f"max|dpred|={pred_err:.2e} (pred scale {float(ref.logits.abs().max()):.2f})")
    # Measured on CPU: max|dpred| ~3e-6 on outputs of magnitude ~2.6, loss relative ~0-1e-7
    # (float32 summation order over 12+8 blocks); tolerances leave ~10x headroom.
    assert pred_err < 3e-5
    assert loss_rel < 2e-6


def test_b16_param_count(b16_model):
    """Position embeddings are frozen buffers in the reference (requires_grad=False) and
    computed constants in mim_jax, so trainable counts match exactly."""
    obj = objectives.build(mim_config(B16))
    shapes = jax.eval_shape(obj.init, jax.random.key(0))  # no allocation
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    ref = sum(p.numel() for p in b16_model.parameters() if p.requires_grad)
    print(f"MAE ViT-B/16 + 8x512 decoder trainable parameters: ours={ours:,} reference={ref:,}")
    assert ours == ref == B16_PARAM_COUNT


# ------------------------------------------------------------------ Hugging Face converter

def test_hf_encoder_round_trip(small_model, small_params):
    config = hf_config(SMALL)
    exported = encoder_params_to_hf(small_params["encoder"], image_size=32)
    encoder = transformers.ViTMAEModel(config).float().eval()
    encoder.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)

    images, noise = inputs(SMALL, batch=2)
    with torch.no_grad():
        ref = encoder(pixel_values=images, noise=noise)
    obj = objectives.build(mim_config(SMALL))
    m = masking.random_masking(None, 2, 64, 0.75, jnp.asarray(noise.numpy()))
    encode = jax.jit(lambda p, x, ids: obj.model.encoder.apply({"params": p}, x, ids_keep=ids))
    with jax.default_matmul_precision("highest"):
        ours = encode(small_params["encoder"], jnp.asarray(images.permute(0, 2, 3, 1).numpy()),
                      m.ids_keep)
    np.testing.assert_allclose(np.asarray(ours), ref.last_hidden_state.numpy(), atol=1e-5)

    # Back through the importer: identical tensors; our table equals the reference's.
    assert_same_tree(mae_params_from_hf(exported, num_heads=4),
                     {"encoder": small_params["encoder"]})
    np.testing.assert_allclose(exported["embeddings.position_embeddings"],
                               small_model.vit.embeddings.position_embeddings.detach().numpy(),
                               atol=1e-6, rtol=0)
    # Objective.encoder_params form and the scanned layout export the same dict.
    scanned = mae_params_from_hf(small_model.state_dict(), **heads(SMALL), scan=True)
    again = encoder_params_to_hf({"encoder": scanned["encoder"]}, image_size=32)
    assert set(again) == set(exported)
    for key in exported:
        np.testing.assert_array_equal(again[key], exported[key], err_msg=key)


def test_hf_full_round_trip(small_model, small_params):
    state = numpy_state_dict(small_model)
    exported = mae_params_to_hf(small_params, image_size=32)
    assert set(exported) == set(state)
    for key in state:
        np.testing.assert_allclose(exported[key], state[key], rtol=0, atol=1e-6, err_msg=key)
    fresh = transformers.ViTMAEForPreTraining(hf_config(SMALL))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_hf_legacy_key_names(small_model, small_params):
    legacy = legacy_transformers_names(small_model.state_dict(), "vit.")
    assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
    assert "decoder.decoder_layers.0.output.dense.bias" in legacy
    assert_same_tree(mae_params_from_hf(legacy, **heads(SMALL)), small_params)


# ------------------------------------------------------------------ official converter

def official_from_hf(state: dict, encoder_only: bool = False) -> dict:
    """HF ViTMAEForPreTraining names -> official MaskedAutoencoderViT names, written out
    independently of the converters (plain renames plus the fused [q; k; v] rows)."""
    out = {}
    for key, value in state.items():
        value = np.asarray(value)
        if key.startswith("decoder.") and encoder_only:
            continue
        name = key
        for hf_name, official in (
                (r"^vit\.embeddings\.cls_token$", "cls_token"),
                (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
                (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
                (r"^vit\.layernorm\.", "norm."),
                (r"^vit\.layers\.", "blocks."),
                (r"^decoder\.decoder_layers\.", "decoder_blocks."),
                (r"^decoder\.", ""),
                (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
                (r"\.attention\.o_proj\.", ".attn.proj.")):
            name = re.sub(hf_name, official, name)
        match = re.match(r"(.*)\.attention\.([qkv])_proj\.(weight|bias)$", name)
        if match is None:
            out[name] = value
        elif match.group(2) == "q":  # fuse once, at q
            prefix, kind = match.group(1), match.group(3)
            parts = [np.asarray(state[key.replace(".q_proj.", f".{c}_proj.")]) for c in "qkv"]
            out[f"{prefix}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    return out


def test_official_full_checkpoint(tmp_path, small_model, small_params):
    official = official_from_hf(numpy_state_dict(small_model))
    assert "blocks.1.attn.qkv.weight" in official and "decoder_blocks.0.mlp.fc2.bias" in official
    path = tmp_path / "mae_full.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}, "epoch": 1}, path)
    loaded = load_torch_state_dict(path)
    assert set(loaded) == set(official)
    assert_same_tree(mae_params_from_official(loaded, **heads(SMALL)), small_params)

    scanned = mae_params_from_official(loaded, **heads(SMALL), scan=True)
    assert_same_tree(scanned, {
        part: dict(small_params[part],
                   transformer=vit.stack_block_params(small_params[part]["transformer"], depth))
        for part, depth in (("encoder", 2), ("decoder", 1))})

    exported = mae_params_to_official(small_params, image_size=32)
    assert set(exported) == set(official)
    for key in official:
        np.testing.assert_allclose(exported[key], official[key], rtol=0, atol=1e-6, err_msg=key)


def test_official_encoder_only_checkpoint(tmp_path, small_model, small_params):
    official = official_from_hf(numpy_state_dict(small_model), encoder_only=True)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, path)
    params = mae_params_from_official(load_torch_state_dict(path), num_heads=4)
    assert list(params) == ["encoder"]
    assert_same_tree(params, {"encoder": small_params["encoder"]})
    # The wrapped dict is accepted directly too.
    wrapped = {"model": official}
    assert_same_tree(mae_params_from_official(wrapped, num_heads=4), params)


# ------------------------------------------------------------------ converter errors

def _layouts(small_model):
    hf = numpy_state_dict(small_model)
    return {"hf": (hf, mae_params_from_hf, "vit.layers.1.mlp.fc2.bias"),
            "official": (official_from_hf(hf), mae_params_from_official, "blocks.1.mlp.fc2.bias")}


@pytest.mark.parametrize("layout", ["hf", "official"])
def test_converter_key_errors(small_model, layout):
    state, convert, victim = _layouts(small_model)[layout]
    missing = {k: v for k, v in state.items() if k != victim}
    with pytest.raises(ValueError, match=re.escape(victim)):
        convert(missing, **heads(SMALL))
    extra = dict(state, **{"head.weight": np.zeros((10, 64), np.float32)})
    with pytest.raises(ValueError, match=re.escape("head.weight")):
        convert(extra, **heads(SMALL))
    convert(extra, **heads(SMALL), strict=False)  # e.g. a fine-tuned classifier head
    with pytest.raises(ValueError, match="decoder_num_heads"):
        convert(state, num_heads=4)
    with pytest.raises(ValueError, match="width 64 .* not divisible by its given head count 3"):
        convert(state, num_heads=3, decoder_num_heads=4)  # 64 is not divisible by 3


@pytest.mark.parametrize("layout", ["hf", "official"])
def test_converter_rejects_other_position_embeddings(small_model, layout):
    state, convert, _ = _layouts(small_model)[layout]
    pos_key = "vit.embeddings.position_embeddings" if layout == "hf" else "pos_embed"
    for bad in (np.zeros_like(state[pos_key]),  # what transformers 5.x random init holds
                np.concatenate([state[pos_key][..., 32:], state[pos_key][..., :32]], -1)):
        with pytest.raises(ValueError, match=re.escape(pos_key)):
            convert(dict(state, **{pos_key: bad}), **heads(SMALL))


def test_hf_export_errors(small_params):
    with pytest.raises(ValueError, match="image_size"):
        encoder_params_to_hf(small_params["encoder"], image_size=30)
    broken = dict(small_params["encoder"], extra={"kernel": np.zeros(3)})
    with pytest.raises(ValueError, match="extra/kernel"):
        encoder_params_to_hf(broken, image_size=32)
