"""What an encoder is: its sizes, and the options that decide which parameters it has.

Read from our parameter trees (numpy arrays or jax.ShapeDtypeStructs, scanned or not), so a
converted file and the model it is meant for are described the same way and can be compared
before anything runs. For a ViT the sizes can also be read from a weights file's own tensors,
before conversion, which needs the head count that files do not store.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from mim_jax.convert import mae_layout

KINDS = {"vit": "ViT", "swin": "Swin", "resnet": "ResNet", "convnext": "ConvNeXt",
         "multiway": "Multiway Transformer"}

_SIZE_WORDS = {"width": "width {}", "embed_dim": "width {}", "depth": "depth {}",
               "depths": "depths {}", "patch_size": "patch {}", "num_heads": "{} heads",
               "mlp_dim": "MLP {}", "stem_width": "stem width {}", "widths": "widths {}",
               "dims": "dims {}", "channels": "{} channels",
               "vocab_size": "a text vocabulary of {}"}
_OPTION_WORDS = {
    "positions": {"learned": "learned positions", "sincos": "sin-cos positions",
                  "none": "no learned positions"},
    "qkv_bias": {True: "qkv biases", "zero": "zero qkv biases", False: "no qkv biases"},
    "layer_scale": {True: "layer scale", False: "no layer scale"},
    "rel_pos_bias": {True: "a relative position bias", False: "no relative position bias"},
}
# Largest difference from the sin-cos table that still counts as that table: bfloat16
# rounding of values in [-1, 1] (common.rounding_tolerance); a learned table is off by O(1).
_SINCOS_TOLERANCE = 8e-3


def _shape(leaf) -> Tuple[int, ...]:
    return tuple(int(d) for d in np.shape(leaf))


def _has_values(leaf) -> bool:
    return isinstance(leaf, np.ndarray) or hasattr(leaf, "__array__")


# ---------------------------------------------------------------- parameter trees

def positions(encoder: Mapping) -> str:
    """'learned' (a table of its own), 'sincos' (a stored table that is the fixed 2-D sin-cos
    one with a zero CLS row, which mim_jax computes instead of storing) or 'none'."""
    table = encoder.get("pos_embed")
    if table is None:
        return "none"
    shape = _shape(table)
    if not _has_values(table) or len(shape) != 3 or shape[0] != 1 or shape[2] % 4:
        return "learned"
    patches = shape[1] - 1
    if patches < 1 or math.isqrt(patches) ** 2 != patches:
        return "learned"
    error = np.max(np.abs(np.asarray(table, np.float32)
                          - mae_layout.sincos_table(shape[2], patches)))
    return "sincos" if error <= _SINCOS_TOLERANCE else "learned"


def _blocks(transformer: Mapping) -> Tuple[int, Mapping, bool]:
    """(depth, first block, stacked): blocks as block_i or stacked under 'blocks' (scan)."""
    if "blocks" in transformer:
        stacked = transformer["blocks"]
        return _shape(stacked["norm1"]["scale"])[0], stacked, True
    depth = sum(1 for name in transformer if name.startswith("block_"))
    return depth, transformer["block_0"], False


def _bias_presence(bias):
    if bias is None:
        return False
    if _has_values(bias) and not np.any(np.asarray(bias, np.float32)):
        return "zero"  # the same model as no bias: fits a model with or without one
    return True


def vit_sizes(encoder: Mapping) -> Dict[str, Any]:
    patch, _, channels, width = _shape(encoder["patch_embed"]["kernel"])
    depth, block, _ = _blocks(encoder["transformer"])
    qkv = block["attn"]["qkv"]
    return dict(width=width, depth=depth, patch_size=patch,
                num_heads=_shape(qkv["kernel"])[-2], mlp_dim=_shape(block["fc1"]["kernel"])[-1],
                channels=channels, positions=positions(encoder),
                qkv_bias=_bias_presence(qkv.get("bias")), layer_scale="ls1" in block,
                rel_pos_bias="rel_pos_bias" in encoder or "rel_pos_bias" in block)


def _stages(params: Mapping) -> List[Mapping]:
    return [params[f"stage_{i}"] for i in range(sum(k.startswith("stage_") for k in params))]


def _stage_depth(stage: Mapping) -> int:
    return sum(1 for name in stage if name.startswith("block_"))


def swin_sizes(encoder: Mapping) -> Dict[str, Any]:
    patch, _, channels, width = _shape(encoder["patch_embed"]["kernel"])
    stages = _stages(encoder)
    return dict(embed_dim=width, depths=tuple(_stage_depth(s) for s in stages),
                num_heads=tuple(_shape(s["block_0"]["attn"]["qkv"]["kernel"])[-2]
                                for s in stages),
                patch_size=patch, channels=channels)


def resnet_sizes(encoder: Mapping) -> Dict[str, Any]:
    stages = _stages(encoder)
    stem = _shape(encoder["stem_conv"]["kernel"])
    return dict(depths=tuple(_stage_depth(s) for s in stages), stem_width=stem[-1],
                widths=tuple(_shape(s["block_0"]["conv1"]["kernel"])[-1] for s in stages),
                channels=stem[2])


def convnext_sizes(encoder: Mapping) -> Dict[str, Any]:
    stages = _stages(encoder)
    return dict(depths=tuple(_stage_depth(s) for s in stages),
                dims=tuple(_shape(s["block_0"]["dwconv"]["kernel"])[-1] for s in stages),
                channels=_shape(encoder["stem_conv"]["kernel"])[2])


def multiway_sizes(encoder: Mapping) -> Dict[str, Any]:
    patch, _, channels, width = _shape(encoder["patch_embed"]["kernel"])
    layer = encoder["layer_0"]
    qkv = layer["attn"]["qkv"]
    qkv = qkv.get("vision", qkv)  # per modality, or one shared attention
    return dict(width=width, depth=sum(1 for name in encoder if name.startswith("layer_")),
                patch_size=patch, num_heads=_shape(qkv["kernel"])[-2],
                mlp_dim=_shape(layer["ffn"]["vision"]["fc1"]["kernel"])[-1], channels=channels,
                vocab_size=_shape(encoder["text_embed"])[0])


def encoder_sizes(encoder: Mapping) -> Tuple[str, Dict[str, Any]]:
    """(kind, sizes) of an encoder parameter tree: kind is a key of KINDS."""
    if "text_embed" in encoder:
        return "multiway", multiway_sizes(encoder)
    if "transformer" in encoder:
        return "vit", vit_sizes(encoder)
    if "patch_norm" in encoder:
        return "swin", swin_sizes(encoder)
    if "stem_bn" in encoder:
        return "resnet", resnet_sizes(encoder)
    if "stem_norm" in encoder:
        return "convnext", convnext_sizes(encoder)
    raise ValueError(f"parameters with top-level keys {sorted(encoder)} are not a ViT, Swin, "
                     "ResNet, ConvNeXt or Multiway encoder.")


# ---------------------------------------------------------------- weights files

_PATCH_EMBED = re.compile(r"^(?:.*\.)?(?:patch_embed\.proj|patch_embeddings\.projection)"
                          r"\.weight$")
_LAYER = re.compile(r"^(?:.*\.)?(?:blocks|layers|layer)\.(\d+)\.")
# Parts of a file that are not its encoder but number their layers the same way.
_NOT_ENCODER = ("decoder", "cls_pt_")


def vit_sizes_of_state(state: Mapping[str, Any]) -> Dict[str, int]:
    """width, depth, patch_size and channels of the ViT encoder in a state dict of any layout
    mim_jax reads (Hugging Face, timm, official; transformers 4.x names too), from the patch
    embedding's shape and the encoder's layer numbers."""
    keys = [k for k in state if not k.startswith(_NOT_ENCODER)]
    patch_keys = [k for k in keys if _PATCH_EMBED.match(k)]
    if len(patch_keys) != 1:
        raise ValueError(f"expected one ViT patch embedding (…patch_embed.proj.weight or "
                         f"…patch_embeddings.projection.weight), found {patch_keys or 'none'}.")
    shape = _shape(state[patch_keys[0]])
    if len(shape) != 4:
        raise ValueError(f"{patch_keys[0]} has shape {shape}; expected (width, channels, "
                         "patch, patch).")
    layers = {int(m.group(1)) for m in map(_LAYER.match, keys) if m}
    return dict(width=shape[0], depth=max(layers) + 1 if layers else 0, patch_size=shape[2],
                channels=shape[1])


# ---------------------------------------------------------------- comparing

def differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> List[str]:
    """The entries in which `found` (a file's encoder) does not fit `wanted` (a model's), in
    `wanted`'s order; entries only one side knows are not compared. A stored sin-cos table
    fits a model with learned or fixed positions, zero qkv biases one with or without them."""
    out = []
    for key, want in wanted.items():
        if key not in found or want is None or found[key] is None:
            continue
        got = found[key]
        if key == "positions":
            differ = {got, want} == {"learned", "none"}
        elif key == "qkv_bias":
            differ = got != "zero" and bool(got) != bool(want)
        else:
            differ = _normal(got) != _normal(want)
        if differ:
            out.append(key)
    return out


def _normal(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def describe_fields(sizes: Mapping[str, Any], keys) -> str:
    """'width 384, no learned positions' for the given entries of a description."""
    words = []
    for key in keys:
        value = sizes[key]
        if key in _OPTION_WORDS:
            words.append(_OPTION_WORDS[key].get(value, f"{key} {value}"))
        else:
            words.append(_SIZE_WORDS[key].format(_normal(value)))
    return ", ".join(words)


def describe(kind: str, sizes: Mapping[str, Any], options=()) -> str:
    """'a ViT of width 768, depth 12, patch 16, 12 heads, MLP 3072' (channels when not 3),
    plus ' with ...' for the named option entries."""
    keys = [k for k in sizes if k in _SIZE_WORDS and (k != "channels" or sizes[k] != 3)]
    text = f"a {KINDS[kind]} of {describe_fields(sizes, keys)}"
    options = [k for k in options if k in _OPTION_WORDS]
    return f"{text} with {describe_fields(sizes, options)}" if options else text
