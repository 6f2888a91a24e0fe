"""models.attention: every model.attention_impl computes softmax attention with a bias, and the
config names one (or fails naming the field)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_mae_config
from mim_jax import models
from mim_jax.models import activations, attention, convnext, swin, vit


def _qkv(n=9, dtype=jnp.float32, seed=3):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(key, (2, n, 3, 8)).astype(dtype) for key in keys[:3])
    bias = jax.random.normal(keys[3], (1, 3, n, n))
    return q, k, v, bias


def _reference(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v, head by head, in float64 numpy."""
    q, k, v, bias = (np.asarray(t, np.float64) for t in (q, k, v, bias))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("name", ["xla", "mim_jax"])
def test_each_implementation_is_softmax_attention_with_a_bias(name):
    fn = attention.IMPLEMENTATIONS[name]
    q, k, v, bias = _qkv()
    np.testing.assert_allclose(fn(q, k, v, bias=bias), _reference(q, k, v, bias), atol=1e-5)
    # The same gradients and forward derivatives as jax.nn.dot_product_attention's.
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, bias=bias)))
    want = jax.grad(loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)
    for got, w in zip(jax.grad(loss(fn), (0, 1, 2))(q, k, v), want):
        np.testing.assert_allclose(got, w, atol=1e-5)
    tangent = lambda f: jax.jvp(loss(f), (q, k, v), (v, q, k))[1]
    np.testing.assert_allclose(tangent(fn), tangent(jax.nn.dot_product_attention), rtol=1e-5)


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    q, k, v, bias = _qkv()
    want = _reference(q, k, v, bias)
    low = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    for name in ("xla", "mim_jax"):
        out = attention.IMPLEMENTATIONS[name](*low, bias=bias)
        assert out.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=5e-2)


@pytest.mark.parametrize("with_bias", [False, True])
def test_even_length_attention_equals_attention_on_an_odd_sequence(with_bias):
    """cuDNN's flash attention trains only on even lengths: the 'cudnn' path pads 197 tokens
    to 198 and masks the padding key. Checked here through the same code with 'xla'."""
    q, k, v, bias = _qkv(197)
    bias = bias if with_bias else None

    def loss(fn, q, k, v):
        return (fn(q, k, v, bias=bias) ** 2).sum()

    padded = lambda q, k, v, bias: attention.even_length_attention(q, k, v, bias,
                                                                   implementation="xla")
    np.testing.assert_allclose(padded(q, k, v, bias), jax.nn.dot_product_attention(
        q, k, v, bias=bias), atol=1e-5)
    grads = jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(jax.nn.dot_product_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_the_config_names_the_attention_and_a_bad_name_fails_naming_the_field():
    cfg = tiny_mae_config()
    for name, fn in attention.IMPLEMENTATIONS.items():
        cfg.model.attention_impl = name
        assert models.vit_from_config(cfg.model, 32, 3).attention_fn is fn
    # unset (None, as in a run recorded without the field's value): the default
    cfg.model.attention_impl = None
    assert models.layer_functions(cfg.model)["attention_fn"] is attention.IMPLEMENTATIONS[
        attention.DEFAULT]
    cfg.model.attention_impl = "flash"
    with pytest.raises(ValueError, match=r"^model.attention_impl='flash'; allowed: "
                                         r"\['xla', 'cudnn', 'mim_jax'\]\.$"):
        models.vit_from_config(cfg.model, 32, 3)


def test_a_model_built_directly_has_the_configs_defaults():
    """Modules constructed without the config (tests, notebooks) compute what the default
    config computes."""
    from configs import common
    defaults = models.layer_functions(common.vit_model_config("B/16"))
    direct = [vit.ViT(config=vit.resolve_vit_config("Ti/4", 16)),
              swin.Swin(config=swin.resolve_swin_config("T", 224)),
              convnext.ConvNeXt(config=convnext.resolve_convnext_config("T"))]
    for module in direct:
        for field, value in defaults.items():
            if hasattr(module, field):
                assert getattr(module, field) is value, (type(module).__name__, field)
    assert defaults["activation"] is activations.gelu
