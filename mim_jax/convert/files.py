"""Weight files: reading PyTorch state dicts, safetensors files and Hugging Face folders, and
writing safetensors. Nothing here runs pickled code: PyTorch files are read with
weights_only=True, safetensors files hold tensors only.

Tensors come back as numpy arrays in the dtype they were stored in (bfloat16 as ml_dtypes'
bfloat16); the layout converters upcast to float32.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np
from etils import epath

from mim_jax import paths

SAFETENSORS_NAME = "model.safetensors"  # what save_pretrained writes and from_pretrained reads
HF_CONFIG_NAME = "config.json"
# What a Hugging Face folder keeps its weights in, in the order they are looked for.
FOLDER_WEIGHTS = (SAFETENSORS_NAME, "model.safetensors.index.json", "pytorch_model.bin")
# Dtypes a file may store floating-point weights in; integer buffers (index tables) are kept.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


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


def _read_safetensors(path) -> Dict[str, np.ndarray]:
    import ml_dtypes
    from safetensors import SafetensorError, deserialize
    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    try:
        entries = deserialize(epath.Path(path).read_bytes())
    except (SafetensorError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}.") from None
    out = {}
    for key, entry in entries:
        if entry["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {key} is stored as {entry['dtype']}; mim_jax "
                             f"reads {sorted(dtypes)}.")
        out[key] = np.frombuffer(entry["data"], dtypes[entry["dtype"]]).reshape(entry["shape"])
    return out


def _hf_weights_file(folder) -> epath.Path:
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder} holds no {SAFETENSORS_NAME}, model.safetensors.index.json or "
                     "pytorch_model.bin: pass a folder written by save_pretrained or "
                     "python -m mim_jax.export, or a weights file.")


def _read_sharded(index) -> Dict[str, np.ndarray]:
    """A sharded save_pretrained folder: the index names the file each tensor is in."""
    weight_map = json.loads(index.read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        out.update(_read_safetensors(index.parent / shard))
    return out


def read_weights(path) -> Dict[str, Any]:
    """The tensors of a weights file or a Hugging Face folder (local or gs://):
    FILE.safetensors, a PyTorch state dict (.pth, .pt, .bin; see load_torch_state_dict), or a
    folder holding model.safetensors (possibly sharded) or pytorch_model.bin."""
    path = epath.Path(path)
    if path.is_dir():
        path = _hf_weights_file(path)
        if path.name.endswith(".index.json"):
            return _read_sharded(path)
    elif not path.is_file():
        raise ValueError(f"{path}: no such file or folder.")
    if path.name.endswith(".safetensors"):
        return _read_safetensors(path)
    return load_torch_state_dict(path)


def read_hf_config(path) -> Optional[dict]:
    """The config.json next to a weights file, or in a folder; None where there is none."""
    path = epath.Path(path)
    folder = path if path.is_dir() else path.parent
    record = folder / HF_CONFIG_NAME
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except ValueError as err:
        raise ValueError(f"{record} is not valid JSON: {err}.") from None


def cast(tensors: Mapping[str, Any], dtype: str) -> Dict[str, np.ndarray]:
    """C-contiguous numpy copies with floating-point tensors in `dtype` (integer buffers such
    as relative-position indices keep theirs)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {list(FLOAT_DTYPES)}.")
    import ml_dtypes
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    out = {}
    for key, value in tensors.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16:
            value = value.astype(target)
        out[key] = np.ascontiguousarray(value)
    return out


def write_safetensors(tensors: Mapping[str, Any], path, *, dtype: str = "float32",
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes `tensors` (floats cast to `dtype`) as one safetensors file, atomically.
    {'format': 'pt'} is in the header, as transformers and timm expect of a PyTorch file."""
    from safetensors.numpy import save
    header = {"format": "pt", **(metadata or {})}
    paths.write_whole(path, save(cast(tensors, dtype), metadata=header))
