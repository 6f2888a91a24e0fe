"""models.activations: the GELU is the references' (PyTorch's exact nn.GELU)."""
import jax
import numpy as np
import pytest

from mim_jax.models import activations


def test_the_gelu_is_pytorchs():
    torch = pytest.importorskip("torch")
    x = np.linspace(-12.0, 12.0, 20_001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(jax.jit(activations.gelu)(x), want, rtol=0, atol=1e-6)
    # and its derivative, forward and reverse
    t = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.gelu(t).sum().backward()
    np.testing.assert_allclose(jax.vmap(jax.grad(activations.gelu))(x), t.grad.numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(jax.jvp(activations.gelu, (x,), (np.ones_like(x),))[1],
                               t.grad.numpy(), rtol=0, atol=1e-6)
