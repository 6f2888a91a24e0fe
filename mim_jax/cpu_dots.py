"""Which library runs the train step's matrix products on a CPU: oneDNN or XLA's own.

XLA's CPU backend runs a batched product such as attention's [B x heads] small [N, d] x [d, N]
products on one thread (its YNNPACK and Eigen paths alike), so on two cores the MAE ViT-B/16
step leaves a core idle through most of its attention. Its oneDNN fusions
(`xla_cpu_use_onednn` with the `dot` fusion type) spread those products over every core: the
float32 ViT-B/16 step took 12-20% less time on two AMD EPYC cores and ~12% less on two Intel
Xeon cores (BENCHMARKS.md sections 11 and 12).

That path is experimental in XLA. A oneDNN fusion whose product reads an operand computed inside
the fusion (an elementwise producer fused in front of the dot) can fail to build its oneDNN
graph when it first runs, and the process then dies on an illegal instruction, which no Python
code can catch. So the step is compiled with oneDNN, its oneDNN fusions are read from the
compiled program, and only when each one multiplies operands that arrive from outside the
fusion (a dot, optionally followed by elementwise work on its result) is that program kept;
otherwise the step is compiled again without oneDNN, with a log line that says so. The MAE,
SimMIM (Swin-B and quickstart), BEiT v1 and fine-tuning steps compile to the kept forms, and so
does mim_jax's attention differentiated on its own; the BEiT v2 steps and the backward pass of
an attention on jax.nn.softmax (the quotient rule's multiply fed into a product) do not, and
fall back.

The float32 products of the layers (Dense, DenseGeneral) can instead run on MKL's sgemm, called
from the compiled step (mim_jax/blas: on an Intel Xeon the float32 MAE ViT-B/16 step took 0.856
of the oneDNN step's time with them, BENCHMARKS.md section 16); the other products
(attention's, bfloat16 ones) then still go to oneDNN.

Config field `cpu_dots`: 'auto' (MKL + oneDNN on Intel x86-64 CPUs where MKL loads, oneDNN on
other x86-64 CPUs), 'mkl' (MKL + oneDNN, an error where MKL cannot be loaded), 'onednn' (on
any CPU), 'xla' (XLA's own products only). MKL is not chosen by 'auto' on AMD CPUs, where
oneDNN alone was measured faster than PyTorch (section 11) and MKL was not measured.
The environment variable MIM_JAX_CPU_DOTS, when set, replaces 'auto' (not an explicit choice): the test suite sets it to 'xla', because JAX's
persistent compilation cache, which saves the suite most of its compiles, cannot store a
oneDNN program; tests/test_cpu_dots.py runs the oneDNN path itself.
"""
from __future__ import annotations

import os
import platform
import re
import warnings
from typing import Callable, Optional

import jax
from absl import logging

from mim_jax import blas
from mim_jax.errors import ConfigError

CHOICES = ("auto", "mkl", "onednn", "xla")
ENV = "MIM_JAX_CPU_DOTS"  # replaces 'auto' where set
ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True,
                  "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def validate(choice) -> None:
    if choice not in CHOICES:
        raise ConfigError(f"cpu_dots={choice!r} is not supported; allowed: {list(CHOICES)}.")
    if os.environ.get(ENV, "auto") not in CHOICES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} is not supported; allowed: "
                          f"{list(CHOICES)}.")


def _effective(choice: str) -> str:
    validate(choice)
    if choice == "auto" and os.environ.get(ENV):
        return os.environ[ENV]
    return choice


def cpu_vendor() -> str:
    """The CPU's vendor_id from /proc/cpuinfo ('GenuineIntel', 'AuthenticAMD'), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def wants_mkl(choice: str, backend: Optional[str] = None, machine: Optional[str] = None,
              vendor: Optional[str] = None) -> bool:
    """Whether the layers' float32 products should run on MKL (mim_jax.blas)."""
    choice = _effective(choice)
    if (backend or jax.default_backend()) != "cpu" or choice in ("onednn", "xla"):
        return False
    if choice == "mkl":
        return True
    machine = (machine or platform.machine()).lower()
    vendor = cpu_vendor() if vendor is None else vendor
    return machine in ("x86_64", "amd64") and vendor == "GenuineIntel"


def prepare(choice: str, report: Callable[[str], None] = logging.warning) -> bool:
    """Before the step is traced: turns on MKL's products where `choice` asks for them
    (mim_jax.blas.enable). True when they are on. An explicit 'mkl' that cannot load is a
    ConfigError naming why; under 'auto' the reason is reported and XLA's products stay."""
    if not wants_mkl(choice):
        return False
    reason = blas.enable()
    if not reason:
        return True
    if _effective(choice) == "mkl":
        raise ConfigError(f"cpu_dots='mkl': MKL's products cannot be used ({reason}); "
                          "allowed without it: 'auto', 'onednn', 'xla'.")
    if reason not in _reported:  # once per process, however many steps are built
        _reported.add(reason)
        report(f"cpu_dots='auto': the float32 layer products stay XLA's, as MKL's cannot be "
               f"used ({reason}).")
    return False


_reported = set()


def compiler_options(choice: str, backend: Optional[str] = None,
                     machine: Optional[str] = None) -> Optional[dict]:
    """XLA options for the step's compile: oneDNN's, or None (XLA's defaults)."""
    choice = _effective(choice)
    if choice == "mkl":
        choice = "onednn"  # the products MKL does not take go to oneDNN
    backend = backend or jax.default_backend()
    machine = (machine or platform.machine()).lower()
    if backend != "cpu" or choice == "xla":
        return None
    if choice == "auto" and machine not in ("x86_64", "amd64"):
        return None
    return dict(ONEDNN_OPTIONS)


_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*)$")


def _computations(hlo_text: str) -> dict:
    """{computation name: {instruction name: (opcode, operand text)}} of an HLO module."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            match = _COMPUTATION.match(line)
            current = out.setdefault(match.group(1), {}) if match else None
            continue
        match = _INSTRUCTION.match(line)
        if current is not None and match:
            current[match.group(1)] = (match.group(2), match.group(3))
    return out


def _dot_operands(operand_text: str) -> list:
    return re.findall(r"%([\w.\-]+)", operand_text.split(")", 1)[0])


def unsafe_onednn_fusions(hlo_text: str) -> list:
    """Names of the fused computations of oneDNN fusions that are not 'a dot of the fusion's
    parameters, then elementwise work on its result': the forms not known to run."""
    computations = _computations(hlo_text)
    called = re.findall(r"calls=%?([\w.\-]+).*\"kind\":\"__onednn_fusion\"", hlo_text)
    unsafe = []
    for name in dict.fromkeys(called):
        body = computations.get(name, {})
        dots = [operands for opcode, operands in body.values() if opcode == "dot"]
        fed_inside = any(body.get(operand, ("parameter",))[0] != "parameter"
                         for operands in dots for operand in _dot_operands(operands))
        if len(dots) != 1 or fed_inside:
            unsafe.append(name)
    return unsafe


def compile_step(lowered, choice: str, report: Callable[[str], None] = logging.warning):
    """(compiled step, 'onednn' | 'xla') from the lowered step. With oneDNN options, the
    oneDNN program is kept only when every oneDNN fusion in it has a known form; otherwise the
    step is compiled with XLA's own products."""
    options = compiler_options(choice)
    if options:
        with warnings.catch_warnings():
            # JAX's persistent compilation cache cannot store a oneDNN program (XLA has no
            # serialisation for its oneDNN thunks): it is compiled again in each process.
            warnings.filterwarnings("ignore", "Error writing persistent compilation cache "
                                    "entry.*onednn", UserWarning)
            compiled = lowered.compile(compiler_options=options)
        text = compiled.as_text()
        unsafe = unsafe_onednn_fusions(text)
        if not unsafe:  # without any oneDNN fusion (a ConvNet) it is XLA's own program
            return compiled, library_label(text, "onednn" if '"__onednn_fusion"' in text
                                           else "xla")
        report(f"cpu_dots={choice!r}: the step compiled for oneDNN has {len(unsafe)} oneDNN "
               f"fusion(s) of a form not known to run ({', '.join(unsafe[:3])}); compiling it "
               "with XLA's own CPU products instead (cpu_dots='xla' skips the attempt).")
    compiled = lowered.compile()
    return compiled, library_label(compiled.as_text() if blas.enabled() else "", "xla")


def describe(library: str) -> str:
    """Words for a compile_step label, for logs and reports."""
    words = {"mkl": "MKL (float32 layer products)", "onednn": "oneDNN",
             "xla": "XLA's own CPU kernels"}
    return " + ".join(words.get(part, part) for part in library.split(" + "))


def library_label(hlo_text: str, rest: str) -> str:
    """'mkl + onednn' / 'mkl + xla' for a program with MKL's products, else `rest`."""
    return f"mkl + {rest}" if blas.TARGET in hlo_text else rest


class Step:
    """A jitted train step, compiled per batch signature (shapes and dtypes) with the product
    library compile_step picks; calls it like the jitted function. Off the CPU, or with
    cpu_dots='xla' there, it is the jitted function itself."""

    def __init__(self, jitted, choice: str):
        self._jitted, self._choice = jitted, choice
        self._mkl = prepare(choice)
        self._options = compiler_options(choice)
        self._compiled = {}
        self.library = None if self._options else "xla"

    def __call__(self, state, batch):
        if not self._options:  # no MKL either: wants_mkl implies oneDNN's options
            return self._jitted(state, batch)
        leaves, structure = jax.tree.flatten(batch)
        key = (structure, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))
        compiled = self._compiled.get(key)
        if compiled is None:
            with blas.layer_products(self._mkl):  # read by the layers as they are traced
                lowered = self._jitted.lower(state, batch)
            compiled, self.library = compile_step(lowered, self._choice)
            if _effective(self._choice) == "mkl" and not self.library.startswith("mkl"):
                logging.warning("cpu_dots='mkl': the compiled step has none of MKL's products "
                                "(MKL takes the float32 layer products of a step on one device; "
                                "this one has %d device(s)).", jax.device_count())
            logging.info("Train step compiled; its products run on %s.", describe(self.library))
            self._compiled[key] = compiled
        return compiled(state, batch)
