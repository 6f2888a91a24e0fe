"""MKL's float32 layer products as an XLA custom call (mim_jax/blas, cpu_dots='mkl')."""
import platform
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import blas, cpu_dots
from mim_jax.errors import ConfigError

# On x86-64 Linux `mkl` is one of mim_jax's requirements and a C++ compiler builds the
# handler; there the custom call must work. Elsewhere only the fallbacks are tested.
MKL_EXPECTED = (sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")
                and shutil.which("c++") is not None)


@pytest.fixture
def mkl():
    reason = blas.enable()
    if reason and not MKL_EXPECTED:
        pytest.skip(f"MKL's products are not available here: {reason}")
    assert reason == "", reason
    with blas.layer_products():
        yield


@pytest.fixture
def fresh_status(monkeypatch):
    """enable() tried again from scratch; the process's own state afterwards."""
    monkeypatch.setattr(blas, "_status", None)
    yield


def _custom_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).as_text().count(blas.TARGET)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemm_and_its_gradients_match_lax(mkl, transpose_a, transpose_b):
    m, k, n = 37, 53, 29  # odd sizes: leading dimensions differ from the product's
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((k, m) if transpose_a else (m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, k) if transpose_b else (k, n)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)  # weights the output

    def ours(a, b):
        return jnp.sum(blas.gemm(a, b, transpose_a, transpose_b) * w)

    def reference(a, b):
        return jnp.sum(((a.T if transpose_a else a) @ (b.T if transpose_b else b)) * w)

    assert _custom_calls(ours, a, b) == 1
    assert _custom_calls(jax.value_and_grad(ours, (0, 1)), a, b) == 3  # forward, d a, d b
    out = jax.jit(lambda a, b: blas.gemm(a, b, transpose_a, transpose_b))(a, b)
    expected = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    grads = jax.jit(jax.grad(ours, (0, 1)))(a, b)
    for got, want in zip(grads, jax.grad(reference, (0, 1))(a, b)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_dense_layers_use_it_only_when_traced_inside_layer_products(mkl):
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    dense = nn.Dense(6, dot_general=blas.dot_general)
    general = nn.DenseGeneral(7, axis=(-2, -1), dot_general=blas.dot_general)
    for layer in (dense, general):
        params = layer.init(jax.random.key(1), x)
        plain = layer.clone(dot_general=jax.lax.dot_general)
        got = jax.jit(layer.apply)(params, x)
        np.testing.assert_allclose(got, plain.apply(params, x), rtol=1e-5, atol=1e-5)
        assert _custom_calls(layer.apply, params, x) == 1
        with blas.layer_products(False):
            assert _custom_calls(layer.apply, params, x) == 0
        loss = lambda p: jnp.sum(layer.apply(p, x) ** 2)
        plain_loss = lambda p: jnp.sum(plain.apply(p, x) ** 2)
        for got, want in zip(jax.tree.leaves(jax.grad(loss)(params)),
                             jax.tree.leaves(jax.grad(plain_loss)(params))):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_other_products_stay_lax(mkl):
    x = jnp.ones((2, 4, 8))
    batched = lambda x: blas.dot_general(x, x, (((2,), (2,)), ((0,), (0,))))  # attention's
    rhs_trailing = lambda x: blas.dot_general(x, jnp.ones((3, 8)), (((2,), (1,)), ((), ())))
    assert _custom_calls(batched, x) == 0
    assert _custom_calls(rhs_trailing, x) == 0
    lhs_leading = lambda x: blas.dot_general(x, jnp.ones((2, 3)), (((0,), (0,)), ((), ())))
    assert _custom_calls(lhs_leading, jnp.ones((2, 5))) == 0
    bf16 = lambda x: blas.dot_general(x.astype(jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16),
                                      (((2,), (0,)), ((), ())))
    assert _custom_calls(bf16, x) == 0
    # A program for another platform has no custom call, even traced inside.
    tpu = jax.jit(lambda x: blas.dot_general(x, jnp.ones((8, 3)), (((2,), (0,)), ((), ()))))
    text = tpu.trace(x).lower(lowering_platforms=("tpu",)).as_text()
    assert blas.TARGET not in text and "dot_general" in text


def test_mae_step_on_mkl_matches_xla_products(mkl):
    from configs import mae as mae_config
    from mim_jax.benchmark.train_step import StepRunner, build_train_setup, compile_step

    def run(choice):
        config = mae_config.get_config("quickstart")
        config.batch_size, config.model.matmul_precision, config.cpu_dots = 8, "float32", choice
        setup = build_train_setup(config)
        compiled, info = compile_step(setup)
        runner = StepRunner(compiled, setup.state, setup.batch)
        return [float(runner()["loss"]) for _ in range(3)], info["products"]

    losses_mkl, library = run("mkl")
    losses_xla, library_xla = run("xla")
    assert library.startswith("mkl + ") and library_xla == "xla"
    np.testing.assert_allclose(losses_mkl, losses_xla, rtol=2e-5)
    assert run("mkl")[0] == losses_mkl  # bit for bit again: a resumed run continues exactly


def test_wants_mkl_by_choice_vendor_machine_and_backend(monkeypatch):
    monkeypatch.delenv(cpu_dots.ENV, raising=False)
    intel = dict(backend="cpu", machine="x86_64", vendor="GenuineIntel")
    assert cpu_dots.wants_mkl("auto", **intel)
    assert not cpu_dots.wants_mkl("auto", **dict(intel, vendor="AuthenticAMD"))
    assert cpu_dots.wants_mkl("mkl", **dict(intel, vendor="AuthenticAMD"))
    assert not cpu_dots.wants_mkl("auto", **dict(intel, machine="aarch64"))
    for choice in ("onednn", "xla"):
        assert not cpu_dots.wants_mkl(choice, **intel)
    for choice in cpu_dots.CHOICES:
        assert not cpu_dots.wants_mkl(choice, **dict(intel, backend="gpu"))
    monkeypatch.setenv(cpu_dots.ENV, "xla")  # the suite's setting replaces 'auto' only
    assert not cpu_dots.wants_mkl("auto", **intel)
    assert cpu_dots.wants_mkl("mkl", **intel)


def test_a_missing_library_is_one_line_and_auto_falls_back(fresh_status, monkeypatch):
    monkeypatch.setenv(blas.ENV, "/nonexistent/libblas_missing.so")
    monkeypatch.setattr(cpu_dots, "wants_mkl", lambda choice: True)
    reasons = []
    assert cpu_dots.prepare("auto", report=reasons.append) is False
    assert len(reasons) == 1 and "\n" not in reasons[0]
    assert "/nonexistent/libblas_missing.so" in reasons[0]
    assert not blas.enabled()
    with blas.layer_products():  # asked for, but never enabled: lax
        assert _custom_calls(lambda x: blas.dot_general(x, x, (((1,), (0,)), ((), ()))),
                             jnp.ones((4, 4))) == 0
    with pytest.raises(ConfigError, match=r"^cpu_dots='mkl': MKL's products cannot be used "
                                          r"\(/nonexistent/libblas_missing.so: .*\); allowed "
                                          r"without it: 'auto', 'onednn', 'xla'\.$"):
        cpu_dots.prepare("mkl")


def test_none_turns_it_off(fresh_status, monkeypatch):
    monkeypatch.setenv(blas.ENV, "none")
    assert blas.enable() == f"{blas.ENV}=none"


@pytest.mark.skipif(not MKL_EXPECTED, reason="needs MKL and a C++ compiler")
def test_a_failed_compile_leaves_nothing_in_the_cache(fresh_status, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    # A compiler that writes half a library where it was told to, then fails.
    broken = tmp_path / "broken-c++"
    broken.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = "-o" ] && '
                      'echo half > "$2"; shift; done\necho "error: out of memory" >&2\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    reason = blas.enable()
    assert reason == "compiling sgemm.cc failed: error: out of memory", reason
    assert not [p for p in cache.rglob("*") if p.is_file()]
    monkeypatch.setenv("CXX", "c++")
    monkeypatch.setattr(blas, "_status", None)
    assert blas.enable() == ""
    built = [p.name for p in cache.rglob("*") if p.is_file()]
    assert len(built) == 1 and built[0].startswith("sgemm_") and built[0].endswith(".so")


def test_one_jitted_function_is_traced_again_when_the_setting_changes(mkl):
    product = jax.jit(lambda x: blas.dot_general(x, jnp.ones((8, 3)), (((1,), (0,)), ((), ()))))
    x = jnp.ones((4, 8))
    assert blas.TARGET in product.lower(x).as_text()
    with blas.layer_products(False):
        assert blas.TARGET not in product.lower(x).as_text()
        np.testing.assert_allclose(product(x), 8.0)
    np.testing.assert_allclose(product(x), 8.0)


def test_the_train_steps_wrapper_traces_inside_layer_products(mkl):
    dense = nn.Dense(5, dot_general=blas.dot_general)
    x = jax.random.normal(jax.random.key(0), (6, 7))
    params = dense.init(jax.random.key(1), x)
    with blas.layer_products(False):  # as the trainer calls it: outside any context
        step = cpu_dots.Step(jax.jit(dense.apply), "mkl")
        out = step(params, x)
    assert step.library.startswith("mkl + ")
    np.testing.assert_allclose(out, x @ params["params"]["kernel"] + params["params"]["bias"],
                               rtol=1e-5, atol=1e-5)


def test_several_devices_and_odd_shapes_stay_lax(mkl, monkeypatch):
    dims = (((1,), (0,)), ((), ()))
    assert _custom_calls(lambda x: blas.dot_general(x, x.T, dims), jnp.ones((4, 4))) == 1
    empty = jnp.ones((4, 0))
    np.testing.assert_array_equal(blas.dot_general(empty, empty.T, dims), jnp.zeros((4, 4)))
    with pytest.raises(TypeError):  # mismatched contracted sizes: lax's own error
        blas.dot_general(jnp.ones((4, 2, 3)), jnp.ones((3, 2, 5)), (((1, 2), (0, 1)), ((), ())))
    monkeypatch.setattr(jax, "device_count", lambda: 2)  # a mesh: no sharding rule for it
    assert _custom_calls(lambda x: blas.dot_general(x, x.T, dims), jnp.ones((4, 4))) == 0


@pytest.mark.skipif(not MKL_EXPECTED, reason="needs MKL and a C++ compiler")
def test_mkl_told_to_take_64_bit_integers_still_works(tmp_path):
    """MKL_INTERFACE_LAYER=ILP64 would make MKL read sgemm.cc's 32-bit integers as 64-bit."""
    import os
    import subprocess
    code = ("import jax, jax.numpy as jnp, numpy as np\n"
            "from mim_jax import blas\n"
            "assert blas.enable() == '', blas.enable()\n"
            "a = np.arange(12, dtype=np.float32).reshape(3, 4)\n"
            "with blas.layer_products():\n"
            "    out = jax.jit(lambda a: blas.gemm(a, a, False, True))(a)\n"
            "np.testing.assert_allclose(out, a @ a.T)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, MKL_INTERFACE_LAYER="ILP64",
                                                JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_flops_of_the_custom_calls_are_counted(mkl):
    from mim_jax.benchmark.train_step import xla_flops
    a, b = jnp.ones((6, 4)), jnp.ones((5, 4))
    compiled = jax.jit(lambda a, b: blas.gemm(a, b, False, True)).lower(a, b).compile()
    assert blas.hlo_flops(compiled.as_text()) == 2 * 6 * 5 * 4
    assert xla_flops(compiled) == pytest.approx(2 * 6 * 5 * 4, abs=1)  # XLA counts it as -1
    grads = jax.jit(jax.grad(lambda a, b: jnp.sum(blas.gemm(a, b.T)), (0, 1)))
    assert blas.hlo_flops(grads.lower(a, b).compile().as_text()) == 2 * (2 * 6 * 5 * 4)


def test_convnext_pointwise_layers_take_it(mkl):
    from mim_jax.models import convnext
    config = convnext.ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    model = convnext.ConvNeXt(config)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    with blas.layer_products(False):
        variables = model.init(jax.random.key(1), x)
        plain = jax.jit(model.apply)(variables, x)
    loss = lambda v: jnp.sum(jax.tree.leaves(model.apply(v, x))[0] ** 2)
    assert _custom_calls(model.apply, variables, x) == 8  # two per block
    for got, expected in zip(jax.tree.leaves(jax.jit(model.apply)(variables, x)),
                             jax.tree.leaves(plain)):  # one feature map per stage
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with blas.layer_products(False):
        want = jax.grad(loss)(variables)
    for got, expected in zip(jax.tree.leaves(jax.grad(loss)(variables)), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
