"""Every backbone supports forward-mode (jax.jvp) as well as reverse-mode (jax.vjp, jax.grad)
differentiation, in training mode where drop-path and BatchNorm act: <v, J u> computed by jvp
equals <J^T v, u> computed by vjp, and the jvp agrees with a central finite difference (not
for the ResNet: BatchNorm over a batch of two 1 x 1 maps curves too much for a float32 one;
its layers have no derivative rules of their own)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import attention, convnext, resnet, swin, vit

IMAGE = 32


def _models():
    return {
        # mim_jax's attention with a relative position bias (Swin below takes the default)
        "vit": vit.ViT(config=vit.resolve_vit_config("Ti/4", IMAGE, width=32, depth=2,
                                                     num_heads=2, mlp_dim=64),
                       rel_pos_bias="shared", drop_path_rate=0.2,
                       attention_fn=attention.plain_attention),
        # window 4 on an 8 x 8 grid: shifted windows in stage 0, patch merging
        "swin": swin.Swin(config=swin.resolve_swin_config(
            "T", IMAGE, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4),
            drop_path_rate=0.2),
        "resnet": resnet.ResNet(config=resnet.ResNetConfig(
            depths=(1, 1, 1, 1), stem_width=8, widths=(4, 8, 8, 16)), drop_path_rate=0.2),
        "convnext": convnext.ConvNeXt(config=convnext.ConvNeXtConfig(
            depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)), drop_path_rate=0.2),
    }


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in
                              zip(keys, leaves)])


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", sorted(_models()))
def test_forward_and_reverse_derivatives_agree(name):
    model = _models()[name]
    images = jax.random.normal(jax.random.key(0), (2, IMAGE, IMAGE, 3))
    variables = jax.jit(lambda x: model.init(
        {"params": jax.random.key(1), "drop_path": jax.random.key(2)}, x, train=True))(images)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def f(params, images):  # training mode, the same drop-path draws every call
        out = model.apply({"params": params, **rest}, images, train=True,
                          rngs={"drop_path": jax.random.key(3)},
                          mutable=list(rest))  # BatchNorm's statistics update (ResNet)
        return out[0] if rest else out

    u = (_random_like(params, 4), jax.random.normal(jax.random.key(5), images.shape))
    v = _random_like(jax.eval_shape(f, params, images), 6)
    eps = 5e-4

    @jax.jit
    def derivatives(params, images):
        _, tangent = jax.jvp(f, (params, images), u)
        _, backward = jax.vjp(f, params, images)
        along = lambda s: _dot(v, f(*jax.tree.map(lambda x, d: x + s * eps * d,
                                                  (params, images), u)))
        return _dot(v, tangent), _dot(backward(v), u), (along(1.0) - along(-1.0)) / (2 * eps)

    forward, reverse, difference = map(float, derivatives(params, images))
    assert abs(forward) > 1e-3, forward  # the derivative is not trivially zero
    np.testing.assert_allclose(forward, reverse, rtol=2e-4)
    if name != "resnet":
        np.testing.assert_allclose(forward, difference, rtol=1e-2)
