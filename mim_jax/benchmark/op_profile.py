"""Where the step time goes on the CPU: XLA thunks from a jax.profiler trace, by HLO op kind."""
from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Optional

import jax

from mim_jax.benchmark.train_step import StepRunner


# Thunks are classified by the HLO opcodes they run (fusions expanded), first match wins.
OP_CATEGORIES = (
    ("masking (gather/scatter/sort)", ("gather", "scatter", "sort")),
    ("matmul / conv", ("dot", "convolution")),
    ("reductions (norms, softmax, sums)", ("reduce",)),
)
OTHER_CATEGORY = "elementwise / copies / other"
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _opcode(rhs: str) -> Optional[str]:
    """'f32[2]{0} add(x, y)' or '(f32[2], s32[2]) sort(...)' -> the opcode."""
    depth, i = 0, 0
    if rhs.startswith("("):  # tuple shape: skip to its closing parenthesis
        for i, ch in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        rhs = rhs[i + 1:]
    match = re.match(r"\s*(?:\S+\s+)?([a-z][a-z0-9\-]*)\(", rhs)
    return match.group(1) if match else None


def _parse_hlo(hlo_text: str):
    """-> (computation -> its opcodes, computation -> computations it calls,
           instruction -> (opcode, computations it calls))."""
    body_ops, nested, instructions, computation = {}, {}, {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            computation = head.group(1)
            body_ops[computation], nested[computation] = set(), set()
            continue
        inst = _INSTRUCTION.match(line)
        if inst and computation is not None:
            op, callees = _opcode(inst.group(2)), _CALLEE.findall(inst.group(2))
            body_ops[computation].add(op)
            nested[computation].update(callees)
            instructions[inst.group(1)] = (op, callees)
    return body_ops, nested, instructions


def hlo_instruction_ops(hlo_text: str) -> dict:
    """Instruction name -> every opcode it executes (called computations expanded)."""
    body_ops, nested, instructions = _parse_hlo(hlo_text)
    memo = {}

    def closure(computation, stack=()):
        if computation not in memo:
            ops = set(body_ops.get(computation, ()))
            for callee in nested.get(computation, ()):
                if callee not in stack:  # HLO has no recursion; this only guards bad input
                    ops |= closure(callee, stack + (computation,))
            memo[computation] = ops
        return memo[computation]

    out = {}
    for name, (op, callees) in instructions.items():
        ops = {op} - {None}
        for callee in callees:
            ops |= closure(callee)
        out[name] = ops
    return out


def op_category(ops: set) -> str:
    for category, opcodes in OP_CATEGORIES:
        if ops & set(opcodes):
            return category
    return OTHER_CATEGORY


def _thunk_durations(trace_dir: str, names: set) -> dict:
    """Summed duration (s) of every XLA CPU thunk event named like an HLO instruction."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # ships with TensorFlow
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = {}
    for plane in space.planes:
        meta = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = meta.get(event.metadata_id)
                if name in names:
                    totals[name] = totals.get(name, 0.0) + event.duration_ps * 1e-12
    return totals


def profile_ops(runner: StepRunner, compiled, steps: int, top: int = 12) -> dict:
    """Traces `steps` calls of the compiled step and splits the XLA thunk time by op kind."""
    if jax.devices()[0].platform != "cpu":
        return {"error": "--profile classifies XLA CPU thunks; not implemented for "
                         f"{jax.devices()[0].platform}"}
    ops = hlo_instruction_ops(compiled.as_text())
    trace_dir = tempfile.mkdtemp(prefix="mim_jax_profile_")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            runner()
    try:
        durations = _thunk_durations(trace_dir, set(ops))
    except (ImportError, FileNotFoundError) as e:
        return {"error": f"could not read the trace: {e}"}
    total = sum(durations.values())
    if not total:
        return {"error": "the trace holds no XLA thunk events"}
    by_category = {}
    for name, seconds in durations.items():
        category = op_category(ops[name])
        by_category[category] = by_category.get(category, 0.0) + seconds
    ranked = sorted(durations.items(), key=lambda kv: -kv[1])
    describe = lambda n, v: {"name": n, "seconds_per_step": v / steps, "share": v / total,
                             "category": op_category(ops[n]),
                             "opcodes": sorted(o for o in ops[n]
                                               if o not in ("parameter", "fusion"))}
    by_kind = {}
    for name, seconds in ranked:
        kind = by_kind.setdefault(op_category(ops[name]), [])
        if len(kind) < 3:
            kind.append(describe(name, seconds))
    return {
        "steps": steps, "thunk_seconds_per_step": total / steps,
        "categories": {c: {"seconds_per_step": v / steps, "share": v / total}
                       for c, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_ops": [describe(n, v) for n, v in ranked[:top]],
        "top_ops_by_category": by_kind,
        "method": "jax.profiler trace of the XLA CPU thunks; each thunk classified by the HLO "
                  "opcodes it runs; shares are of the summed thunk time",
    }


def write_trace(runner: StepRunner, compiled, steps: int, trace_dir: str) -> dict:
    """A jax.profiler trace of `steps` calls (any backend: TensorBoard's profile plugin or
    XProf read it; on a GPU it holds every kernel with its HLO op) and the compiled step's HLO
    text beside it, to name the ops behind the kernels."""
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, "train_step.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    with open(os.path.join(trace_dir, "traced_steps.txt"), "w") as f:
        f.write(f"{steps}\n")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            runner()
    return {"trace_dir": trace_dir, "steps": steps}

