"""OpenAI's DALL-E dVAE encoder (the `dall_e` package) state dict <-> mim_jax DVAEEncoder params.

The official layout nests everything under `blocks.`: `input.{w,b}` (7x7 conv),
`group_{g}.block_{i}.id_path.{w,b}` (1x1 conv, only where a block changes width: the first
block of groups 2..4), `group_{g}.block_{i}.res_path.conv_{1..4}.{w,b}` and `output.conv.{w,b}`.
Its convolutions store weights as (out, in, k, k); ours are flax kernels (k, k, in, out).

OpenAI publishes the encoder as `encoder.pkl`, a whole pickled torch module. mim_jax never
unpickles code-carrying objects, so extract its plain state dict once (this needs the reference
package: `pip install --no-deps dall-e==0.1 attrs requests`; its declared dependencies would
pull torchvision and GPU torch, which the encoder does not use):

    python -c "import torch; torch.save(torch.load('encoder.pkl', map_location='cpu', weights_only=False).state_dict(), 'dall_e_encoder.pt')"

and point `objective.tokenizer.checkpoint` at dall_e_encoder.pt.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from mim_jax.convert import common
from mim_jax.convert.files import load_torch_state_dict

# The released encoder's structure (the defaults of dall_e.encoder.Encoder).
GROUP_COUNT = 4
N_BLK_PER_GROUP = 2


def extraction_command(path) -> str:
    return (f"python -c \"import torch; torch.save(torch.load('{path}', map_location='cpu', "
            f"weights_only=False).state_dict(), 'dall_e_encoder.pt')\"")


def _conv(prefix: str) -> common.Plan:
    """dall_e Conv2d (w: (out, in, k, k), b) -> flax Conv (kernel (k, k, in, out), bias)."""
    return {"kernel": common.Leaf((f"{prefix}.w",), lambda w: w.transpose(2, 3, 1, 0),
                                  lambda k: (k.transpose(3, 2, 0, 1),)),
            "bias": common.tensor(f"{prefix}.b")}


def plan(group_count: int = GROUP_COUNT, n_blk_per_group: int = N_BLK_PER_GROUP) -> common.Plan:
    out: common.Plan = {"input": _conv("blocks.input")}
    for g in range(1, group_count + 1):
        group = {}
        for i in range(1, n_blk_per_group + 1):
            prefix = f"blocks.group_{g}.block_{i}"
            block = {f"conv_{j}": _conv(f"{prefix}.res_path.conv_{j}") for j in range(1, 5)}
            # Widths double at each group's first block (group 1 keeps the input conv's width),
            # and only there does the shortcut need a projection.
            if g > 1 and i == 1:
                block["id_path"] = _conv(f"{prefix}.id_path")
            group[f"block_{i}"] = block
        out[f"group_{g}"] = group
    out["output"] = _conv("blocks.output.conv")
    return out


def params_from_official(state_dict: Mapping[str, Any], *, group_count: int = GROUP_COUNT,
                         n_blk_per_group: int = N_BLK_PER_GROUP, strict: bool = True,
                         expected: Optional[Mapping] = None,
                         target: str = "the dVAE encoder") -> dict:
    """Official encoder state dict -> our DVAEEncoder params (float32 numpy).

    The counts are not stored in the file; missing keys always raise, unexpected ones (a
    deeper model, or the decoder's keys) raise when strict. With `expected` (our parameter tree
    of arrays or jax.ShapeDtypeStructs) every shape is checked and all mismatches are listed in
    one ValueError.
    """
    layout = plan(group_count, n_blk_per_group)
    common.check_keys(state_dict.keys(), common.plan_keys(layout), strict, "DALL-E encoder")
    shapes = common.expected_shapes(expected) if expected is not None else None
    return common.load(layout, state_dict, expected=shapes, what="DALL-E encoder checkpoint",
                       target=target)


def params_to_official(params: Mapping) -> Dict[str, np.ndarray]:
    """Our DVAEEncoder params -> official state dict (numpy; wrap in torch.from_numpy to save).
    The group and block counts are read from the parameter tree."""
    groups = [k for k in params if re.fullmatch(r"group_\d+", k)]
    blocks = len(params[groups[0]]) if groups else 0
    return common.dump(plan(len(groups), blocks), params, "DVAEEncoder")


def load_state_dict(path) -> Dict[str, Any]:
    """Reads a plain encoder state dict (torch tensors) without unpickling code. The official
    encoder.pkl (a pickled module) is refused with one line saying how to extract it."""
    try:
        return load_torch_state_dict(path)
    except ValueError as err:
        refused = re.search(r" holds a pickled ([\w.]+)", str(err))
        if not refused:  # missing, damaged, not a torch file: the loader's message says it
            raise
        raise ValueError(
            f"{path} holds a pickled {refused.group(1)} (OpenAI's encoder.pkl is a whole "
            f"pickled torch module), which mim_jax does not unpickle; if you trust the file, "
            f"extract its state dict once (needs `pip "
            f"install --no-deps dall-e==0.1 attrs requests`) with {extraction_command(path)} "
            f"and pass dall_e_encoder.pt.") from None
