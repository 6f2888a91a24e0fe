"""Float32 matrix products on a CPU by MKL's sgemm, called from the compiled step.

Why: on the Intel Xeon (AVX-512, 2 cores) these figures were taken on, the float32 products
of the MAE ViT-B/16 step were the whole of mim_jax's gap to PyTorch (BENCHMARKS.md section
14). Its 21 layer-product shapes, each compiled alone and timed in one run, took 0.617 s on
XLA's own kernels, 0.502 s on oneDNN and 0.431 s on MKL, which PyTorch's wheels use (section
16). So the layers' float32 products can be an XLA custom call (`sgemm.cc`, an XLA FFI handler) that hands the
product to the Fortran `sgemm_` of a BLAS library loaded at run time: MKL from PyPI's `mkl`
wheel (a requirement of mim_jax on x86-64 Linux), or any library named by the environment
variable MIM_JAX_BLAS.

The handler is compiled on first use with the host's C++ compiler against the FFI headers
that ship with jaxlib, into a per-user cache keyed by the source, jaxlib's version, the machine
and the compiler command (written to a temporary file and renamed, so a half-written library is never loaded). When no
library, compiler or header is found, `enable` returns why and the caller keeps XLA's
products: nothing else changes. A step takes these products only when traced inside
`layer_products()` (mim_jax.cpu_dots does that for the train step when config.cpu_dots asks).

What takes this path (`dot_general`): a float32 product of one CPU device whose left operand
contracts its trailing axes and whose right operand contracts its leading ones, with no batch
axes - every Dense and DenseGeneral layer. Batched products (attention) stay XLA's. Programs
for other platforms, or for several devices (the custom call has no sharding rule), get
lax.dot_general itself. Remat policies that save dots do not recognise the custom call, so a
rematerialised block recomputes it (remat is off by default and meant for accelerators). The
product has a custom VJP, so forward-mode differentiation (jvp) of a function traced inside
`layer_products` is not defined. MKL's results are repeatable run to run with the same
threads and the same buffer alignment, which XLA keeps (tests/test_blas.py checks a step bit
for bit, and the resume-exactly tests passed on this path); MKL's CNR mode is not set.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import math
import os
import platform
import re
import shlex
import site
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

TARGET = "mim_jax_sgemm"
ENV = "MIM_JAX_BLAS"  # a shared library's path with a Fortran sgemm_ (or 'none': never)
SOURCE = Path(__file__).with_name("sgemm.cc")

_lock = threading.Lock()
_status: Optional[str] = None  # None: not tried; "" ready; else why not
_keep = []  # the loaded libraries: ctypes must not unload them
_registered = []  # the handler library registered with XLA, once
# Whether functions traced now put their layer products on BLAS: set around a trace by
# `layer_products`, so one process can trace a step with them and another without. A JAX user
# context is part of jit's cache keys: a function traced both ways is traced twice.
_active = jax.make_user_context(default_value=False)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "mim_jax" / "blas"


def _library_candidates() -> list:
    """Paths (or sonames) that may hold MKL's runtime library, first found first."""
    if os.environ.get(ENV):
        return [os.environ[ENV]]
    dirs = [Path(sys.prefix) / "lib", Path(site.getuserbase()) / "lib"]
    names = ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"]
    found = [str(d / n) for d in dirs for n in names if (d / n).is_file()]
    soname = ctypes.util.find_library("mkl_rt")
    return found + ([soname] if soname else [])


def _load_sgemm():
    """(address of sgemm_, description) from the first library that loads, or raises
    OSError with why."""
    candidates = _library_candidates()
    if not candidates:
        raise OSError("no MKL runtime (libmkl_rt) found; `pip install mkl` or set "
                      f"{ENV}=PATH to a library with a Fortran sgemm_")
    errors = []
    for path in candidates:
        try:
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            address = ctypes.cast(library.sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError) as e:
            errors.append(str(e) if path in str(e) else f"{path}: {e}")  # dlerror names it
            continue
        _keep.append(library)
        _use_32_bit_integers(library)
        _prefer_gnu_openmp(library)
        return address, path
    raise OSError("; ".join(errors))


def _use_32_bit_integers(library) -> None:
    """sgemm.cc passes 32-bit integers; MKL's runtime library reads 64-bit ones when
    MKL_INTERFACE_LAYER=ILP64 is set, and would then read garbage (and crash)."""
    setter = getattr(library, "MKL_Set_Interface_Layer", None)
    if setter is None:
        return
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    if setter(0) != 0:  # MKL_INTERFACE_LP64
        raise OSError(f"{library._name}: MKL would not take 32-bit integers (LP64)")


def _prefer_gnu_openmp(library) -> None:
    """MKL's threads on GNU OpenMP (libgomp) unless MKL_THREADING_LAYER says otherwise.

    Measured on the MAE ViT-B/16 float32 step (BENCHMARKS.md section 16): with MKL's default
    Intel OpenMP, whose idle threads spin for 200 ms after each product, the step was 3%
    slower than with XLA's products, as the spinning took the cores from XLA's threads; with
    Intel OpenMP told not to spin (KMP_BLOCKTIME=0) 11% faster, and with GNU OpenMP 14%."""
    setter = getattr(library, "MKL_Set_Threading_Layer", None)
    if setter is None or os.environ.get("MKL_THREADING_LAYER"):
        return  # not MKL, or the user's choice
    try:
        ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        os.environ.setdefault("KMP_BLOCKTIME", "0")  # read when Intel OpenMP starts
        return
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    setter(3)  # MKL_THREADING_GNU


def _compiled_handler() -> Path:
    """The handler's shared library, compiled once per source, jaxlib version, machine and
    compiler command (a home directory shared by several machines keeps one per kind)."""
    import jaxlib
    include = jax.ffi.include_dir()
    compiler = shlex.split(os.environ.get("CXX") or "c++")  # e.g. CXX="ccache g++"
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}"]
    identity = [jaxlib.__version__, platform.machine(), *compiler, *flags]
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(identity).encode()).hexdigest()[:16]
    target = _cache_dir() / f"sgemm_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        command = [*compiler, *flags, str(SOURCE), "-o", str(partial)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                  timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise OSError(f"could not run the C++ compiler {' '.join(compiler)!r}: {e}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise OSError(f"compiling {SOURCE.name} failed: {last}")
        os.replace(partial, target)  # atomic: another process sees all of it or none
    return target


def enable() -> str:
    """Loads the BLAS library and the handler and registers the custom call, once per
    process. Returns '' when float32 products now take this path, else why not (one line)."""
    global _status
    with _lock:
        if _status is None:
            _status = _try_enable()
        return _status


def _try_enable() -> str:
    if os.environ.get(ENV, "").lower() == "none":
        return f"{ENV}=none"
    try:  # the handler first: a failed compile leaves no BLAS library loaded
        handler = ctypes.CDLL(str(_compiled_handler()))
        set_sgemm, entry = handler.mim_jax_set_sgemm, handler.MimJaxSgemm
        address, _ = _load_sgemm()
        set_sgemm.argtypes = [ctypes.c_void_p]
        set_sgemm(address)
        _keep.append(handler)
        if not _registered:  # XLA keeps one handler per name for the process's life
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(entry), platform="cpu")
            _registered.append(handler)
    except Exception as e:  # noqa: BLE001 - any failure means: keep XLA's products
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__
    return ""


def enabled() -> bool:
    """Whether `enable` has succeeded in this process."""
    return _status == ""


@contextlib.contextmanager
def layer_products(on: bool = True):
    """Functions traced inside put their float32 layer products on BLAS (when `on` and
    `enable` has succeeded); outside, `dot_general` is lax.dot_general."""
    with _active(bool(on) and enabled()):
        yield


def _ffi_gemm(a, b, transpose_a: bool, transpose_b: bool):
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _lax_gemm(a, b, transpose_a: bool, transpose_b: bool):
    dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _gemm_impl(a, b, transpose_a, transpose_b):
    # Chosen per lowering platform: a program for another platform has no custom call.
    return lax.platform_dependent(
        a, b, cpu=functools.partial(_ffi_gemm, transpose_a=transpose_a, transpose_b=transpose_b),
        default=functools.partial(_lax_gemm, transpose_a=transpose_a, transpose_b=transpose_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def gemm(a, b, transpose_a: bool = False, transpose_b: bool = False):
    """op(a) @ op(b) for 2-D float32 a, b; op transposes where asked."""
    return _gemm_impl(a, b, transpose_a, transpose_b)


def _gemm_fwd(a, b, transpose_a, transpose_b):
    return _gemm_impl(a, b, transpose_a, transpose_b), (a, b)


def _gemm_bwd(transpose_a, transpose_b, residuals, g):
    a, b = residuals
    # c = op(a) op(b): d op(a) = g op(b)^T and d op(b) = op(a)^T g, each one product whose
    # operands are read as stored (transposed by sgemm, never copied).
    d_a = (gemm(b, g, transpose_b, True) if transpose_a
           else gemm(g, b, False, not transpose_b))
    d_b = (gemm(g, a, True, transpose_a) if transpose_b
           else gemm(a, g, not transpose_a, False))
    return d_a, d_b


gemm.defvjp(_gemm_fwd, _gemm_bwd)


def _layer_form(lhs, rhs, dimension_numbers) -> bool:
    """Whether dot_general(lhs, rhs, dims) is a layer's product: no batch axes, lhs
    contracting its trailing axes and rhs its leading ones, in order, of matching and
    nonzero sizes (anything else, including an invalid product, is lax's to handle)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or not lc or len(lc) != len(rc) or len(lc) > min(lhs.ndim, rhs.ndim):
        return False
    n = len(lc)
    contracted = lhs.shape[lhs.ndim - n:]
    return (tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim)) and
            tuple(rc) == tuple(range(n)) and tuple(rhs.shape[:n]) == tuple(contracted) and
            all(size > 0 for size in lhs.shape + rhs.shape))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
    """A drop-in dot_general (flax's `dot_general=`): the BLAS product for a float32 layer
    product on one CPU device, traced inside `layer_products`, else lax.dot_general."""
    use = (_active.value and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32 and
           preferred_element_type in (None, jnp.float32) and jax.device_count() == 1 and
           _layer_form(lhs, rhs, dimension_numbers))
    if not use:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    n = len(dimension_numbers[0][0])
    k = math.prod(lhs.shape[lhs.ndim - n:])
    out = gemm(lhs.reshape(-1, k), rhs.reshape(k, -1))
    return out.reshape(*lhs.shape[:lhs.ndim - n], *rhs.shape[n:])


# '%x = f32[m,n]{1,0} custom-call(%a, %b), custom_call_target="mim_jax_sgemm",
#  operand_layout_constraints={f32[m,k]{1,0}, ...}'
_CALL = re.compile(r"= f32\[(\d+),(\d+)\]\S* custom-call\([^\n]*?custom_call_target=\""
                   + TARGET + r"\"[^\n]*?operand_layout_constraints=\{f32\[(\d+),(\d+)\]")


def hlo_flops(hlo_text: str) -> float:
    """FLOPs of the BLAS products in a compiled program's HLO text, which XLA's cost analysis
    does not see (a custom call is opaque to it): 2 m n k for each."""
    total = 0.0
    for m, n, a0, a1 in _CALL.findall(hlo_text):
        if int(m) == 0:
            continue
        k = int(a0) * int(a1) // int(m)  # a is [m, k] or [k, m]
        total += 2.0 * int(m) * int(n) * k
    return total
