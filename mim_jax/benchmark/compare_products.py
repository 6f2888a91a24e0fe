"""Every matrix product of the train step, timed alone: mim_jax's (XLA, with the products'
library the step compiles with) next to PyTorch's (torch.einsum on the same operands).

The step's products are read from its jaxpr (forward, backward and any product inside a cond,
scan or remat), one entry per distinct (shapes, dimension numbers, dtype) with how often the
step runs it. Each is compiled alone (XLA picks its own layout for it, so a transposing copy
it needs is in its time) and timed in interleaved rounds with the PyTorch call. The sums say
how much of a compare_torch gap is the products themselves, and which shapes lose it.
"""
from __future__ import annotations

import collections
from typing import Iterable, Optional

import jax
import numpy as np
from jax import lax

from mim_jax import cpu_dots
from mim_jax.benchmark.environment import environment
from mim_jax.benchmark.timing import call_summary, interleaved_calls
from mim_jax.benchmark.train_step import build_train_setup

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _subjaxprs(params: dict) -> Iterable:
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):  # ClosedJaxpr
                yield item.jaxpr
            elif hasattr(item, "eqns"):  # Jaxpr
                yield item


def jaxpr_products(jaxpr, counts: Optional[collections.Counter] = None,
                   times: int = 1) -> collections.Counter:
    """{(lhs shape, rhs shape, dimension numbers, input dtype, result dtype): calls} of every
    dot_general in a jaxpr and the jaxprs inside it; a scan's body counts once per
    iteration."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval for v in eqn.invars)
            dims = ((tuple(map(int, lc)), tuple(map(int, rc))),
                    (tuple(map(int, lb)), tuple(map(int, rb))))
            result = eqn.outvars[0].aval.dtype
            counts[(tuple(lhs.shape), tuple(rhs.shape), dims, str(lhs.dtype),
                    str(result))] += times
        repeat = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
        if eqn.primitive.name == "cond":  # one branch runs: count the costliest
            branches = [jaxpr_products(b.jaxpr) for b in eqn.params["branches"]]
            biggest = max(branches, key=lambda c: sum(_flops(*k[:3]) * n for k, n in c.items()))
            for key, n in biggest.items():
                counts[key] += n * times
            continue
        for sub in _subjaxprs(eqn.params):
            jaxpr_products(sub, counts, times * repeat)
    return counts


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
    products = jaxpr_products(jax.make_jaxpr(setup.step)(setup.state, setup.batch).jaxpr)
    rng = np.random.default_rng(0)
    rows, libraries = [], set()
    for (lhs_shape, rhs_shape, dims, dtype, result), calls in products.items():
        lhs = rng.standard_normal(lhs_shape, np.float32).astype(dtype)
        rhs = rng.standard_normal(rhs_shape, np.float32).astype(dtype)
        product = jax.jit(lambda a, b, dims=dims, result=result: lax.dot_general(
            a, b, dims, preferred_element_type=result))
        compiled, library = cpu_dots.compile_step(product.lower(lhs, rhs),
                                                  config.get("cpu_dots", "auto"),
                                                  report=lambda message: None)
        libraries.add(library)
        device_args = jax.device_put((lhs, rhs))
        torch_args = [torch.from_numpy(np.array(a, np.float32)).to(getattr(torch, dtype))
                      for a in (lhs, rhs)]
        spec = einsum_spec(lhs_shape, rhs_shape, dims)
        timed = interleaved_calls(
            {"mim_jax": lambda: compiled(*device_args).block_until_ready(),
             "torch": lambda: torch.einsum(spec, *torch_args)}, steps, warmup)  # sums in float32
        median = {side: call_summary(c)["median_s"] for side, c in timed.items()}
        flops = _flops(lhs_shape, rhs_shape, dims)
        rows.append({"lhs": list(lhs_shape), "rhs": list(rhs_shape), "dims": dims,
                     "dtype": dtype, "result_dtype": result, "calls_per_step": calls, "einsum": spec,
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
                      "step makes; a cond counts its costliest branch"}
