"""The train step's product library on a CPU (mim_jax/cpu_dots.py)."""
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import cpu_dots
from mim_jax.errors import ConfigError

# The suite sets MIM_JAX_CPU_DOTS=xla (conftest.py); these tests ask for oneDNN explicitly.
ONEDNN_HERE = platform.machine().lower() in ("x86_64", "amd64")
needs_onednn = pytest.mark.skipif(not ONEDNN_HERE,
                                  reason="XLA's oneDNN products are tested on x86-64 CPUs")


def test_choice_and_backend_decide_the_options(monkeypatch):
    monkeypatch.delenv(cpu_dots.ENV, raising=False)
    onednn = cpu_dots.compiler_options("auto", backend="cpu", machine="x86_64")
    assert onednn == cpu_dots.ONEDNN_OPTIONS
    assert cpu_dots.compiler_options("auto", backend="cpu", machine="aarch64") is None
    assert cpu_dots.compiler_options("onednn", backend="cpu", machine="aarch64") == onednn
    assert cpu_dots.compiler_options("xla", backend="cpu", machine="x86_64") is None
    for choice in cpu_dots.CHOICES:  # never off the CPU
        assert cpu_dots.compiler_options(choice, backend="gpu", machine="x86_64") is None
        assert cpu_dots.compiler_options(choice, backend="tpu", machine="x86_64") is None
    # 'mkl' compiles the products MKL does not take with oneDNN.
    assert cpu_dots.compiler_options("mkl", backend="cpu", machine="aarch64") == onednn
    with pytest.raises(ConfigError, match=r"cpu_dots='blas' is not supported; allowed: "
                                          r"\['auto', 'mkl', 'onednn', 'xla'\]"):
        cpu_dots.validate("blas")
    monkeypatch.setenv(cpu_dots.ENV, "xla")  # replaces 'auto', not an explicit choice
    assert cpu_dots.compiler_options("auto", backend="cpu", machine="x86_64") is None
    assert cpu_dots.compiler_options("onednn", backend="cpu", machine="x86_64") == onednn
    monkeypatch.setenv(cpu_dots.ENV, "fast")
    with pytest.raises(ConfigError, match=r"MIM_JAX_CPU_DOTS='fast' is not supported"):
        cpu_dots.validate("auto")


HLO = """HloModule m

%fused_computation (param_0: f32[2,3,4], param_1: f32[2,4,5]) -> f32[2,3,5] {
  %param_0 = f32[2,3,4]{2,1,0} parameter(0)
  %param_1 = f32[2,4,5]{2,1,0} parameter(1)
  ROOT %dot.1 = f32[2,3,5]{2,1,0} dot(%param_0, %param_1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

%fused_computation.1 (param_0.1: f32[2,3,4], param_1.1: f32[2,4,5], param_2: f32[2,3,5]) -> f32[2,3,5] {
  %param_0.1 = f32[2,3,4]{2,1,0} parameter(0)
  %param_1.1 = f32[2,4,5]{2,1,0} parameter(1)
  %dot.2 = f32[2,3,5]{2,1,0} dot(%param_0.1, %param_1.1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  %param_2 = f32[2,3,5]{2,1,0} parameter(2)
  ROOT %mul.1 = f32[2,3,5]{2,1,0} multiply(%dot.2, %param_2)
}

%fused_computation.2 (param_0.2: f32[2,3,4], param_1.2: f32[2,4,5], param_2.1: f32[2,4,5]) -> f32[2,3,5] {
  %param_0.2 = f32[2,3,4]{2,1,0} parameter(0)
  %param_1.2 = f32[2,4,5]{2,1,0} parameter(1)
  %param_2.1 = f32[2,4,5]{2,1,0} parameter(2)
  %multiply.3 = f32[2,4,5]{2,1,0} multiply(%param_1.2, %param_2.1)
  ROOT %dot.3 = f32[2,3,5]{2,1,0} dot(%param_0.2, %multiply.3), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

ENTRY %main (a: f32[2,3,4], b: f32[2,4,5], c: f32[2,3,5]) -> f32[2,3,5] {
  %a = f32[2,3,4]{2,1,0} parameter(0)
  %b = f32[2,4,5]{2,1,0} parameter(1)
  %c = f32[2,3,5]{2,1,0} parameter(2)
  %onednn_fusion = f32[2,3,5]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation, backend_config={"fusion_config":{"kind":"__onednn_fusion"}}
  %onednn_fusion.1 = f32[2,3,5]{2,1,0} fusion(%a, %b, %c), kind=kCustom, calls=%fused_computation.1, backend_config={"fusion_config":{"kind":"__onednn_fusion"}}
  ROOT %onednn_fusion.2 = f32[2,3,5]{2,1,0} fusion(%a, %b, %b), kind=kCustom, calls=%fused_computation.2, backend_config={"fusion_config":{"kind":"__onednn_fusion"}}
}
"""


def test_only_a_dot_fed_from_inside_its_fusion_is_unsafe():
    # A dot of parameters, and one followed by elementwise work, are the forms the models
    # compile to; a multiply fused in front of the dot is the form that crashed (see module).
    assert cpu_dots.unsafe_onednn_fusions(HLO) == ["fused_computation.2"]
    kept = HLO.replace("calls=%fused_computation.2, backend_config={\"fusion_config\":"
                       "{\"kind\":\"__onednn_fusion\"}}", "calls=%fused_computation.2")
    assert cpu_dots.unsafe_onednn_fusions(kept) == []  # not a oneDNN fusion: not checked


def _lowered_batched_product():
    q = jax.ShapeDtypeStruct((8, 33, 16), jnp.float32)
    return jax.jit(lambda a, b: jnp.einsum("bnd,bmd->bnm", a, b)).lower(q, q)


@needs_onednn
def test_a_batched_product_runs_on_onednn_and_agrees_with_xla():
    lowered = _lowered_batched_product()
    with_onednn, library = cpu_dots.compile_step(lowered, "onednn")
    assert library == "onednn"
    assert "__onednn_fusion" in with_onednn.as_text()
    plain, library = cpu_dots.compile_step(lowered, "xla")
    assert library == "xla" and "__onednn_fusion" not in plain.as_text()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((8, 33, 16)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(with_onednn(a, b), plain(a, b), rtol=1e-5, atol=1e-5)


def _softmax_attention(q, k, v):
    """Attention on jax.nn.softmax, whose derivative is the quotient rule's."""
    probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _lowered_backward(attention):
    x = jax.ShapeDtypeStruct((2, 5, 2, 8), jnp.float32)
    backward = jax.jit(lambda q, k, v, g: jax.vjp(attention, q, k, v)[1](g))
    return backward, backward.lower(x, x, x, x)


@needs_onednn
def test_a_quotient_rule_softmax_backward_compiles_to_the_crashing_form_and_falls_back():
    """Compiled alone, the backward pass of attention on jax.nn.softmax has a oneDNN fusion
    with a multiply fed into its product: the program that dies on its first run. It is never
    kept (and never run here: a miss would kill the test process)."""
    lines = []
    compiled, library = cpu_dots.compile_step(_lowered_backward(_softmax_attention)[1],
                                              "onednn", lines.append)
    assert library == "xla" and "__onednn_fusion" not in compiled.as_text()
    assert len(lines) == 1 and "not known to run" in lines[0]


@needs_onednn
def test_mim_jax_attention_backward_alone_keeps_onednn_and_agrees_with_xla():
    """mim_jax's attention (models.activations.softmax: y * (g - sum(y * g))) compiles, on its
    own too, to oneDNN fusions whose products read only their fusions' parameters."""
    from mim_jax.models.vit import attend
    backward, lowered = _lowered_backward(lambda q, k, v: attend(q, k, v, None))
    lines = []
    compiled, library = cpu_dots.compile_step(lowered, "onednn", lines.append)
    assert library == "onednn" and not lines
    operands = np.random.default_rng(0).standard_normal((4, 2, 5, 2, 8)).astype(np.float32)
    for ours, reference in zip(compiled(*operands), backward(*operands)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_a_program_without_products_is_labelled_xla():
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    _, library = cpu_dots.compile_step(jax.jit(jnp.tanh).lower(x), "onednn")
    assert library == "xla"


@needs_onednn
def test_an_unknown_onednn_form_falls_back_to_xla_with_one_line(monkeypatch):
    monkeypatch.setattr(cpu_dots, "unsafe_onednn_fusions", lambda text: ["fused_computation.7"])
    lines = []
    compiled, library = cpu_dots.compile_step(_lowered_batched_product(), "onednn",
                                               lines.append)
    assert library == "xla" and "__onednn_fusion" not in compiled.as_text()
    assert len(lines) == 1 and "fused_computation.7" in lines[0] and "cpu_dots='xla'" in lines[0]


@needs_onednn
def test_the_step_is_compiled_once_per_batch_signature(monkeypatch):
    compiles = []
    real = cpu_dots.compile_step
    monkeypatch.setattr(cpu_dots, "compile_step",
                        lambda lowered, choice: compiles.append(choice) or real(lowered, choice))
    jitted = jax.jit(lambda state, batch: (state + 1, jnp.einsum(
        "bnd,bmd->bnm", batch["x"], batch["x"]).sum()))  # a batched product, then a sum
    step = cpu_dots.Step(jitted, "onednn")
    x = np.ones((4, 8, 16), np.float32)
    state, total = step(jnp.zeros(()), {"x": x})
    state, total = step(state, {"x": 2 * x})
    assert compiles == ["onednn"] and step.library == "onednn"
    assert float(state) == 2 and float(total) == 4 * 4 * 8 * 8 * 16
    step(state, {"x": x.astype(np.float16)})  # another dtype: compiled for it, not refused
    assert len(compiles) == 2
    plain = cpu_dots.Step(jitted, "xla")  # the jitted function itself, no compile of its own
    assert float(plain(jnp.zeros(()), {"x": x})[0]) == 1 and len(compiles) == 2


@needs_onednn
def test_training_on_onednn_products_matches_xla(tfds_dir, tmp_path, monkeypatch):
    """The trainer's own step, float32 products (attention's included) on oneDNN: the losses
    of XLA's products, to float32 rounding."""
    from conftest import logged_losses, tiny_train_config
    from mim_jax import train
    libraries = []
    real = cpu_dots.compile_step

    def spy(lowered, choice, *args):
        compiled, library = real(lowered, choice, *args)
        libraries.append(library)
        return compiled, library
    monkeypatch.setattr(cpu_dots, "compile_step", spy)
    losses = {}
    for choice in ("onednn", "xla"):
        cfg = tiny_train_config(tfds_dir, cpu_dots=choice, total_steps=6)
        cfg.model.matmul_precision = "float32"
        train.train_and_evaluate(cfg, str(tmp_path / choice))
        losses[choice] = logged_losses(str(tmp_path / choice))
    assert libraries == ["onednn"]  # 'xla' runs the jitted step itself, no compile_step
    assert sorted(losses["onednn"]) == list(range(1, 7))
    np.testing.assert_allclose([losses["onednn"][s] for s in range(1, 7)],
                               [losses["xla"][s] for s in range(1, 7)], rtol=1e-4)
