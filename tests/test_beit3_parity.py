"""Numerical parity of the Multiway encoder (mim_jax.models.multiway) with torchscale 0.3.0's
BEiT3, the model unilm's released BEiT-3 files come from, and the converter between them
(mim_jax.convert.torchscale_beit3): same weights, float32, vision-only with masked patches,
text-only with padding, image + text with padding, and the gradients of a scalar loss."""
from __future__ import annotations

import dataclasses
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fairscale")  # torchscale's encoder imports it
pytest.importorskip("torchscale")


def _import_beit3():
    """torchscale's BEiT3. Its only use of timm is `timm.models.layers.drop_path` (stochastic
    depth, never called in eval mode); timm's package imports torchvision, whose PyPI wheels
    need a CUDA build of torch. Without a working timm, torchscale is imported against a
    stand-in module holding that one function, removed right after."""
    try:
        from torchscale.model.BEiT3 import BEiT3
        return BEiT3
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in ("timm", "torchvision"):
            raise
    for name in [k for k in sys.modules if k.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]  # a half-imported timm must not be reused

    def drop_path(x, drop_prob: float = 0.0, training: bool = False):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1.0 - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    stand_ins = {name: types.ModuleType(name)
                 for name in ("timm", "timm.models", "timm.models.layers")}
    stand_ins["timm.models.layers"].drop_path = drop_path
    sys.modules.update(stand_ins)
    try:
        from torchscale.model.BEiT3 import BEiT3
    finally:
        for name in stand_ins:
            del sys.modules[name]
    return BEiT3


BEiT3 = _import_beit3()
from torchscale.architecture.config import EncoderConfig  # noqa: E402

from mim_jax.convert import common, torchscale_beit3 as ts  # noqa: E402
from mim_jax.models import multiway  # noqa: E402

TINY = multiway.MultiwayConfig(width=64, depth=3, num_heads=4, mlp_dim=128, patch_size=8,
                               image_size=32, vocab_size=100, max_text_positions=24)
BATCH, TEXT_LEN = 2, 7
TOL = dict(rtol=1e-5, atol=1e-5)


def reference(cfg: multiway.MultiwayConfig = TINY, seed: int = 0):
    """torchscale's BEiT3 in eval mode, float32, every parameter moved off its init (LayerNorm
    ones and zeros, zero tokens) so a swapped vision / text tensor or a dropped one shows."""
    torch.manual_seed(seed)
    model = BEiT3(EncoderConfig(**ts.torchscale_encoder_config(cfg))).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def converted(model, cfg=TINY):
    return ts.beit3_params_from_torchscale(model.state_dict(), num_heads=cfg.num_heads,
                                           expected=ts.expected_params(cfg))


def inputs(cfg=TINY, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH, cfg.image_size, cfg.image_size, cfg.channels))
    vision_mask = rng.random((BATCH, cfg.num_patches)) < 0.4
    text_ids = rng.integers(0, cfg.vocab_size, (BATCH, TEXT_LEN))
    padding = np.zeros((BATCH, TEXT_LEN), bool)
    padding[0, 4:] = True  # one padded text, one full
    return dict(images=images.astype(np.float32), vision_mask=vision_mask,
                text_ids=text_ids.astype(np.int32), text_padding_mask=padding)


def ours(params, cfg, mode: str, x: dict) -> dict:
    model = multiway.MultiwayEncoder(cfg)
    kwargs = _kwargs(mode, x, to=jnp.asarray)
    return model.apply({"params": params}, **kwargs)


def theirs(model, mode: str, x: dict) -> dict:
    k = _kwargs(mode, x, to=torch.from_numpy)
    return model(textual_tokens=k.get("text_ids"),
                 visual_tokens=None if "images" not in k else k["images"].permute(0, 3, 1, 2),
                 text_padding_position=k.get("text_padding_mask"),
                 vision_masked_position=k.get("vision_mask"))


def _kwargs(mode: str, x: dict, to) -> dict:
    names = {"vision": ("images", "vision_mask"), "text": ("text_ids", "text_padding_mask"),
             "both": tuple(x)}[mode]
    out = {n: to(x[n]) for n in names}
    if to is torch.from_numpy and "text_ids" in out:
        out["text_ids"] = out["text_ids"].long()
    return out


@pytest.fixture(scope="module")
def pair():
    model = reference()
    return model, converted(model)


@pytest.mark.parametrize("mode", ["vision", "text", "both"])
def test_forward_matches_torchscale(pair, mode):
    model, params = pair
    x = inputs()
    with torch.no_grad():
        want = theirs(model, mode, x)
    got = ours(params, TINY, mode, x)
    np.testing.assert_allclose(np.asarray(got["encoder_out"]), want["encoder_out"].numpy(),
                               **TOL)
    np.testing.assert_array_equal(np.asarray(got["encoder_padding_mask"]),
                                  want["encoder_padding_mask"].numpy())
    assert got["multiway_split_position"] == want["multiway_split_position"]


def test_forward_without_sub_ln():
    cfg = dataclasses.replace(TINY, sub_ln=False, layer_norm_eps=1e-6)
    model = reference(cfg, seed=3)
    assert not any("inner_attn_ln" in k or "ffn_layernorm" in k for k in model.state_dict())
    params = converted(model, cfg)
    x = inputs(cfg, seed=1)
    with torch.no_grad():
        want = theirs(model, "both", x)["encoder_out"].numpy()
    np.testing.assert_allclose(np.asarray(ours(params, cfg, "both", x)["encoder_out"]), want,
                               **TOL)


def test_gradients_match_torchscale(pair):
    """d(sum(out * w))/d(params) of image + text with masked patches and padding, torchscale's
    converted with the same plan: every tensor, vision and text copies alike."""
    model, params = pair
    x = inputs(seed=2)
    weights = np.random.default_rng(5).normal(
        size=(BATCH, TINY.num_vision_tokens + TEXT_LEN, TINY.width)).astype(np.float32)
    model.zero_grad()
    (theirs(model, "both", x)["encoder_out"] * torch.from_numpy(weights)).sum().backward()
    torch_grads = {name: p.grad for name, p in model.named_parameters()}
    want = ts.beit3_params_from_torchscale(torch_grads, num_heads=TINY.num_heads)

    def loss(p):
        return jnp.sum(ours(p, TINY, "both", x)["encoder_out"] * weights)
    got = jax.grad(loss)(jax.tree.map(jnp.asarray, params))
    flat_got, flat_want = common._flatten(got), common._flatten(want)
    assert flat_got.keys() == flat_want.keys()
    for path, value in flat_want.items():
        scale = max(np.abs(value).max(), 1e-3)
        np.testing.assert_allclose(np.asarray(flat_got[path]), value, rtol=1e-4,
                                   atol=1e-5 * scale, err_msg="/".join(path))
    # Both modalities' copies are exercised (a swapped A / B would have failed above).
    layer = flat_want[("layer_1", "ffn", "text", "fc1", "kernel")]
    assert np.abs(layer).max() > 0 and np.abs(
        flat_want[("layer_1", "ffn", "vision", "fc1", "kernel")]).max() > 0


def test_round_trip_and_strict_load(pair):
    model, params = pair
    exported = ts.beit3_params_to_torchscale(params)
    state = model.state_dict()
    assert exported.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    # Ours -> torchscale -> ours, through a fresh torchscale model's strict load.
    init = multiway.MultiwayEncoder(TINY).init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)),
                                               jnp.zeros((1, 3), jnp.int32))["params"]
    fresh = BEiT3(EncoderConfig(**ts.torchscale_encoder_config(TINY)))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in
                           ts.beit3_params_to_torchscale(init).items()}, strict=True)
    back = converted(fresh)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, init))


def test_released_layout(pair):
    """unilm's files: 'model' -> 'beit3.<key>', heads beside (strict=False skips them)."""
    model, params = pair
    released = ts.beit3_params_to_torchscale(params, released=True)
    assert set(released) == {"model"}
    assert all(k.startswith("beit3.") for k in released["model"])
    state = {"model": {**{k: torch.from_numpy(v) for k, v in released["model"].items()},
                       "head.weight": torch.zeros(3, TINY.width)}}
    with pytest.raises(ValueError, match="head.weight"):
        ts.beit3_params_from_torchscale(state, num_heads=TINY.num_heads)
    loaded = ts.beit3_params_from_torchscale(state, num_heads=TINY.num_heads, strict=False)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert ts.config_from_torchscale(state, num_heads=TINY.num_heads) == TINY


def test_every_mismatch_listed_once(pair):
    model, _ = pair
    state = dict(model.state_dict())
    state["encoder.layers.1.ffn.B.fc1.weight"] = torch.zeros(96, TINY.width)
    state["encoder.layers.2.self_attn.q_proj.A.weight"] = torch.zeros(TINY.width, 32)
    with pytest.raises(ValueError) as err:
        ts.beit3_params_from_torchscale(state, num_heads=TINY.num_heads,
                                        expected=ts.expected_params(TINY))
    message = str(err.value)
    assert "2 problems" in message
    assert "layer_1/ffn/text/fc1/kernel" in message
    assert "layer_2/attn/qkv/vision/kernel" in message


def test_no_counterpart_raises():
    cfg = dataclasses.replace(TINY, multiway_attention=False, vl_ffn_layers=1)
    params = multiway.MultiwayEncoder(cfg).init(
        jax.random.key(0), text_ids=jnp.zeros((1, 3), jnp.int32))["params"]
    with pytest.raises(ValueError, match="multiway_attention=False"):
        ts.beit3_params_to_torchscale(params)
    cfg = dataclasses.replace(TINY, vl_ffn_layers=1)
    params = multiway.MultiwayEncoder(cfg).init(
        jax.random.key(0), text_ids=jnp.zeros((1, 3), jnp.int32))["params"]
    with pytest.raises(ValueError, match="vl_ffn_layers"):
        ts.beit3_params_to_torchscale(params)


def test_vl_ffn_routing():
    """With vl_ffn_layers=k, only an image + text input reaches the top k layers' VL FFN;
    single-modality inputs keep their own FFN there."""
    cfg = dataclasses.replace(TINY, multiway_attention=False, vl_ffn_layers=1)
    model = multiway.MultiwayEncoder(cfg)
    x = inputs(cfg)
    params = model.init(jax.random.key(0), images=jnp.asarray(x["images"]))["params"]
    assert set(params["layer_2"]["ffn"]) == {"vision", "text", "vl"}
    assert "vl" not in params["layer_1"]["ffn"]
    for mode, reaches_vl in (("vision", False), ("text", False), ("both", True)):
        grads = jax.grad(lambda p: jnp.sum(ours(p, cfg, mode, x)["encoder_out"] ** 2))(params)
        vl = np.abs(np.asarray(grads["layer_2"]["ffn"]["vl"]["fc1"]["kernel"])).max()
        assert (vl > 0) == reaches_vl, mode


@pytest.mark.parametrize("style", multiway.INIT_STYLES)
def test_init_matches_reference_distributions(style):
    """Our init against torchscale's BEiT3 as built ('torchscale': torch defaults, Sub-LN gain
    on v / out / fc1 / fc2) or after unilm's BEiT3Wrapper re-draws its Linears ('unilm'):
    each tensor's standard deviation within sampling error, constants equal."""
    torch.manual_seed(0)
    model = BEiT3(EncoderConfig(**ts.torchscale_encoder_config(TINY)))
    if style == "unilm":  # BEiT3Wrapper._init_weights
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
                torch.nn.init.zeros_(module.bias)
    want = common._flatten(converted(model))
    got = common._flatten(multiway.MultiwayEncoder(TINY, init_style=style).init(
        jax.random.key(0), text_ids=jnp.zeros((1, 3), jnp.int32))["params"])
    for path, theirs_value in want.items():
        value = np.asarray(got[path])
        # q, k and v separately: Sub-LN's gain is v's alone.
        axis = {"kernel": 1, "bias": 0}[path[-1]] if "qkv" in path else None
        slots = range(3) if axis is not None else [None]
        for slot in slots:
            a, b = ((value, theirs_value) if slot is None else
                    (np.take(value, slot, axis), np.take(theirs_value, slot, axis)))
            name = "/".join(path) + ("" if slot is None else f"[{'qkv'[slot]}]")
            if b.std() == 0:
                np.testing.assert_array_equal(a, b, err_msg=name)
                continue
            rel = 3.0 / np.sqrt(a.size)  # ~4 standard errors of a std estimate
            assert abs(a.std() / b.std() - 1) < rel, name
