"""The largest per-chip batch that fits, for a grid of models x TPU generations x memory savers.

  python -m mim_jax.benchmark.aot_table --out benchmarks/aot_table.jsonl [--cells B/16,L/16]
      [--keys "full|fsdp4"] [--chips v5e,v4,v5p] [--seeded_only] [--tolerance 0.125]
      [--max_compiles 6]

Each cell is one `mim_jax.aot.find_max_batch` search (compiles of the real train step for a
TPU slice described by libtpu; see mim_jax/aot.py). A search takes minutes per compile on a
CPU (half an hour for BEiT-3 large), so results are appended to --out as JSON lines: one line
per compile as it ends ({"key", "chip", "compile": [batch, bytes or null, seconds]}) and the
cell's row when it finishes. A rerun skips the cells already there and goes on with a stopped
search from its compiles: the table can be built over several sittings, and one process per
chip can run side by side. Every row is searched on the first chip before any row on the
second. A cell's search starts where the same model and memory savers ended on another chip
(searched earlier in this run or in an earlier sitting), moved along their memory line to the
new chip's HBM; --seeded_only keeps to such cells, which take few compiles. At the end the
table is printed as Markdown.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time

if __name__ == "__main__":  # first: before anything starts threads (mim_jax/allocator.py)
    from mim_jax.allocator import apply_cpu_policy
    apply_cpu_policy()

from absl import app, flags

from mim_jax import aot

# A 2x2 slice of each generation: per-chip figures; fsdp 4 shards over its 4 chips.
TOPOLOGIES = {"v5e": "v5e:2x2", "v4": "v4:2x2x1", "v5p": "v5p:2x2x1"}


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str  # row label
    config: str  # config file:argument
    remat: str
    fsdp: int  # 1: data parallel over the slice; 4: data=1, fsdp=4
    start: int  # first per-chip batch tried on the first chip
    # Unrolled blocks: a scanned ViT compiles in about half the time, but on a TPU its remat
    # program needed far more memory per image than the unrolled one (docs/performance.md, TPU).
    scan: bool = False

    @property
    def key(self) -> str:
        mesh = "data" if self.fsdp == 1 else f"fsdp{self.fsdp}"
        return f"{self.model}|{self.remat}|{mesh}|scan={self.scan}"


def _vit(variant, remat, fsdp, start):
    return Cell(f"MAE {variant}", f"configs/mae.py:variant={variant}", remat, fsdp, start)


# In order of priority: no memory saver, every saver, then the two halves.
CELLS = (
    _vit("B/16", "none", 1, 512), _vit("L/16", "none", 1, 96), _vit("H/14", "none", 1, 16),
    _vit("B/16", "full", 4, 768), _vit("L/16", "full", 4, 384), _vit("H/14", "full", 4, 128),
    _vit("B/16", "full", 1, 1024), _vit("L/16", "full", 1, 256), _vit("H/14", "full", 1, 64),
    _vit("B/16", "none", 4, 512), _vit("L/16", "none", 4, 128), _vit("H/14", "none", 4, 32),
    Cell("SimMIM Swin-B 192 px", "configs/simmim.py:model=swin_b", "none", 1, 96),
    Cell("SimMIM Swin-B 192 px", "configs/simmim.py:model=swin_b", "full", 4, 512),
    # BEiT-3 base: 9.97 GiB at 48 per chip on v5e (temporaries 6.37 GiB), so start near the edge.
    Cell("BEiT-3 base", "configs/beit3.py:variant=base", "none", 1, 88),
    Cell("BEiT-3 base", "configs/beit3.py:variant=base", "full", 4, 192),
    Cell("BEiT-3 large", "configs/beit3.py:variant=large", "none", 1, 12),
    Cell("BEiT-3 large", "configs/beit3.py:variant=large", "full", 4, 192),
)

_OUT = flags.DEFINE_string("out", "benchmarks/aot_table.jsonl", "JSON lines, appended per "
                            "cell (the repository keeps the cells searched so far).")
_CELLS = flags.DEFINE_list("cells", [], "Only rows whose model label contains one of these.")
_KEYS = flags.DEFINE_list("keys", [], "Only rows whose key (model|remat|mesh|scan=...) contains "
                          "one of these, e.g. 'full|fsdp4'.")
_CHIPS = flags.DEFINE_list("chips", list(TOPOLOGIES), "TPU generations, in search order.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.125, "Stop when the misfit is within this "
                                "fraction above the largest fit.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 6, "Compiles per cell at most.")
_SEEDED_ONLY = flags.DEFINE_bool("seeded_only", False, "Only cells already searched on another "
                                 "chip (their search starts from its memory line: few compiles).")


def selected(cell: Cell, labels=(), keys=()) -> bool:
    """Whether --cells (model labels) and --keys (cell keys) both let the cell through."""
    return ((not labels or any(c in cell.model for c in labels))
            and (not keys or any(k in cell.key for k in keys)))


def load_config(cell: Cell):
    path, _, arg = cell.config.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    config = module.get_config(arg or None)
    config.model.dtype = "bfloat16"
    config.model.remat = cell.remat
    if cell.scan:
        config.model.scan = True
    if cell.fsdp > 1:
        config.mesh.data, config.mesh.fsdp = 1, cell.fsdp
    return config


def _read(path):
    """(finished rows, {(key, chip): [compile entries of a search not finished]})."""
    if not os.path.exists(path):
        return [], {}
    with open(path) as f:
        text = [line for line in f if line.strip()]
    lines = []
    for number, line in enumerate(text, 1):
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(text):
                raise ValueError(f"{path}:{number} is not a JSON line; fix or delete it.")
            print(f"{path}:{number}: a line cut short (a killed write), ignored", flush=True)
    rows = [r for r in lines if "compile" not in r]
    compiles = {}
    for r in lines:
        if "compile" in r:
            compiles.setdefault((r["key"], r["chip"]), []).append(tuple(r["compile"]))
    return rows, compiles


def _append(path, line: dict):
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def _seed(previous, hbm):
    """(start batch, bytes per image) for a new chip from the same cell on an earlier chip:
    the line through its two smallest compiled batches, moved to this chip's HBM, rounded
    down to a multiple of 8. Near HBM, XLA's own remat flattens that line (L/16 on v5e: 14.26
    GiB at 96 per chip, 14.60 at 192), which would send the start far past the answer; the
    mean bytes per image of the largest fit bounds the slope from above, so it is used when
    larger: a start that fits costs one compile and aims the next, one far too large costs
    several out-of-memory compiles."""
    points = sorted((b, t) for b, t, _ in previous["compiles"] if t is not None)
    if len(points) < 2 or points[1][1] <= points[0][1]:
        return None, None
    (b1, t1), (b2, t2) = points[:2]
    slope = (t2 - t1) / (b2 - b1)
    if previous.get("fits") and previous.get("fits_bytes"):
        slope = max(slope, previous["fits_bytes"] / previous["fits"])
    guess = b1 + (hbm - t1) / slope
    return max(8, int(guess * 0.9) // 8 * 8), slope


def seed_row(done: dict, key: str, chip: str, searched_before: list):
    """The same cell's row on another chip, to start this chip's search from: the chip
    searched last before it in this run, else any chip from an earlier sitting (so a run with
    --chips v4 starts from v5e's rows)."""
    others = list(reversed(searched_before)) + [c for c in TOPOLOGIES if c != chip]
    return next((done[(key, c)] for c in others if (key, c) in done), None)


def search(cell: Cell, chip: str, previous, earlier=(), journal=None):
    """One cell's row on one chip. `earlier`: compiles of a stopped search to go on from;
    `journal`: called with each new compile's entry as it ends."""
    topology = TOPOLOGIES[chip]
    devices = aot.topology_devices(topology)
    hbm = aot.hbm_per_device(devices)
    start, slope = _seed(previous, hbm) if previous else (None, None)
    start = start or cell.start
    compiles = list(earlier)

    def report(line):
        print(f"[{cell.key} {chip}] {line.strip()}", flush=True)

    began = time.time() - sum(seconds or 0 for _, _, seconds in compiles)
    config = load_config(cell)
    best, _, misfit = aot.find_max_batch(
        config, devices, hbm, start=start, report=report,
        max_compiles=_MAX_COMPILES.value, tolerance=_TOLERANCE.value, bytes_per_image=slope,
        compiles=compiles, unit=aot.batch_unit(config, devices), on_compile=journal)
    return {"key": cell.key, "model": cell.model, "remat": cell.remat, "fsdp": cell.fsdp,
            "scan": cell.scan, "chip": chip, "topology": topology, "hbm": hbm,
            "fits": best, "fits_bytes": next((t for b, t, _ in compiles if b == best), None),
            "misfit": misfit, "compiles": compiles, "seconds": time.time() - began,
            "date": time.strftime("%Y-%m-%d")}


def markdown(rows) -> str:
    by = {(r["key"], r["chip"]): r for r in rows}
    chips = [c for c in TOPOLOGIES if any(r["chip"] == c for r in rows)]
    lines = ["| model | remat | mesh | " + " | ".join(
        f"{c} ({TOPOLOGIES[c]})" for c in chips) + " |", "|---|---|---|" + "---|" * len(chips)]
    for cell in CELLS:
        cells = [by.get((cell.key, c)) for c in chips]
        if not any(cells):
            continue
        text = []
        for r in cells:
            if r is None:
                text.append("not searched")
            elif not r["fits"]:
                text.append(f"none fits ({r['misfit']} does not)")
            else:
                misfit = f", {r['misfit']} not" if r["misfit"] else ", no larger tried"
                text.append(f"**{r['fits']}** ({r['fits_bytes'] / 2**30:.1f} GiB{misfit})")
        mesh = "data 4" if cell.fsdp == 1 else f"fsdp {cell.fsdp}"
        remat = cell.remat + (" + scan" if cell.scan else "")
        lines.append(f"| {cell.model} | {remat} | {mesh} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    import jax
    jax.config.update("jax_platforms", "cpu")
    sys.path.insert(0, os.getcwd())  # configs import configs.common
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    rows, stopped = _read(_OUT.value)
    done = {(r["key"], r["chip"]): r for r in rows}
    # Chips outer, cells inner: every row gets its first chip before any row its second.
    for position, chip in enumerate(_CHIPS.value):
        for cell in CELLS:
            if not selected(cell, _CELLS.value, _KEYS.value):
                continue
            if (cell.key, chip) in done:
                continue
            previous = seed_row(done, cell.key, chip, _CHIPS.value[:position])
            if previous is None and _SEEDED_ONLY.value:
                continue
            earlier = stopped.get((cell.key, chip), [])
            if earlier:
                print(f"[{cell.key} {chip}] going on from {len(earlier)} earlier compiles: "
                      f"{[entry[0] for entry in earlier]}", flush=True)

            def journal(entry):
                _append(_OUT.value, {"key": cell.key, "chip": chip, "compile": list(entry)})
            row = search(cell, chip, previous, earlier, journal)
            _append(_OUT.value, row)
            done[(cell.key, chip)] = row
            print(f"[{cell.key} {chip}] largest per-chip batch that fits: {row['fits']} "
                  f"(not: {row['misfit']}); {row['seconds']:.0f} s", flush=True)
    print(markdown(list(done.values())), flush=True)


if __name__ == "__main__":
    app.run(main)
