"""models.activations: softmax and exact GELU with the values of jax.nn's (the GELU on a CPU
PyTorch's formula, to 1e-6 of jax.nn's), whose backward passes save one tensor."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import activations

REFERENCES = {
    "softmax": (activations.softmax, lambda x: jax.nn.softmax(x, axis=-1)),
    "gelu": (activations.gelu, lambda x: jax.nn.gelu(x, approximate=False)),
}


def _inputs(dtype=jnp.float32, shape=(3, 4, 17)):
    # Wide logits: the softmax's max subtraction and GELU's both tails matter.
    x = 6.0 * jax.random.normal(jax.random.key(0), shape)
    g = jax.random.normal(jax.random.key(1), shape)
    return x.astype(dtype), g.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_softmax_values_are_jax_nns(dtype):
    ours, reference = REFERENCES["softmax"]
    x, _ = _inputs(dtype)
    out = jax.jit(ours)(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(jax.jit(reference)(x), np.float32))


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1.6e-2)])
def test_the_gelu_values_are_jax_nns_within_rounding(dtype, rtol):
    """On a CPU the GELU is x (1 + erf(x / sqrt 2)) / 2, jax.nn's x erfc(-x / sqrt 2) / 2
    elsewhere: the same function, rounded differently (in bfloat16 jax.nn's rounds each
    operation to bfloat16, ours once, from float32)."""
    ours, reference = REFERENCES["gelu"]
    x = jnp.linspace(-12.0, 12.0, 20_001).astype(dtype)
    out = jax.jit(ours)(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(jax.jit(reference)(x), np.float32),
                               rtol=rtol, atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU form of the GELU")
def test_the_gelu_on_a_cpu_is_pytorchs():
    torch = pytest.importorskip("torch")
    x = np.linspace(-12.0, 12.0, 20_001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(jax.jit(activations.gelu)(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_the_gradient_and_the_forward_derivative_are_jax_nns(name):
    ours, reference = REFERENCES[name]
    x, g = _inputs()
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * g)))(x)
    np.testing.assert_allclose(grad(ours), grad(reference), rtol=1e-5, atol=1e-6)
    tangent = lambda f: jax.jvp(f, (x,), (g,))[1]
    np.testing.assert_allclose(tangent(ours), tangent(reference), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_the_backward_pass_saves_one_tensor(name):
    """What the backward pass reads: the softmax its output, the GELU its input (jax.nn's
    save three or more tensors, some of them the input's size)."""
    ours, _ = REFERENCES[name]
    x, g = _inputs()
    out, backward = jax.vjp(ours, x)
    saved = jax.tree_util.tree_leaves(backward)
    assert [a.shape for a in saved] == [x.shape]
    np.testing.assert_array_equal(saved[0], out if name == "softmax" else x)
    np.testing.assert_allclose(backward(g)[0], jax.vjp(REFERENCES[name][1], x)[1](g)[0],
                               rtol=1e-5, atol=1e-6)


def test_softmax_over_another_axis_under_vmap_and_remat():
    x, g = _inputs()
    # Each slice x[:, j] [3, 17] takes its softmax over its axis 0: x's axis 0.
    f = jax.checkpoint(jax.vmap(lambda part: activations.softmax(part, 0), in_axes=1,
                                out_axes=1))
    reference = lambda x: jax.nn.softmax(x, axis=0)
    np.testing.assert_allclose(f(x), reference(x), rtol=1e-6, atol=1e-7)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * g))(x)
    np.testing.assert_allclose(grad(f), grad(reference), rtol=1e-5, atol=1e-6)


def test_softmax_into_bfloat16_saves_only_its_bfloat16_output():
    """Attention with bfloat16 values: the probabilities are rounded once, in the softmax, and
    the backward pass keeps that bfloat16 tensor, not a float32 copy."""
    x, g = _inputs()
    out, backward = jax.vjp(lambda x: activations.softmax(x, -1, jnp.bfloat16), x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, jax.nn.softmax(x, axis=-1).astype(jnp.bfloat16))
    assert [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(backward)] == [
        (x.shape, jnp.bfloat16)]
    (grad,) = backward(g.astype(jnp.bfloat16))
    reference = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), x)[1](g)[0]
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, reference, atol=0.02 * float(jnp.abs(reference).max()))


def test_gelu_recomputes_only_in_a_program_for_a_cpu():
    """The platform is chosen when the step is lowered: a program for a TPU or a GPU (also one
    lowered on this CPU, as mim_jax.aot does) is jax.nn.gelu's, without the recomputation's
    barrier."""
    x, _ = _inputs()
    grad = jax.jit(jax.grad(lambda x: jnp.sum(activations.gelu(x))))
    for platform in ("cpu", "tpu", "cuda"):
        text = grad.trace(x).lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in text) == (platform == "cpu"), platform
