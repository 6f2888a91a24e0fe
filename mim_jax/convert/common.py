"""Shared machinery for checkpoint converters: declarative "plans" evaluated in both directions.

A plan is a nested dict shaped like our parameter tree whose leaves are `Leaf`s: the checkpoint
keys a parameter is made of, plus the transform to our layout and its inverse. Writing each
layout once as a plan gives the import, the export and the strict key check from the same
table, so the two directions cannot drift apart. The per-layer transforms (Linear, LayerNorm,
patch conv, attention projections) live here and are used by every layout module.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

import numpy as np

Plan = Dict[str, Any]  # nested dict of Leaf


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One of our parameters, built from the checkpoint tensors under `keys`."""
    keys: Tuple[str, ...]
    to_ours: Callable[..., np.ndarray]  # checkpoint arrays (in `keys` order) -> our array
    to_theirs: Callable[[np.ndarray], Tuple[np.ndarray, ...]]  # our array -> checkpoint arrays


def to_numpy(value) -> np.ndarray:
    """torch tensor / jax array / numpy -> float32 numpy, without importing torch.

    May share memory with `value` (used for reading); `load` and `dump` copy what they return.
    """
    if hasattr(value, "detach"):  # torch: numpy() cannot represent bfloat16, so upcast first
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=np.float32)


def dtype_name(value) -> str:
    """'float32', 'bfloat16', 'float16', ... for torch tensors, jax and numpy arrays alike."""
    return str(getattr(value, "dtype", "float32")).replace("torch.", "")


# Largest rounding error of a value in [-1, 1] stored in each dtype (half an ulp at 1, with
# margin), so fixed tables (sin-cos positions) saved in low precision still compare equal,
# while a different table (error O(1)) never does.
_ROUNDING_TOLERANCE = {"float16": 1e-3, "half": 1e-3, "bfloat16": 8e-3}


def rounding_tolerance(value) -> float:
    return _ROUNDING_TOLERANCE.get(dtype_name(value), 1e-5)


def owned(value) -> np.ndarray:
    """A C-contiguous float32 copy: converted parameters never alias the caller's tensors (a
    later in-place update of a torch model must not change them) nor read-only jax buffers."""
    return np.array(value, dtype=np.float32, order="C", copy=True)


# ---------------------------------------------------------------- per-layer transforms

def tensor(key: str) -> Leaf:
    """A tensor stored as-is (tokens such as cls_token / mask_token, biases)."""
    return Leaf((key,), lambda a: a, lambda a: (a,))


def linear(prefix: str) -> Plan:
    """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
    return {"kernel": Leaf((f"{prefix}.weight",), lambda w: w.T, lambda k: (k.T,)),
            "bias": tensor(f"{prefix}.bias")}


def layernorm(prefix: str) -> Plan:
    """torch LayerNorm weight/bias -> flax LayerNorm scale/bias."""
    return {"scale": tensor(f"{prefix}.weight"), "bias": tensor(f"{prefix}.bias")}


def patch_conv(prefix: str) -> Plan:
    """torch Conv2d weight (D, C, p, p) -> flax Conv kernel (p, p, C, D)."""
    return {"kernel": Leaf((f"{prefix}.weight",), lambda w: w.transpose(2, 3, 1, 0),
                           lambda k: (k.transpose(3, 2, 0, 1),)),
            "bias": tensor(f"{prefix}.bias")}


def _qkv_from_rows(weights: Iterable[np.ndarray], num_heads: int) -> np.ndarray:
    """Linear weights with rows ordered [head, head_dim], one per q/k/v ->
    our fused DenseGeneral kernel (D, 3, H, Dh)."""
    kernel = np.stack([w.T for w in weights], axis=1)  # (D, 3, H*Dh)
    return kernel.reshape(kernel.shape[0], 3, num_heads, -1)


def qkv_separate(q: str, k: str, v: str, num_heads: int) -> Plan:
    """Three Linear layers (HF: q_proj/k_proj/v_proj) -> our fused qkv."""
    weights = tuple(f"{name}.weight" for name in (q, k, v))
    biases = tuple(f"{name}.bias" for name in (q, k, v))
    return {
        "kernel": Leaf(weights, lambda *ws: _qkv_from_rows(ws, num_heads),
                       lambda kr: tuple(kr.reshape(kr.shape[0], 3, -1)[:, i].T for i in range(3))),
        "bias": Leaf(biases, lambda *bs: np.stack(bs).reshape(3, num_heads, -1),
                     lambda b: tuple(b.reshape(3, -1))),
    }


def qkv_fused(prefix: str, num_heads: int) -> Plan:
    """One Linear with rows [q; k; v] (timm / official MAE: weight (3D, D)) -> our fused qkv."""
    return {
        "kernel": Leaf((f"{prefix}.weight",),
                       lambda w: _qkv_from_rows(np.split(w, 3, axis=0), num_heads),
                       lambda kr: (kr.reshape(kr.shape[0], -1).T,)),
        "bias": Leaf((f"{prefix}.bias",), lambda b: b.reshape(3, num_heads, -1),
                     lambda b: (b.reshape(-1),)),
    }


def attn_out(prefix: str, num_heads: int) -> Plan:
    """Attention output Linear weight (D, H*Dh) -> our DenseGeneral kernel (H, Dh, D)."""
    return {"kernel": Leaf((f"{prefix}.weight",),
                           lambda w: w.T.reshape(num_heads, -1, w.shape[0]),
                           lambda k: (k.reshape(-1, k.shape[-1]).T,)),
            "bias": tensor(f"{prefix}.bias")}


def block(*, norm1: str, qkv: Plan, proj: str, norm2: str, fc1: str, fc2: str,
          num_heads: int) -> Plan:
    """Our pre-norm transformer Block, given the checkpoint's module names for its parts."""
    return {"norm1": layernorm(norm1), "attn": {"qkv": qkv, "proj": attn_out(proj, num_heads)},
            "norm2": layernorm(norm2), "fc1": linear(fc1), "fc2": linear(fc2)}


# ---------------------------------------------------------------- key bookkeeping

def rename_keys(state_dict: Mapping[str, Any], renames) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Applies (compiled regex, replacement) pairs in order to every key.

    Used to accept checkpoints saved under older transformers names. Returns the renamed
    dict and new name -> original name (for error messages); two keys that land on the same
    name (one weight under its old and new names) raise.
    """
    out: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in renames:
            new = pattern.sub(repl, new)
        if new in out:
            raise ValueError(f"state dict holds both {origin[new]!r} and {key!r}, which are "
                             f"the same weight under old and new transformers names.")
        out[new], origin[new] = value, key
    return out, origin


def plan_leaves(plan: Plan, path: Tuple[str, ...] = ()) -> List[Tuple[Tuple[str, ...], Leaf]]:
    out = []
    for name, node in plan.items():
        if isinstance(node, Leaf):
            out.append((path + (name,), node))
        else:
            out.extend(plan_leaves(node, path + (name,)))
    return out


def plan_keys(plan: Plan) -> List[str]:
    return [key for _, leaf in plan_leaves(plan) for key in leaf.keys]


def layer_depth(keys: Iterable[str], prefix: str) -> int:
    """Number of layers stored as `{prefix}{i}.…`: max index + 1, so a gap shows up as
    missing keys in the strict check instead of silently shortening the model."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for m in map(pattern.match, keys) if m]
    return max(indices) + 1 if indices else 0


def check_keys(present: Iterable[str], expected: Iterable[str], strict: bool,
               what: str) -> None:
    """Missing keys always raise (we cannot invent weights); unexpected ones raise if strict."""
    present, expected = set(present), list(expected)
    missing = [k for k in expected if k not in present]
    unexpected = sorted(present - set(expected)) if strict else []
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected} (pass strict=False to ignore them)")
        raise ValueError(f"{what} state dict does not match the expected layout: "
                         + "; ".join(parts) + ".")


def _shape_of(node) -> Tuple[int, ...]:
    return tuple(int(d) for d in np.shape(node))


def expected_shapes(tree: Mapping) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """Flattened path -> shape of a tree of arrays / jax.ShapeDtypeStructs (our layout)."""
    return {path: _shape_of(leaf) for path, leaf in _flatten(tree).items()}


def load(plan: Plan, state_dict: Mapping[str, Any], *,
         expected: Mapping[Tuple[str, ...], Tuple[int, ...]] = None, what: str = "checkpoint",
         target: str = "the model") -> dict:
    """Plan + checkpoint -> our nested parameter dict (float32 numpy arrays owning their memory).

    With `expected` (path -> shape, see expected_shapes), every converted parameter is checked
    against it and every path of it must be produced. All problems are collected and raised as
    one ValueError, so a checkpoint that does not fit lists every offending key at once instead
    of failing later at apply time.
    """
    out: dict = {}
    problems = []
    leaves = plan_leaves(plan)
    for path, leaf in leaves:
        name = "/".join(path)

        def shapes(leaf=leaf):  # for messages only
            return ", ".join(f"{k} {_shape_of(state_dict[k])}" for k in leaf.keys)
        arrays = [to_numpy(state_dict[k]) for k in leaf.keys]
        try:
            value = leaf.to_ours(*arrays)
        except ValueError as err:  # e.g. a width not divisible by the given num_heads
            problems.append(f"{name}: cannot convert {shapes()} ({err})")
            continue
        if expected is not None:
            want = expected.get(path)
            if want is None:
                problems.append(f"{name}: {shapes()} has no counterpart in the target")
                continue
            if tuple(value.shape) != want:
                problems.append(f"{name}: {shapes()} converts to {tuple(value.shape)}, "
                                f"expected {want}")
                continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = owned(value)
    if expected is not None:
        planned = {path for path, _ in leaves}
        problems += [f"{'/'.join(path)} {shape}: not in the checkpoint"
                     for path, shape in expected.items() if path not in planned]
    if problems:
        raise ValueError(f"{what} does not fit {target} ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems) + ".")
    return out


def _flatten(tree: Mapping, path: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for name, node in tree.items():
        if isinstance(node, Mapping):
            out.update(_flatten(node, path + (name,)))
        else:
            out[path + (name,)] = node
    return out


def dump(plan: Plan, params: Mapping, what: str) -> Dict[str, np.ndarray]:
    """Our parameters + plan -> checkpoint dict; the trees must match exactly."""
    flat = _flatten(params)
    leaves = plan_leaves(plan)
    expected = {path for path, _ in leaves}
    missing = sorted("/".join(p) for p in expected - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - expected)
    if missing or unexpected:
        raise ValueError(f"{what} parameters do not match the expected tree: missing {missing}, "
                         f"unexpected {unexpected}.")
    out = {}
    for path, leaf in leaves:
        for key, value in zip(leaf.keys, leaf.to_theirs(to_numpy(flat[path]))):
            out[key] = owned(value)
    return out
