"""Unit tests of the shared converter transforms, independent of torch and transformers: each
transform is checked against what the torch module computes (written out in numpy) and
against its own inverse."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.convert import common, mae_layout
from mim_jax.models import vit

RNG = np.random.default_rng(0)
D, H, B, N = 16, 4, 2, 5


def rand(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def roundtrip(plan, state):
    params = common.load(plan, state)
    back = common.dump(plan, params, "test")
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)
    return params


def test_linear_and_layernorm():
    state = {"fc.weight": rand(7, D), "fc.bias": rand(7), "ln.weight": rand(D), "ln.bias": rand(D)}
    params = roundtrip({"fc": common.linear("fc"), "ln": common.layernorm("ln")}, state)
    x = rand(B, D)
    y = nn.Dense(7).apply({"params": params["fc"]}, x)
    np.testing.assert_allclose(y, x @ state["fc.weight"].T + state["fc.bias"], atol=1e-5)
    assert set(params["ln"]) == {"scale", "bias"}


def _heads_attention(params, x):
    """Our Attention module on x, with the given qkv/proj params."""
    return vit.Attention(num_heads=H).apply({"params": params}, jnp.asarray(x))


def _torch_style_attention(x, wq, bq, wk, bk, wv, bv, wo, bo):
    """What a torch MHA with separate q/k/v Linears computes, heads split as view(.., H, Dh)."""
    def split(w, b):
        return (x @ w.T + b).reshape(B, N, H, D // H).transpose(0, 2, 1, 3)
    q, k, v = split(wq, bq), split(wk, bk), split(wv, bv)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // H)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(B, N, D)
    return out @ wo.T + bo


def test_attention_separate_and_fused_qkv_match_torch_semantics():
    w = {n: rand(D, D) * 0.3 for n in "qkvo"}
    b = {n: rand(D) * 0.3 for n in "qkvo"}
    x = rand(B, N, D)
    expected = _torch_style_attention(x, w["q"], b["q"], w["k"], b["k"], w["v"], b["v"], w["o"],
                                      b["o"])
    separate = {f"{n}.weight": w[n] for n in "qkvo"} | {f"{n}.bias": b[n] for n in "qkvo"}
    fused = {"qkv.weight": np.concatenate([w[n] for n in "qkv"]),
             "qkv.bias": np.concatenate([b[n] for n in "qkv"]),
             "o.weight": w["o"], "o.bias": b["o"]}
    for plan, state in (({"qkv": common.qkv_separate("q", "k", "v", H)}, separate),
                        ({"qkv": common.qkv_fused("qkv", H)}, fused)):
        plan["proj"] = common.attn_out("o", H)
        params = roundtrip(plan, state)
        with jax.default_matmul_precision("highest"):
            np.testing.assert_allclose(_heads_attention(params, x), expected, atol=1e-5)


def test_patch_conv_matches_torch_semantics():
    p, c = 4, 3
    state = {"proj.weight": rand(D, c, p, p), "proj.bias": rand(D)}  # torch (out, in, kh, kw)
    params = roundtrip({"proj": common.patch_conv("proj")}, state)
    x = rand(B, 8, 8, c)  # NHWC
    with jax.default_matmul_precision("highest"):
        y = nn.Conv(D, (p, p), strides=(p, p), padding="VALID").apply(
            {"params": params["proj"]}, x)
    patches = x.reshape(B, 2, p, 2, p, c)  # [b, i, di, j, dj, c]
    expected = np.einsum("bixjyc,ocxy->bijo", patches, state["proj.weight"]) + state["proj.bias"]
    np.testing.assert_allclose(y, expected, atol=1e-4)


def test_key_checks_name_keys():
    plan = {"fc": common.linear("fc")}
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\]"):
        common.check_keys(["fc.weight"], common.plan_keys(plan), True, "test")
    with pytest.raises(ValueError, match=r"unexpected keys \['other'\]"):
        common.check_keys(["fc.weight", "fc.bias", "other"], common.plan_keys(plan), True, "t")
    common.check_keys(["fc.weight", "fc.bias", "other"], common.plan_keys(plan), False, "t")
    assert common.layer_depth(["blocks.0.x", "blocks.2.y", "decoder_blocks.5.z"], "blocks.") == 3


def test_sincos_check():
    table = mae_layout.sincos_table(32, 16)
    assert table.shape == (1, 17, 32) and not table[0, 0].any()
    mae_layout.check_sincos(table, "pos")
    with pytest.raises(ValueError, match="pos"):
        mae_layout.check_sincos(table + 1e-3, "pos")
    with pytest.raises(ValueError, match="square"):
        mae_layout.check_sincos(np.zeros((1, 13, 32), np.float32), "pos")


# ------------------------------------------------------------------ official MAE checkpoints:
# low precision, training checkpoints, memory ownership, shape checks at conversion time

from mim_jax.convert import files, official_mae  # noqa: E402
from mim_jax.objectives.mae import MAEDecoder  # noqa: E402

WIDTH, DEPTH, MLP, PATCH, SIDE, DEC = 32, 3, 64, 4, 16, 16


def _official_state(seed: int = 0) -> dict:
    """A small official-layout MAE state dict from our own randomly initialised modules."""
    cfg = vit.ViTConfig(image_size=SIDE, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                        num_heads=H, mlp_dim=MLP, channels=3)
    key = jax.random.key(seed)
    enc = vit.ViT(cfg).init(key, jnp.zeros((1, SIDE, SIDE, 3)))["params"]
    n = cfg.num_patches
    dec = MAEDecoder(num_patches=n, patch_dim=PATCH * PATCH * 3, width=DEC, depth=1,
                     num_heads=H, mlp_ratio=2.0).init(
        key, jnp.zeros((1, 1 + n, WIDTH)), jnp.zeros((1, n), jnp.int32))["params"]
    return official_mae.mae_params_to_official({"encoder": enc, "decoder": dec},
                                               image_size=SIDE)


def _from_official(state, **kw):
    return official_mae.mae_params_from_official(state, num_heads=H, decoder_num_heads=H, **kw)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_official_checkpoint_converts(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    state = _official_state()
    reference = _from_official(state)
    path = tmp_path / "half.pth"
    torch.save({"model": {k: torch.from_numpy(v).to(getattr(torch, dtype))
                          for k, v in state.items()}}, path)
    params = _from_official(files.load_torch_state_dict(path))
    atol = {"float16": 1e-3, "bfloat16": 1e-2}[dtype] * 4  # weights here are O(1)
    for (path_a, a), (path_b, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                                        jax.tree_util.tree_leaves_with_path(reference)):
        assert path_a == path_b and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=atol, err_msg=jax.tree_util.keystr(path_a))
    # The tolerance is the dtype's rounding, not a blanket one: a float32 table off by 1e-3,
    # or a half table of another layout, is still refused.
    shifted = dict(state, pos_embed=state["pos_embed"] + 1e-3)
    with pytest.raises(ValueError, match="pos_embed differs"):
        _from_official(shifted)
    torch_shifted = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in state.items()}
    torch_shifted["pos_embed"] = torch_shifted["pos_embed"].flip(-1)
    with pytest.raises(ValueError, match=f"tolerance .* for {dtype}"):
        _from_official(torch_shifted)


def test_official_training_checkpoint_with_args_loads(tmp_path):
    """The official scripts save {'model', 'optimizer', 'epoch', 'scaler', 'args'} with args an
    argparse.Namespace: it loads with weights_only and only that class allowed."""
    import argparse

    torch = pytest.importorskip("torch")
    state = _official_state()
    model = {k: torch.from_numpy(v) for k, v in state.items()}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, blr=1.5e-4,
                              norm_pix_loss=True, output_dir="./output_dir", resume="",
                              input_size=224, lr=None)
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": model, "optimizer": optimizer.state_dict(), "epoch": 399,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)
    loaded = files.load_torch_state_dict(path)
    assert set(loaded) == set(state)
    np.testing.assert_array_equal(_from_official(loaded)["encoder"]["norm"]["scale"],
                                  state["norm.weight"])


class _Arbitrary:  # stands for any class a malicious or foreign pickle could name
    def __init__(self):
        self.payload = 1


def test_foreign_pickles_are_refused_with_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "module.pth"
    torch.save({"model": _Arbitrary()}, path)
    with pytest.raises(ValueError) as err:
        files.load_torch_state_dict(path)
    message = str(err.value)
    assert "\n" not in message and "_Arbitrary" in message and "weights_only=False" in message
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        files.load_torch_state_dict(tmp_path / "garbage.pth")
    with pytest.raises(ValueError, match="no such checkpoint file"):
        files.load_torch_state_dict(tmp_path / "missing.pth")


def test_converted_arrays_own_their_memory():
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v.copy()) for k, v in _official_state().items()}
    for scan in (False, True):
        params = _from_official(state, scan=scan)
        for leaf in jax.tree.leaves(params):
            assert isinstance(leaf, np.ndarray) and leaf.flags.owndata and leaf.flags.writeable
        before = params["encoder"]["cls_token"].copy()
        with torch.no_grad():
            state["cls_token"].add_(1.0)  # the caller trains on: our copy must not move
        np.testing.assert_array_equal(params["encoder"]["cls_token"], before)


def test_every_shape_mismatch_is_listed_at_conversion_time():
    state = _official_state()
    bad = dict(state)
    bad["blocks.1.mlp.fc1.weight"] = rand(MLP * 2, WIDTH)  # one block with another MLP width
    bad["blocks.1.mlp.fc1.bias"] = rand(MLP * 2)
    bad["blocks.2.attn.proj.weight"] = rand(WIDTH, WIDTH + 4)  # a wrong projection
    bad["decoder_norm.weight"] = rand(DEC + 1)
    with pytest.raises(ValueError) as err:
        _from_official(bad)
    message = str(err.value)
    for name in ("encoder/transformer/block_1/fc1/kernel", "encoder/transformer/block_1/fc1/bias",
                 "encoder/transformer/block_2/attn/proj/kernel", "decoder/decoder_norm/scale"):
        assert name in message, (name, message)
    assert "block_0" not in message and "(4 problems)" in message and f"MLP {MLP}" in message
    # A missing block is named by its keys.
    gap = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.norm1\.weight'"):
        _from_official(gap)


def test_target_model_check_lists_all_differences():
    state = _official_state()
    target = vit.ViT(vit.ViTConfig(image_size=SIDE, patch_size=PATCH, width=WIDTH, depth=DEPTH - 1,
                                   num_heads=H, mlp_dim=MLP * 2, channels=3))
    expected = jax.eval_shape(target.init, jax.random.key(0),
                              jnp.zeros((1, SIDE, SIDE, 3)))["params"]
    with pytest.raises(ValueError) as err:
        _from_official(state, expected=expected)
    message = str(err.value)
    assert "the target model" in message
    for i in range(DEPTH - 1):  # every block's MLP is listed, and the block the target lacks
        assert f"block_{i}/fc1/kernel" in message and f"block_{i}/fc2/kernel" in message
    assert "block_2/norm1/scale" in message and "no counterpart in the target" in message
    # The matching target (given scanned, as model.scan=True builds it) passes.
    same = vit.ViT(vit.ViTConfig(image_size=SIDE, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                                 num_heads=H, mlp_dim=MLP, channels=3), scan=True)
    expected = jax.eval_shape(same.init, jax.random.key(0), jnp.zeros((1, SIDE, SIDE, 3)))
    params = _from_official(state, expected=expected["params"], scan=True)
    assert jax.tree.map(np.shape, params["encoder"]) == jax.tree.map(np.shape,
                                                                    expected["params"])
