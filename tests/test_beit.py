"""BEiT: numerical parity of our objective with transformers' BeitForMaskedImageModeling (same
weights, images, bool_masked_pos and labels), the checkpoint converters in both directions
(Hugging Face and the official microsoft/unilm layout, BEiT v2's CLS head included), BEiT's
init, the loss and its constant-guess baseline, and the errors of a checkpoint that does not
fit."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mim_jax import convert, pretrained  # noqa: E402
from mim_jax.models import resize, vit  # noqa: E402
from mim_jax.objectives import beit  # noqa: E402
from test_simmim import (assert_same_tree, nhwc, numpy_state_dict, randomize,  # noqa: E402
                         same_structure)

IMAGE, PATCH, VOCAB, HEADS = 32, 4, 64, 4
GRID = IMAGE // PATCH
HF_CONFIG = dict(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=128,
                 vocab_size=VOCAB, layer_norm_eps=1e-6, hidden_act="gelu", use_mask_token=True,
                 use_absolute_position_embeddings=False, use_shared_relative_position_bias=True,
                 use_relative_position_bias=False, layer_scale_init_value=0.1,
                 attn_implementation="eager")
MODEL = dict(name="vit", variant="Ti/4", width=64, depth=2, num_heads=HEADS, mlp_dim=128,
             pos_embed="none", rel_pos_bias="shared", qkv_bias="qv", layer_scale_init=0.1,
             init_style="beit")


def beit_config(cls_head_layers: int = 0, **model):
    objective = dict(name="beit", mask=dict(num_masking_patches=20, min_num_patches=4),
                     # A one-group dVAE on an 8 px view: an 8x8 token grid, as the patch grid.
                     tokenizer=dict(name="dall_e", group_count=1, n_blk_per_group=1, n_hid=8,
                                    vocab_size=VOCAB, input_size=GRID))
    if cls_head_layers:
        objective.update(cls_head_layers=cls_head_layers, early_layers=1)
    return ml_collections.ConfigDict(dict(
        data=dict(image_size=IMAGE, channels=3, mean=[0.5] * 3, std=[0.5] * 3),
        model=dict(MODEL, **model), objective=objective))


def param_shapes(obj):
    return jax.eval_shape(lambda k: obj.init_variables(k)[0], jax.random.key(0))


def random_params(obj, seed: int = 0):
    """Random values in the objective's parameter tree (an init's zeros, ones and constants
    would hide a swapped tensor); numpy, so no per-shape compilation."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                        param_shapes(obj))


def without_key_bias(params):
    """Our qkv bias with the k slot zeroed: BEiT layouts drop it (the softmax cancels a key
    bias, so the model is the same)."""
    def fix(path, x):
        x = np.asarray(x)
        if [getattr(p, "key", None) for p in path[-2:]] == ["qkv", "bias"]:
            x = x.copy()
            x[..., 1, :, :] = 0.0
        return x
    return jax.tree_util.tree_map_with_path(fix, params)


@pytest.fixture(scope="module")
def hf_beit():
    torch.manual_seed(0)
    return randomize(transformers.BeitForMaskedImageModeling(
        transformers.BeitConfig(**HF_CONFIG)))


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=gen)
    bool_masked_pos = torch.rand(3, GRID * GRID, generator=gen) < 0.4
    labels = torch.randint(0, VOCAB, (3, GRID * GRID), generator=gen)
    return images, bool_masked_pos, labels


def hf_outputs(model, batch):
    images, bool_masked_pos, labels = batch
    with torch.no_grad():  # HF takes the labels of the masked positions only
        out = model(pixel_values=images, bool_masked_pos=bool_masked_pos,
                    labels=labels[bool_masked_pos])
    return out.logits.numpy(), float(out.loss)


def our_outputs(obj, params, batch):
    images, bool_masked_pos, labels = batch
    with jax.default_matmul_precision("highest"):  # the reference runs float32 on CPU
        loss, aux = jax.jit(obj.loss_fn, static_argnames=("train", "with_outputs"))(
            params, {}, {"image": nhwc(images)}, {}, train=False, with_outputs=True,
            token_mask=jnp.asarray(bool_masked_pos.numpy()),
            labels=jnp.asarray(labels.numpy(), jnp.int32))
    return np.asarray(aux["outputs"]["logits"]), float(loss), aux["metrics"]


# ------------------------------------------------------------------ parity with transformers

@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scan"])
def test_parity_with_transformers(hf_beit, batch, scan):
    obj = pretrained.build_objective(beit_config(scan=scan))
    expected = param_shapes(obj)
    params = convert.beit_params_from_hf(hf_beit.state_dict(), num_heads=HEADS, scan=scan,
                                         expected=expected)
    assert same_structure(params, expected)
    ref_logits, ref_loss = hf_outputs(hf_beit, batch)
    logits, loss, metrics = our_outputs(obj, params, batch)
    assert logits.shape == ref_logits.shape == (3, GRID * GRID, VOCAB)
    logit_err, loss_err = float(np.abs(logits - ref_logits).max()), abs(loss - ref_loss)
    print(f"BEiT scan={scan}: max|dlogits|={logit_err:.2e} (max|logits|="
          f"{np.abs(ref_logits).max():.2f}) |dloss|={loss_err:.2e} (loss {ref_loss:.4f})")
    assert logit_err < 1e-5 and loss_err < 1e-5
    _, bool_masked_pos, labels = batch
    m, lab = bool_masked_pos.numpy(), labels.numpy()
    hits = ref_logits.argmax(-1) == lab
    assert float(metrics["mim_accuracy"]) == pytest.approx(hits[m].mean(), abs=1e-6)


def test_export_to_transformers_loads_strictly_and_gives_the_same_logits(hf_beit, batch):
    params = convert.beit_params_from_hf(numpy_state_dict(hf_beit), num_heads=HEADS)
    exported = convert.beit_params_to_hf(params)
    assert set(exported) == set(hf_beit.state_dict())
    torch.manual_seed(5)
    fresh = transformers.BeitForMaskedImageModeling(transformers.BeitConfig(**HF_CONFIG)).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    logits, loss = hf_outputs(fresh, batch)
    ref_logits, ref_loss = hf_outputs(hf_beit, batch)
    np.testing.assert_array_equal(logits, ref_logits)
    assert loss == ref_loss
    # Scanned parameters export to the same dict; the encoder alone to a BeitModel's keys.
    scanned = convert.beit_params_from_hf(hf_beit.state_dict(), num_heads=HEADS, scan=True)
    for key, value in convert.beit_params_to_hf(scanned).items():
        np.testing.assert_array_equal(value, exported[key], err_msg=key)
    encoder_only = convert.beit_params_to_hf({"encoder": params["encoder"]})
    assert "layers.0.lambda_1" in encoder_only and "layernorm.weight" in encoder_only
    with pytest.raises(ValueError, match="no CLS-pretraining head"):
        convert.beit_params_to_hf(dict(params, cls_head={}))


# ------------------------------------------------------------------ official layout

def test_official_layout_matches_transformers_names(hf_beit):
    """The official names against HF's for the same weights (an independent account of the
    official layout: fused [q; k; v] rows, q/v biases, gamma = lambda, index buffers)."""
    hf = numpy_state_dict(hf_beit)
    official = convert.beit_params_to_official(convert.beit_params_from_hf(hf, num_heads=HEADS))
    for i in range(2):
        p, o = f"beit.layers.{i}.", f"blocks.{i}."
        np.testing.assert_array_equal(official[f"{o}attn.qkv.weight"], np.concatenate(
            [hf[f"{p}attention.{n}_proj.weight"] for n in "qkv"]))
        for ours, theirs in (("attn.q_bias", "attention.q_proj.bias"),
                             ("attn.v_bias", "attention.v_proj.bias"),
                             ("attn.proj.weight", "attention.o_proj.weight"),
                             ("gamma_1", "lambda_1"), ("gamma_2", "lambda_2"),
                             ("norm1.weight", "layernorm_before.weight"),
                             ("mlp.fc2.weight", "mlp.fc2.weight")):
            np.testing.assert_array_equal(official[o + ours], hf[p + theirs], err_msg=ours)
    for ours, theirs in (("rel_pos_bias.relative_position_bias_table",
                          "beit.shared_position_bias.relative_position_bias_table"),
                         ("mask_token", "beit.embeddings.mask_token"),
                         ("norm.weight", "layernorm.weight"), ("lm_head.weight", "lm_head.weight"),
                         ("patch_embed.proj.weight",
                          "beit.embeddings.patch_embeddings.projection.weight")):
        np.testing.assert_array_equal(official[ours], hf[theirs], err_msg=ours)
    index = transformers.models.beit.modeling_beit.BeitRelativePositionBias \
        .generate_relative_position_index((GRID, GRID)).numpy()
    np.testing.assert_array_equal(official["rel_pos_bias.relative_position_index"], index)
    assert official["rel_pos_bias.relative_position_index"].dtype == np.int64


@pytest.mark.parametrize("variant", ["v2_cls_head", "per_layer_abs_pos"])
def test_official_round_trip_through_a_torch_file(variant, tmp_path):
    if variant == "v2_cls_head":
        obj = pretrained.build_objective(beit_config(cls_head_layers=2))
    else:
        obj = pretrained.build_objective(beit_config(pos_embed="learned", rel_pos_bias="per_layer"))
    params = random_params(obj)
    official = convert.beit_params_to_official(params)
    if variant == "v2_cls_head":
        for key in ("cls_pt_layers.1.attn.q_bias", "cls_pt_layers.1.gamma_2",
                    "cls_pt_layers.0.attn.qkv.weight", "rel_pos_bias.relative_position_index",
                    "lm_head.bias", "mask_token"):
            assert key in official, key
        assert not any("pos_embed" in k or k.startswith("blocks.0.attn.relative") for k in official)
    else:
        assert "pos_embed" in official and "rel_pos_bias.relative_position_bias_table" not in \
            official and official["blocks.1.attn.relative_position_index"].shape == (65, 65)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}, "epoch": 3},
               path)
    state = convert.load_torch_state_dict(str(path))  # weights_only=True
    assert convert.is_official_beit(state)
    back = convert.beit_params_from_official(state, num_heads=HEADS,
                                             expected=param_shapes(obj))
    assert_same_tree(back, without_key_bias(params))
    assert_same_tree(convert.beit_params_from_official(state, num_heads=HEADS), back)


def test_official_encoder_fits_a_finetuning_vit():
    """What fine-tuning from an official pretraining file needs: the imported encoder fits a
    classifier's ViT (no mask token, a relative position bias per layer)."""
    obj = pretrained.build_objective(beit_config())
    official = convert.beit_params_to_official(random_params(obj))
    encoder = convert.beit_params_from_official(official, num_heads=HEADS,
                                                strict=False)["encoder"]
    target = vit.ViT(vit.resolve_vit_config("Ti/4", IMAGE, 3, width=64, depth=2, num_heads=HEADS,
                                            mlp_dim=128), pos_embed="none",
                     rel_pos_bias="per_layer", qkv_bias="qv", layer_scale_init=0.1)
    shapes = jax.eval_shape(target.init, jax.random.key(0),
                            jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
    fitted, _ = resize.fit_encoder_params(encoder, shapes)
    np.testing.assert_array_equal(fitted["transformer"]["block_1"]["rel_pos_bias"]["table"],
                                  encoder["rel_pos_bias"]["table"])
    assert not convert.is_official_beit({"model": {"blocks.0.attn.qkv.weight": 0,
                                                   "blocks.0.attn.qkv.bias": 0, "pos_embed": 0}})


# ------------------------------------------------------------------ init

def test_beit_init_truncation_std_and_depth_rescale():
    obj = pretrained.build_objective(beit_config(cls_head_layers=2))
    # jit and the rbg key: a fraction of the compile time of threefry's eager init on CPU.
    params = jax.jit(lambda k: obj.init_variables(k)[0])(jax.random.key(0, impl="rbg"))
    params = jax.tree.map(np.asarray, params)
    enc = params["encoder"]
    # (kernel, its layer number for the 1 / sqrt(2 i) rescale, or None)
    kernels = [(enc["patch_embed"]["kernel"], None), (params["lm_head"]["kernel"], None),
               (enc["cls_token"], None), (enc["mask_token"], None)]
    # The CLS head's blocks keep torch's default init (tests/test_init_rules.py).
    for blocks, first in ((enc["transformer"], 1),):
        for i in range(2):
            block = blocks[f"block_{i}"]
            kernels += [(block["attn"]["qkv"]["kernel"], None), (block["fc1"]["kernel"], None),
                        (block["attn"]["proj"]["kernel"], first + i),
                        (block["fc2"]["kernel"], first + i)]
            assert not np.any(block["attn"]["qkv"]["bias"]) and not np.any(block["fc2"]["bias"])
            np.testing.assert_array_equal(block["ls1"], np.float32(0.1))
            np.testing.assert_array_equal(block["norm1"]["scale"], 1.0)
    unscaled = []
    for kernel, layer in kernels:
        k = np.asarray(kernel) * (np.sqrt(2.0 * layer) if layer else 1.0)
        assert np.abs(k).max() <= 0.02 * (1 + 1e-6)  # truncated at +/- 1 std before rescale
        if k.size >= 4096:
            assert np.abs(k).max() > 0.019  # and rescaled by exactly 1 / sqrt(2 i)
            # std of N(0, 0.02) truncated at +/- 1 std: 0.02 * sqrt(1 - 2 phi(1) / erf(1/sqrt2))
            assert np.std(k) == pytest.approx(0.010791, rel=0.05), layer
        unscaled.append(k.reshape(-1))
    assert np.std(np.concatenate(unscaled)) == pytest.approx(0.010791, rel=0.02)
    assert not np.any(enc["rel_pos_bias"]["table"])


# ------------------------------------------------------------------ loss

def test_masked_cross_entropy_counts_only_masked_positions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(2, 6))
    mask = rng.random((2, 6)) < 0.5
    loss, accuracy = beit.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                               jnp.asarray(mask))
    x = logits[mask].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -logp[np.arange(len(x)), labels[mask]].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(accuracy) == pytest.approx((x.argmax(-1) == labels[mask]).mean())
    changed = np.where(mask[..., None], logits, logits + 10 * rng.normal(size=logits.shape))
    assert float(beit.masked_cross_entropy(jnp.asarray(changed), jnp.asarray(labels),
                                           jnp.asarray(mask))[0]) == pytest.approx(float(loss))


def test_most_frequent_token_accuracy_by_hand():
    labels = jnp.asarray([[3, 3, 1, 2], [3, 1, 1, 1]])
    mask = jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 0]], bool)
    # masked tokens: 3, 3, 2 | 1, 1 -> 3 twice, 1 twice, 2 once: 2 of 5; the unmasked 1s don't count
    assert float(beit.most_frequent_token_accuracy(labels, mask, 4)) == pytest.approx(0.4)
    mask = jnp.asarray([[0, 0, 1, 0], [0, 1, 1, 1]], bool)  # 1, 1, 1, 1
    assert float(beit.most_frequent_token_accuracy(labels, mask, 4)) == 1.0


# ------------------------------------------------------------------ checkpoints that do not fit

def test_wrong_shapes_are_listed_by_name(hf_beit):
    state = numpy_state_dict(hf_beit)
    bad = dict(state)
    bad["lm_head.weight"], bad["lm_head.bias"] = np.zeros((65, 64)), np.zeros(65)
    bad["beit.layers.1.mlp.fc1.weight"] = np.zeros((96, 64))
    bad["beit.layers.1.mlp.fc1.bias"] = np.zeros(96)
    with pytest.raises(ValueError) as err:
        convert.beit_params_from_hf(bad, num_heads=HEADS,
                                    expected=param_shapes(pretrained.build_objective(beit_config())))
    message = str(err.value)
    for name in ("lm_head/kernel", "lm_head/bias", "encoder/transformer/block_1/fc1/kernel",
                 "beit.layers.1.mlp.fc1.weight (96, 64)", "4 problems"):
        assert name in message, message
    # Without a target, against the sizes the checkpoint itself implies (block 0's MLP).
    with pytest.raises(ValueError, match=re.escape("encoder/transformer/block_1/fc1/kernel")):
        convert.beit_params_from_hf(bad, num_heads=HEADS)
    with pytest.raises(ValueError, match="has 4 heads but num_heads=2"):
        convert.beit_params_from_hf(state, num_heads=2)
    with pytest.raises(ValueError, match="lm_head"):  # the encoder-only import is strict
        convert.vit_params_from_hf_beit(state, num_heads=HEADS)


def test_official_checkpoint_errors():
    obj = pretrained.build_objective(beit_config(cls_head_layers=2))
    official = convert.beit_params_to_official(random_params(obj))
    missing = {k: v for k, v in official.items() if k != "cls_pt_layers.1.gamma_1"}
    with pytest.raises(ValueError, match=re.escape("cls_pt_layers.1.gamma_1")):
        convert.beit_params_from_official(missing, num_heads=HEADS)
    index = "rel_pos_bias.relative_position_index"
    with pytest.raises(ValueError, match=re.escape(index)):
        convert.beit_params_from_official(dict(official, **{index: official[index].T}),
                                          num_heads=HEADS)
    own_head = dict(official, **{"cls_pt_norm.weight": np.ones(64, np.float32)})
    with pytest.raises(ValueError, match="shared_lm_head=False"):
        convert.beit_params_from_official(own_head, num_heads=HEADS)
    with pytest.raises(ValueError, match="unexpected keys"):
        convert.beit_params_from_official(dict(official, **{"head.weight": np.zeros(3)}),
                                          num_heads=HEADS)
    # A CLS head with relative position tables of its own (the reference's use_rel_pos_bias)
    # is not something our head builds: named, not silently dropped.
    tables = dict(official, **{f"cls_pt_layers.{i}.attn.relative_position_bias_table":
                               official["rel_pos_bias.relative_position_bias_table"]
                               for i in range(2)})
    with pytest.raises(ValueError, match=re.escape("cls_head/block_0/rel_pos_bias/table")):
        convert.beit_params_from_official(tables, num_heads=HEADS)
