"""Every matrix product of the train step, timed alone: mim_jax's (XLA, with the products'
library the step compiles with) next to PyTorch's (torch.einsum on the same operands).

The step's products are read from its jaxpr (forward, backward and any product inside a cond,
scan or remat; with cpu_dots 'mkl', MKL's custom calls are products too and are timed as
such), one entry per distinct (shapes, dimension numbers, dtype) with how often the step runs
it. Each is compiled alone (XLA picks its own layout for it, so a transposing copy
it needs is in its time) and timed in interleaved rounds with the PyTorch call.

Reading the sums: mim_jax's is an upper bound on its products inside the step, where XLA lays
out each operand for its neighbours and copies less; PyTorch's is close to the time its own
step spends in mm / addmm, since PyTorch multiplies strided operands as they are. Per shape,
the rows show which products lose the most.
"""
from __future__ import annotations

import collections
from typing import Iterable, Optional

import jax
import numpy as np
from jax import lax

from mim_jax import blas, cpu_dots
from mim_jax.benchmark.environment import environment
from mim_jax.benchmark.timing import call_summary, interleaved_calls
from mim_jax.benchmark.train_step import build_train_setup

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
MKL = "mkl"  # the precision slot of a product the step hands to MKL (mim_jax.blas)


def _subjaxprs(params: dict) -> Iterable:
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):  # ClosedJaxpr
                yield item.jaxpr
            elif hasattr(item, "eqns"):  # Jaxpr
                yield item


def jaxpr_products(jaxpr, counts: Optional[collections.Counter] = None,
                   times: int = 1) -> collections.Counter:
    """{(lhs shape, rhs shape, dimension numbers, lhs dtype, rhs dtype, result dtype,
    precision): calls} of every dot_general in a jaxpr and the jaxprs inside it. A scan's
    body counts once per iteration, a while loop's once (its trip count is not known when
    tracing). Of a cond's branches, a program for a CPU runs the 'cpu' one of a
    lax.platform_dependent; any other cond counts its costliest branch, which overcounts a
    branch taken on some steps only (e.g. a first-step initialisation)."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval for v in eqn.invars)
            dims = ((tuple(map(int, lc)), tuple(map(int, rc))),
                    (tuple(map(int, lb)), tuple(map(int, rb))))
            counts[(tuple(lhs.shape), tuple(rhs.shape), dims, str(lhs.dtype), str(rhs.dtype),
                    str(eqn.outvars[0].aval.dtype), eqn.params.get("precision"))] += times
        if (eqn.primitive.name == "ffi_call"
                and eqn.params.get("target_name") == blas.TARGET):
            # MKL's product (cpu_dots 'mkl'), recorded as the dot_general it computes with
            # "mkl" for precision; run_compare_products times it through mim_jax.blas.
            attributes = dict(eqn.params["attributes"])
            lhs, rhs = (v.aval for v in eqn.invars)
            dims = (((0 if attributes["transpose_a"] else 1,),
                     (1 if attributes["transpose_b"] else 0,)), ((), ()))
            counts[(tuple(lhs.shape), tuple(rhs.shape), dims, str(lhs.dtype), str(rhs.dtype),
                    str(eqn.outvars[0].aval.dtype), MKL)] += times
        if eqn.primitive.name == "cond":
            counts.update({key: n * times for key, n in _cond_products(eqn).items()})
            continue
        repeat = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn.params):
            jaxpr_products(sub, counts, times * repeat)
    return counts


def _cond_products(eqn) -> collections.Counter:
    branches = [jaxpr_products(b.jaxpr) for b in eqn.params["branches"]]
    platforms = eqn.params.get("branches_platforms")
    if platforms:
        for branch, names in zip(branches, platforms):
            if names is not None and "cpu" in names:
                return branch
        default = [b for b, names in zip(branches, platforms) if names is None]
        if default:
            return default[0]
    return max(branches, key=lambda c: sum(_flops(*k[:3]) * n for k, n in c.items()))


def _flops(lhs_shape, rhs_shape, dims) -> int:
    (lc, rc), (lb, rb) = dims
    out = [lhs_shape[i] for i in range(len(lhs_shape)) if i not in lc] + [
        rhs_shape[i] for i in range(len(rhs_shape)) if i not in rc and i not in rb]
    return 2 * int(np.prod(out, dtype=np.int64)) * int(
        np.prod([lhs_shape[i] for i in lc], dtype=np.int64))


def einsum_spec(lhs_shape, rhs_shape, dims) -> str:
    """The torch.einsum equation of lax.dot_general(lhs, rhs, dims): batch, lhs free, rhs free."""
    (lc, rc), (lb, rb) = dims
    lhs = list(_LETTERS[:len(lhs_shape)])
    rhs = [None] * len(rhs_shape)
    for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
        rhs[b] = lhs[a]
    free = iter(_LETTERS[len(lhs_shape):])
    rhs = [r if r is not None else next(free) for r in rhs]
    out = ([lhs[i] for i in lb] + [lhs[i] for i in range(len(lhs)) if i not in lc + lb] +
           [rhs[i] for i in range(len(rhs)) if i not in rc + rb])
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def run_compare_products(config, threads: int, steps: int, warmup: int,
                         top: int = 12) -> dict:
    import torch
    torch.set_num_threads(threads)
    if jax.devices()[0].platform != "cpu":
        raise ValueError("--mode=compare_products compares on the CPU; run with "
                         "JAX_PLATFORMS=cpu.")
    setup = build_train_setup(config)
    with blas.layer_products(cpu_dots.prepare(setup.cpu_dots)):  # as the step is traced
        products = jaxpr_products(jax.make_jaxpr(setup.step)(setup.state, setup.batch).jaxpr)
    rng = np.random.default_rng(0)
    rows, libraries = [], set()
    for key, calls in products.items():
        lhs_shape, rhs_shape, dims, dtype, rhs_dtype, result, precision = key
        lhs = rng.standard_normal(lhs_shape, np.float32).astype(dtype)
        rhs = rng.standard_normal(rhs_shape, np.float32).astype(rhs_dtype)
        if precision == MKL:
            (lc, rc), _ = dims
            product = jax.jit(lambda a, b, ta=lc == (0,), tb=rc == (1,): blas.gemm(a, b, ta, tb))
        else:
            product = jax.jit(lambda a, b, key=key: lax.dot_general(
                a, b, key[2], precision=key[6], preferred_element_type=key[5]))
        compiled, library = cpu_dots.compile_step(product.lower(lhs, rhs),
                                                  config.get("cpu_dots", "auto"),
                                                  report=lambda message: None)
        libraries.add(library)
        device_args = jax.device_put((lhs, rhs))
        torch_args = [torch.from_numpy(np.array(a, np.float32)).to(getattr(torch, str(a.dtype)))
                      for a in (lhs, rhs)]
        spec = einsum_spec(lhs_shape, rhs_shape, dims)
        timed = interleaved_calls(
            {"mim_jax": lambda: compiled(*device_args).block_until_ready(),
             "torch": lambda: torch.einsum(spec, *torch_args)}, steps, warmup)  # sums in float32
        median = {side: call_summary(c)["median_s"] for side, c in timed.items()}
        flops = _flops(lhs_shape, rhs_shape, dims)
        rows.append({"lhs": list(lhs_shape), "rhs": list(rhs_shape), "dims": dims,
                     "dtypes": [dtype, rhs_dtype, result], "precision": str(precision),
                     "calls_per_step": calls, "einsum": spec,
                     "gflop_per_call": flops / 1e9,
                     "median_s": median,
                     "per_step_s": {side: t * calls for side, t in median.items()},
                     "gflops_per_sec": {side: flops / t / 1e9 for side, t in median.items()}})
    rows.sort(key=lambda r: r["per_step_s"]["torch"] - r["per_step_s"]["mim_jax"])
    total = {side: sum(r["per_step_s"][side] for r in rows) for side in ("mim_jax", "torch")}
    return {"mode": "compare_products", "environment": environment(threads),
            "batch": config.batch_size, "products": "/".join(sorted(libraries)),
            "distinct_products": len(rows),
            "calls_per_step": sum(r["calls_per_step"] for r in rows),
            "gflop_per_step": sum(r["gflop_per_call"] * r["calls_per_step"] for r in rows),
            "per_step_s": total, "torch_over_mim_jax": total["torch"] / total["mim_jax"],
            "largest_losses": rows[:top], "rows": rows,
            "method": "each distinct dot_general of the train step's jaxpr compiled alone with "
                      "config.cpu_dots and timed interleaved with torch.einsum on the same "
                      "operands (medians of the rounds); per step = median x the calls the "
                      "step makes; a platform choice counts its CPU branch, any other cond its "
                      "costliest branch, a while loop's body once"}
