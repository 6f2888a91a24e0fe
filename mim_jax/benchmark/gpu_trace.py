"""Where a GPU train step's time goes: the kernels of a jax.profiler trace, by kind.

  python -m mim_jax.benchmark --config ... --trace_dir DIR    # on the GPU machine
  python -m mim_jax.benchmark.gpu_trace DIR [--steps 3]       # anywhere with TensorFlow

DIR holds the trace (*.xplane.pb, searched recursively, or a copy of it), the compiled step's
HLO text (train_step.hlo.txt, or .gz) and the number of traced steps (traced_steps.txt; else 3
or --steps). Only GPU 0's kernels are read. Kernels are sorted into matrix products (cuBLAS,
gemm fusions), cuDNN attention, and XLA's own fusions by the HLO opcodes they run (a kernel is
named after its HLO instruction, dots and dashes turned into underscores). The time between
kernels (the device idle) is reported too: it is what launch overhead and host work cost.
"""
from __future__ import annotations

import collections
import glob
import gzip
import os
import re
import sys
from typing import Iterable, Optional, Sequence, Tuple

# Kernels are classified by the HLO opcodes they run (fusions expanded), first match wins.
OP_CATEGORIES = (
    ("masking (gather/scatter/sort)", ("gather", "scatter", "sort")),
    ("matmul / conv", ("dot", "convolution")),
    ("reductions (norms, softmax, sums)", ("reduce",)),
)
OTHER_CATEGORY = "elementwise / copies / other"
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")

ATTENTION = "attention (cuDNN)"
MATMUL = "matmul / conv (cuBLAS, cuDNN, gemm fusions)"
UNMATCHED = "not an HLO instruction (memset, copies, library helpers)"
# Library kernels carry the library's own names, not the HLO instruction's.
_ATTENTION_WORDS = ("sdpa", "fmha", "flash")
_MATMUL_WORDS = ("nvjet", "gemm", "xmma", "cutlass", "cublas", "wgmma")

Event = Tuple[str, int, int]  # (kernel name, start ps, duration ps)
STEPS_FILE = "traced_steps.txt"  # written by write_trace


def write_trace(runner, compiled, steps: int, trace_dir: str) -> dict:
    """A jax.profiler trace of `steps` calls of a StepRunner (any backend: TensorBoard's profile
    plugin or XProf read it; on a GPU it holds every kernel with its HLO op) and the compiled
    step's HLO text beside it, to name the ops behind the kernels (what `load` reads)."""
    import jax
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, "train_step.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    with open(os.path.join(trace_dir, STEPS_FILE), "w") as f:
        f.write(f"{steps}\n")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            runner()
    return {"trace_dir": trace_dir, "steps": steps}


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


def _normalise(name: str) -> str:
    return re.sub(r"[.\-]", "_", name)


def classify_kernel(name: str, ops_by_kernel: dict) -> str:
    lowered = name.lower()
    if any(word in lowered for word in _ATTENTION_WORDS):
        return ATTENTION
    ops = ops_by_kernel.get(name)
    if ops is None:
        # cuDNN's other kernels are convolutions (or their layout helpers), not attention.
        if any(word in lowered for word in _MATMUL_WORDS + ("cudnn", "conv")):
            return MATMUL
        return UNMATCHED
    category = op_category(ops)
    return MATMUL if category.startswith("matmul") else category


def summarize(events: Sequence[Event], hlo_text: str, steps: int, top: int = 12) -> dict:
    """Per-step kernel time by kind, the device's idle time between kernels, top kernels."""
    if not events:
        raise ValueError("the trace holds no GPU kernel events.")
    ops_by_kernel = {_normalise(k): v for k, v in hlo_instruction_ops(hlo_text).items()}
    by_category, count, by_kernel = (collections.Counter(), collections.Counter(),
                                     collections.Counter())
    for name, _, duration in events:
        category = classify_kernel(name, ops_by_kernel)
        by_category[category] += duration
        count[category] += 1
        by_kernel[name] += duration
    busy = sum(by_category.values())
    idle, end = 0, None
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        if end is not None and start > end:
            idle += start - end
        end = start + duration if end is None else max(end, start + duration)
    ms = lambda ps: ps / 1e9 / steps
    return {
        "steps": steps, "kernel_ms_per_step": ms(busy), "idle_ms_per_step": ms(idle),
        "kernels_per_step": len(events) / steps,
        "categories": {c: {"ms_per_step": ms(v), "share": v / busy,
                           "kernels_per_step": count[c] / steps}
                       for c, v in by_category.most_common()},
        "top_kernels": [{"name": n, "ms_per_step": ms(v),
                         "category": classify_kernel(n, ops_by_kernel),
                         "opcodes": sorted(o for o in ops_by_kernel.get(n, ())
                                           if o not in ("parameter", "fusion", "tuple",
                                                        "bitcast", "constant"))}
                        for n, v in by_kernel.most_common(top)],
        "idle_note": "device time between the first kernel's start and the last kernel's end "
                     "with no kernel running (launch gaps, host work, steps' boundaries)",
    }


def read_gpu_events(path: str, device: int = 0) -> list:
    """Kernel events of one GPU's plane (/device:GPU:<device>) of an .xplane.pb file."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # ships with TensorFlow
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    events = []
    for plane in space.planes:
        if plane.name != f"/device:GPU:{device}":
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            base = line.timestamp_ns * 1000
            events.extend((names.get(e.metadata_id, ""), base + e.offset_ps, e.duration_ps)
                          for e in line.events)
    return events


def _find(directory: str, patterns: Iterable[str]) -> Optional[str]:
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(directory, "**", pattern), recursive=True))
        if found:
            return found[-1]
    return None


def load(directory: str) -> tuple:
    """-> (events of GPU 0, HLO text, traced steps or None) of a --trace_dir folder."""
    trace = _find(directory, ("*.xplane.pb",))
    hlo = _find(directory, ("train_step.hlo.txt", "train_step.hlo.txt.gz"))
    if trace is None or hlo is None:
        raise FileNotFoundError(f"{directory} needs a *.xplane.pb trace and train_step.hlo.txt"
                                f"[.gz]; found trace={trace}, hlo={hlo}.")
    steps_file = _find(directory, (STEPS_FILE,))
    steps = None
    if steps_file is not None:
        with open(steps_file) as f:
            steps = int(f.read().strip())
    opener = gzip.open if hlo.endswith(".gz") else open
    with opener(hlo, "rt") as f:
        return read_gpu_events(trace), f.read(), steps


def format_summary(summary: dict) -> str:
    lines = [f"kernels {summary['kernel_ms_per_step']:.2f} ms per step "
             f"({summary['kernels_per_step']:.0f} kernels), device idle between kernels "
             f"{summary['idle_ms_per_step']:.2f} ms per step"]
    for category, v in summary["categories"].items():
        lines.append(f"  {category:58s} {v['ms_per_step']:8.2f} ms {v['share']:6.1%} "
                     f"({v['kernels_per_step']:.0f} kernels)")
    lines.append("top kernels:")
    for k in summary["top_kernels"]:
        lines.append(f"  {k['name'][:60]:60s} {k['ms_per_step']:7.3f} ms  {k['category']}"
                     + (f"  {', '.join(k['opcodes'][:8])}" if k["opcodes"] else ""))
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    steps = None
    if "--steps" in args:
        i = args.index("--steps")
        steps = int(args[i + 1])
        del args[i:i + 2]
    usage = "usage: python -m mim_jax.benchmark.gpu_trace TRACE_DIR [--steps N]"
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(args) != 1:
        print(usage, file=sys.stderr)
        return 2
    events, hlo, traced = load(args[0])
    steps = steps or traced or 3  # --trace_dir writes how many steps it traced
    print(format_summary(summarize(events, hlo, steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
