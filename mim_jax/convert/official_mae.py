"""Official facebookresearch/mae checkpoints (timm-style names) <-> mim_jax MAE parameters.

Two layouts occur: the full pretraining model (MaskedAutoencoderViT: encoder + mask_token,
decoder_* keys), and the released mae_pretrain_vit_*.pth files, which hold only the encoder.
Both are stored under a top-level 'model' key.
"""
from __future__ import annotations

import argparse
import collections
import io
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np
from etils import epath

from mim_jax import paths
from mim_jax.convert import common, mae_layout


def _block(prefix: str, num_heads: int) -> common.Plan:
    return common.block(
        norm1=f"{prefix}norm1", qkv=common.qkv_fused(f"{prefix}attn.qkv", num_heads),
        proj=f"{prefix}attn.proj", norm2=f"{prefix}norm2",
        fc1=f"{prefix}mlp.fc1", fc2=f"{prefix}mlp.fc2", num_heads=num_heads)


def _encoder(depth: int, heads: int) -> common.Plan:
    return {
        "patch_embed": common.patch_conv("patch_embed.proj"),
        "cls_token": common.tensor("cls_token"),
        "transformer": {f"block_{i}": _block(f"blocks.{i}.", heads) for i in range(depth)},
        "norm": common.layernorm("norm"),
    }


def _decoder(depth: int, heads: int) -> common.Plan:
    return {
        "decoder_embed": common.linear("decoder_embed"),
        "mask_token": common.tensor("mask_token"),
        "transformer": {f"block_{i}": _block(f"decoder_blocks.{i}.", heads)
                        for i in range(depth)},
        "decoder_norm": common.layernorm("decoder_norm"),
        "decoder_pred": common.linear("decoder_pred"),
    }


LAYOUT = mae_layout.MAELayout(
    name="official MAE", encoder=_encoder, encoder_layers="blocks.", encoder_pos="pos_embed",
    decoder=_decoder, decoder_layers="decoder_blocks.", decoder_pos="decoder_pos_embed")


# What official training checkpoints need beyond tensors and containers. MAE's ('model',
# 'optimizer', 'epoch', 'scaler', 'args'): the argparse.Namespace of its command line.
# SimMIM's ('model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'): its yacs
# CfgNode, read as a plain OrderedDict without importing yacs (the weights_only loader fills
# only exact dict / OrderedDict / Counter instances, so a dict subclass cannot stand in).
# Nothing else is ever unpickled; torch's weights_only loader refuses every other global.
_ALLOWED_GLOBALS = (argparse.Namespace, (collections.OrderedDict, "yacs.config.CfgNode"))


def _extraction_hint(path) -> str:
    return (f"if you trust the file, extract its state dict once with python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save(c['model'] if "
            f"isinstance(c, dict) else c.state_dict(), 'state_dict.pth')\" and pass that file")


def load_torch_state_dict(path) -> Dict[str, Any]:
    """torch.load a checkpoint on CPU with weights_only=True (no pickled code runs) and unwrap
    the 'model' key that the official training script saves around the state dict.

    Official training checkpoints also hold their settings: MAE's command line as an
    argparse.Namespace under 'args', which is allowed, and SimMIM's yacs CfgNode under
    'config', which is read as a plain OrderedDict without importing yacs. Nothing else is
    allowed. Anything that cannot be read this way raises ValueError with one line saying why
    and how to extract a plain state dict.
    """
    import pickle

    import torch  # only needed here; the rest of the converters take plain mappings

    if not epath.Path(path).is_file():
        raise ValueError(f"{path}: no such checkpoint file.")
    # torch reads a local file itself; an object in a bucket (gs://) is read whole first.
    source = path if paths.is_local(path) else io.BytesIO(epath.Path(path).read_bytes())
    try:
        with torch.serialization.safe_globals(list(_ALLOWED_GLOBALS)):
            checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused:  # a class outside the allow-list: the weights_only loader refused it
            raise ValueError(f"{path} holds a pickled {refused.group(1)}, which mim_jax does "
                             f"not unpickle (it loads tensors, containers, argparse."
                             f"Namespace and yacs CfgNode, as a plain dict, only); "
                             f"{_extraction_hint(path)}.") from None
        # not a torch file, truncated, damaged
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = lines[-1].split(". ")[0] if lines else type(err).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {cause}.") from None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got "
                         f"{type(checkpoint).__name__}); {_extraction_hint(path)}.")
    return dict(checkpoint)


def mae_params_from_official(state_dict: Mapping[str, Any], *, num_heads: int,
                             decoder_num_heads: Optional[int] = None, scan: bool = False,
                             strict: bool = True, expected: Optional[Mapping] = None) -> dict:
    """Official MAE state dict -> mim_jax MAE parameters (float32 numpy).

    The full pretraining layout gives {'encoder', 'decoder'}; an encoder-only file
    (mae_pretrain_vit_*.pth) gives {'encoder'}. A top-level 'model' key is unwrapped.
    Official models use 12 heads for ViT-B, 16 for ViT-L/H and 16 in the decoder; checkpoints
    do not store them. Fine-tuned checkpoints carry extra keys (fc_norm, head): pass
    strict=False to ignore them. float16 / bfloat16 checkpoints are accepted (upcast to
    float32). Every tensor's shape is checked against `expected` (the target model's
    parameter tree, arrays or jax.ShapeDtypeStructs) when given, else against the sizes the
    checkpoint implies; all mismatches are listed in one ValueError.
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    with_decoder = any(k.startswith("decoder_") or k == "mask_token" for k in state_dict)
    return mae_layout.import_mae(state_dict, LAYOUT, num_heads=num_heads,
                                 decoder_num_heads=decoder_num_heads, with_decoder=with_decoder,
                                 scan=scan, strict=strict, expected=expected)


def mae_params_to_official(params: Mapping, *, image_size: int) -> Dict[str, np.ndarray]:
    """Our {'encoder', ['decoder']} parameters -> official MAE state dict (no 'model' wrapper),
    including the fixed pos_embed / decoder_pos_embed for `image_size`."""
    return mae_layout.export_mae(params, LAYOUT, image_size)
