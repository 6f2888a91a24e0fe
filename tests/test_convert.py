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
