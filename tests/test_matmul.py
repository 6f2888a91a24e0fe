"""models.matmul: bfloat16-input products with float32 sums (model.matmul_precision), and the
softmax attention."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import tiny_mae_config
from mim_jax import objectives
from mim_jax.models import matmul, vit

# (lhs shape, rhs shape, dimension numbers): a Dense layer, the fused qkv projection, the
# attention's two batched products, an output projection over two axes, contracted axes out
# of order, and a batch of one.
CASES = [
    ((4, 5), (5, 6), (((1,), (0,)), ((), ()))),
    ((2, 7, 16), (16, 3, 2, 4), (((2,), (0,)), ((), ()))),
    ((2, 7, 3, 4), (2, 5, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),
    ((2, 3, 7, 5), (2, 5, 3, 4), (((3,), (1,)), ((0, 1), (0, 2)))),
    ((2, 7, 3, 4), (3, 4, 10), (((2, 3), (0, 1)), ((), ()))),
    ((6, 3, 4), (4, 3, 2, 5), (((2, 1), (0, 1)), ((), ()))),
    ((1, 9, 8), (8, 12), (((2,), (0,)), ((), ()))),
    # batch axes out of order on both sides; contracted axes sorted on one side only, with
    # free axes between them; both at once
    ((3, 4, 2, 5), (5, 6, 2, 3, 4), (((1, 3), (4, 0)), ((2, 0), (2, 3)))),
    ((2, 3, 4, 5, 6), (6, 7, 3, 2, 8), (((1, 4), (2, 0)), ((0,), (3,)))),
    ((2, 3, 4, 5, 6), (5, 4, 2, 7, 3, 8), (((3, 1), (0, 4)), ((0, 2), (2, 1)))),
]


def _operands(lhs_shape, rhs_shape, dims):
    keys = jax.random.split(jax.random.key(0), 3)
    lhs, rhs = jax.random.normal(keys[0], lhs_shape), jax.random.normal(keys[1], rhs_shape)
    g = jax.random.normal(keys[2], lax.dot_general(lhs, rhs, dims).shape)
    return lhs, rhs, g


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", CASES)
def test_the_custom_backward_is_the_products_gradient(lhs_shape, rhs_shape, dims):
    """Rounding to float32 (no rounding), value and both gradients equal lax.dot_general's:
    the hand-written transposes put every axis where it belongs."""
    lhs, rhs, g = _operands(lhs_shape, rhs_shape, dims)
    want, want_vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims), lhs, rhs)
    got, got_vjp = jax.vjp(
        lambda a, b: matmul.rounded_dot_general(a, b, dims, jnp.float32), lhs, rhs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.jit(got_vjp)(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", CASES)
def test_bfloat16_products_run_compiled_and_err_by_bfloat16_rounding(lhs_shape, rhs_shape, dims):
    """Compiled (XLA's CPU backend refuses bfloat16 x bfloat16 -> float32 in some operand
    layouts: this runs every gradient product), float32 results, relative error of the order
    of bfloat16's 2^-8 rounding and not zero (the inputs really are rounded)."""
    lhs, rhs, g = _operands(lhs_shape, rhs_shape, dims)
    want, want_vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims), lhs, rhs)
    fn = jax.jit(lambda a, b: jax.vjp(lambda x, y: matmul.bf16_dot_general(x, y, dims),
                                      a, b)[1](g))
    got = matmul.bf16_dot_general(lhs, rhs, dims)
    grads = fn(lhs, rhs)
    assert got.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in grads)
    for a, b in zip((got, *grads), (want, *want_vjp(g))):
        err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert 1e-5 < err < 1e-2, err


def test_attention_equals_jax_dot_product_attention_with_a_bias():
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(key, (2, 7, 3, 8)) for key in keys[:3])
    bias = jax.random.normal(keys[3], (1, 3, 7, 7))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
    ours = lambda q, k, v: matmul.attention(q, k, v, bias)
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias)
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v),
                    jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The 'xla' implementation is still selectable and computes the same.
    np.testing.assert_allclose(vit.attend(q, k, v, bias, "xla"), ref(q, k, v), rtol=1e-6)


def test_scaled_logits_are_the_plain_product_and_its_gradients():
    keys = jax.random.split(jax.random.key(2), 3)
    q, k = (jax.random.normal(key, (2, 9, 3, 8)) for key in keys[:2])
    g = jax.random.normal(keys[2], (2, 3, 9, 9))
    scale = 8 ** -0.5
    ours, ours_vjp = jax.vjp(lambda q, k: matmul.scaled_logits(q, k, scale), q, k)
    want, want_vjp = jax.vjp(lambda q, k: matmul._plain_logits(q, k, scale), q, k)
    np.testing.assert_array_equal(ours, want)
    for a, b in zip(ours_vjp(g), want_vjp(g)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_cpu_backward_product_reads_the_logits_cotangent_transposed():
    """In a program for a CPU the [B, H, N, N] cotangent of the logits is contracted over its
    last axis when it is the left operand and over its first non-batch axis when it is the
    right one: the [M, K] x [K, N] layout that oneDNN runs at full rate. JAX's own transpose
    (what other platforms get) contracts it over its query axis as the left operand (d k =
    d logits^T q). Both give the same gradients."""
    keys = jax.random.split(jax.random.key(3), 3)
    q, k = (jax.random.normal(key, (2, 9, 3, 8)) for key in keys[:2])
    g = jax.random.normal(keys[2], (2, 3, 9, 9))

    def cotangent_contractions(grads_fn):
        seen = []
        for eqn in jax.make_jaxpr(grads_fn)(q, k, g).jaxpr.eqns:
            if eqn.primitive.name != "dot_general":
                continue
            (lc, rc), _ = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            if lhs == g.shape:
                seen.append(("lhs", tuple(lc)))
            if rhs == g.shape:
                seen.append(("rhs", tuple(rc)))
        return sorted(seen)

    for_cpu = lambda q, k, g: matmul._logits_grads_for_cpu(q, k, g, 0.5)
    by_jax = lambda q, k, g: matmul._logits_grads_by_jax(q, k, g, 0.5)
    assert cotangent_contractions(for_cpu) == [("lhs", (3,)), ("rhs", (2,))]
    assert ("lhs", (2,)) in cotangent_contractions(by_jax)  # what it replaces on a CPU
    for a, b in zip(for_cpu(q, k, g), by_jax(q, k, g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The custom backward chooses between the two when the program is lowered.
    backward = jax.jit(lambda q, k, g: jax.vjp(
        lambda q, k: matmul.scaled_logits(q, k, 0.5), q, k)[1](g))
    texts = {p: backward.trace(q, k, g).lower(lowering_platforms=(p,)).as_text()
             for p in ("cpu", "tpu")}
    assert texts["cpu"] != texts["tpu"]


def test_float32_attention_takes_the_scaled_logits_and_bfloat16_does_not(monkeypatch):
    calls = []
    original = matmul.scaled_logits
    monkeypatch.setattr(matmul, "scaled_logits",
                        lambda *a: calls.append(a[0].dtype) or original(*a))
    x = jnp.ones((1, 5, 2, 4))
    matmul.attention(x, x, x)
    matmul.attention(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
    matmul.attention(x, x, x, dot_general=matmul.bf16_dot_general)
    assert calls == [jnp.float32]


def _mae_loss_and_grads(precision):
    cfg = tiny_mae_config()
    cfg.model.matmul_precision = precision
    obj = objectives.build(cfg)
    params = obj.init(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3))
    fn = jax.jit(jax.value_and_grad(lambda p: obj.loss_fn(p, {"image": images},
                                                          {"mask": jax.random.key(1)},
                                                          train=False)[0]))
    return fn(params)


def test_mae_with_bfloat16_matmuls_is_close_to_float32():
    loss32, grads32 = _mae_loss_and_grads("float32")
    loss16, grads16 = _mae_loss_and_grads("bfloat16")
    assert loss16.dtype == jnp.float32
    assert loss16 != loss32 and abs(float(loss16 / loss32) - 1) < 1e-2
    flat32, flat16 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
                      for g in (grads32, grads16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(grads16))
    cosine = float(flat16 @ flat32 / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32)))
    assert cosine > 0.999, cosine


def _dot_operand_dtypes(jaxpr) -> list:
    """(has batch dims, lhs dtype, rhs dtype) of every dot_general, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            found.append((bool(lhs_batch), str(eqn.invars[0].aval.dtype),
                          str(eqn.invars[1].aval.dtype)))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _dot_operand_dtypes(sub)
    return found


def _compiled_dot_operand_types(fn, *args) -> list:
    """(lhs, rhs) element types of every dot in the compiled CPU program of fn."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    types = dict(re.findall(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\w+)\[", text, re.M))
    return [(types.get(a), types.get(b)) for a, b in
            re.findall(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(%?([\w.\-]+), %?([\w.\-]+)\)",
                       text)]


def test_bfloat16_dense_gradients_stay_bfloat16_products_on_the_cpu():
    """Both gradient products of a bfloat16 Dense compile to bfloat16 products: XLA's CPU
    compiler had converted d x, laid out with the kernel transposed, to a float32 product
    (3-5x slower at MAE's shapes)."""
    if jax.default_backend() != "cpu" or not matmul.cpu_has_native_bf16():
        pytest.skip("checks the program XLA compiles for a CPU with native bfloat16 products")
    x, w, g = jnp.ones((4, 9, 64)), jnp.ones((64, 32)), jnp.ones((4, 9, 32))
    dense = lambda x, w: matmul.bf16_dot_general(x, w, (((2,), (0,)), ((), ())))
    grads = lambda x, w, g: jax.vjp(dense, x, w)[1](g)
    types = _compiled_dot_operand_types(grads, x, w, g)
    assert len(types) == 2 and set(types) == {("bf16", "bf16")}, types


@pytest.mark.parametrize("config_name", ["mae", "swin"])
def test_bfloat16_products_leave_the_attention_products_float32(config_name):
    """model.matmul_precision='bfloat16' rounds the weights' products (forward and backward)
    and not the attention's batched q k^T and p v, which stay float32: on a CPU those run on
    oneDNN over every core, where bfloat16 ones would take XLA's one-threaded path."""
    if config_name == "mae":
        cfg = tiny_mae_config()
    else:
        from configs import simmim as simmim_config
        cfg = simmim_config.get_config("quickstart,model=swin")
    cfg.model.matmul_precision = "bfloat16"
    obj = objectives.build(cfg)
    params = obj.init(jax.random.key(0))
    size, channels = cfg.data.image_size, cfg.data.channels
    images = jnp.zeros((2, size, size, channels))
    loss = lambda p: obj.loss_fn(p, {"image": images}, {"mask": jax.random.key(1)},
                                 train=False)[0]
    dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    batched = {d[1:] for d in dots if d[0]}
    weights = {d[1:] for d in dots if not d[0]}
    assert batched == {("float32", "float32")}
    assert weights == {("bfloat16", "bfloat16")}


@pytest.mark.parametrize("name,value,match", [
    ("vit", "float16", r"model.matmul_precision='float16'; allowed: \['float32', 'bfloat16', 'auto'\]"),
    ("resnet", "bfloat16", r"model.matmul_precision='bfloat16' applies to ViT and Swin"),
])
def test_bad_matmul_precision_is_named(name, value, match):
    from mim_jax import models
    cfg = tiny_mae_config()
    cfg.model.update(name=name, matmul_precision=value)
    if name == "resnet":
        cfg.model.variant = "50"
        with pytest.raises(ValueError, match=match):
            models.backbone_from_config(cfg.model, 32, 3)
    else:
        with pytest.raises(ValueError, match=match):
            objectives.build(cfg)


def test_auto_is_bfloat16_only_on_a_cpu_with_native_bfloat16(monkeypatch):
    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: True)
    assert matmul.resolve_precision("auto") == "bfloat16"  # the tests compute on the CPU
    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: False)
    assert matmul.resolve_precision("auto") == "float32"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(matmul, "cpu_has_native_bf16", lambda: True)
    assert matmul.resolve_precision("auto") == "float32"
    assert matmul.resolve_precision("bfloat16") == "bfloat16"


@pytest.mark.parametrize("spec", ["simmim.py:quickstart,model=swin", "simmim.py:quickstart",
                                  "beit.py:quickstart"])
def test_other_objectives_train_with_bfloat16_matmuls(spec):
    """Swin (window attention, patch merging), SimMIM-ViT and BEiT (LM head, CLS head) compile
    and differentiate with bfloat16 products, close to float32."""
    import importlib
    name, _, arg = spec.partition(":")
    module = importlib.import_module("configs." + name.removesuffix(".py"))
    results = []
    for precision in ("float32", "bfloat16"):
        cfg = module.get_config(arg)
        cfg.model.matmul_precision = precision
        obj = objectives.build(cfg)
        params = obj.init(jax.random.key(0))
        size, channels = cfg.data.image_size, cfg.data.channels
        batch = {"image": jax.random.uniform(jax.random.key(2), (2, size, size, channels))}
        if name == "beit.py":  # token ids in the batch: no tokenizer needed
            grid = size // (cfg.model.patch_size or int(cfg.model.variant.split("/")[1]))
            batch["tokens"] = jax.random.randint(jax.random.key(3), (2, grid * grid), 0,
                                                 16)  # any ids below the vocabulary size
        rngs = {"mask": jax.random.key(1), "drop_path": jax.random.key(4)}
        results.append(jax.jit(jax.value_and_grad(
            lambda p: obj.loss_fn(p, batch, rngs, train=True)[0]))(params))
    (loss32, g32), (loss16, g16) = results
    assert np.isfinite(loss16) and abs(float(loss16 / loss32) - 1) < 2e-2
    flat32, flat16 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g32, g16))
    cosine = float(flat16 @ flat32 / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32)))
    assert cosine > 0.99, cosine


def test_remat_policies_save_the_bfloat16_products(capsys):
    """A Dense-like product is a plain 2-D dot, which 'dots_no_batch' saves (as 'dots' does)."""
    from jax.ad_checkpoint import print_saved_residuals
    x, w = jnp.ones((2, 8, 16)), jnp.ones((16, 32))
    layer = lambda x, w: jnp.sum(jnp.tanh(
        matmul.bf16_dot_general(x, w, (((2,), (0,)), ((), ())))))
    for policy in (jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                   jax.checkpoint_policies.dots_saveable):
        print_saved_residuals(jax.checkpoint(layer, policy=policy), x, w)
        saved = capsys.readouterr().out
        assert "f32[16,32] output of dot_general" in saved, saved


@pytest.mark.parametrize("with_bias", [False, True])
def test_even_length_attention_equals_attention_on_an_odd_sequence(with_bias):
    """cuDNN's flash attention trains only on even lengths: the 'cudnn' path pads 197 tokens
    to 198 and masks the padding key. Checked here through the same code with 'xla'."""
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(key, (2, 197, 4, 16)) for key in keys[:3])
    bias = jax.random.normal(keys[3], (1, 4, 197, 197)) if with_bias else None

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    padded = lambda q, k, v: vit._even_length_attention(q, k, v, bias, "xla")
    plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias)
    np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=1e-5)
    grads = jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_the_transpose_barrier_is_only_in_a_program_for_a_cpu():
    """bfloat16 products keep their operand transposes apart (an optimisation barrier) in a
    program for a CPU only, whichever host lowers it (mim_jax.aot lowers TPU programs on a
    CPU)."""
    lhs, rhs = jnp.ones((3, 7, 5)), jnp.ones((3, 7, 2))
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(matmul.bf16_dot_general(
        a, b, (((0, 1), (0, 1)), ((), ())))), (0, 1)))
    for platform in ("cpu", "tpu", "cuda"):
        text = grad.trace(lhs, rhs).lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in text) == (platform == "cpu"), platform
