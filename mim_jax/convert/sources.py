"""Weights from elsewhere: which layout a file or folder is in, what it records about itself,
and the encoder in it as a mim_jax parameter tree.

A folder written by transformers' save_pretrained names its `model_type` in config.json; one
written by timm (save_for_hf / push_to_hub, what timm.create_model('local-dir:DIR') reads)
names its `architecture` and the constructor's `model_args` there; a folder mim_jax exported
also holds mim_jax_export.json with the run's model block. A bare weights file records
nothing: its key names say the layout, and the head count (which no layout stores) comes
from elsewhere.

Layouts (LAYOUT_NAMES) and what reads their encoder:
  hf_vit         ViTMAEModel / ViTMAEForPreTraining, ViTModel / ViTForMaskedImageModeling
                 (hf_vit.simmim_params_from_hf_vit: the same encoder keys)
  hf_beit        BeitModel / BeitForMaskedImageModeling (hf_beit.vit_params_from_hf_beit)
  hf_swin        SwinModel / SwinForMaskedImageModeling (hf_swin.swin_params_from_hf)
  timm_vit       timm vit_*, official MAE (timm_vit.vit_params_from_timm)
  timm_beit      timm beit*, official unilm BEiT / BEiT v2 (beit_params_from_official)
  simmim         official microsoft/SimMIM, ViT or Swin (simmim_params_from_official)
  timm_resnet, timm_convnext   timm resnet* / convnext*, SparK's releases
                 (timm_convnet.convnet_variables_from_timm)
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Dict, Mapping, Optional

from etils import epath

from mim_jax.convert import (files, hf_beit, hf_swin, hf_vit, official_beit, official_simmim,
                             sizes, timm_convnet, timm_vit)
from mim_jax.models import swin, vit

EXPORT_RECORD = "mim_jax_export.json"  # written next to the weights by mim_jax's export
HF_MODEL_TYPES = {"vit_mae": "hf_vit", "vit": "hf_vit", "beit": "hf_beit", "swin": "hf_swin"}
TIMM_ARCHITECTURES = {"vit_": "timm_vit", "beit": "timm_beit", "resnet": "timm_resnet",
                      "convnext": "timm_convnext"}  # architecture name prefix -> layout
LAYOUT_NAMES = {
    "hf_vit": "Hugging Face ViT / ViTMAE", "hf_beit": "Hugging Face BEiT",
    "hf_swin": "Hugging Face Swin", "timm_vit": "timm / official MAE ViT",
    "timm_beit": "timm / official BEiT", "simmim": "official SimMIM",
    "timm_resnet": "timm ResNet", "timm_convnext": "timm ConvNeXt"}
# timm's size names -> our ViT variants (their head counts: vit.VARIANTS).
_TIMM_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
_TIMM_SIZE_RE = re.compile(r"^[a-z0-9]+_(tiny|small|base|large|huge)_")

# Parts of each layout that are not its encoder (heads, decoders, poolers), set aside before
# the strict key check, which then refuses anything else the encoder would silently lose.
_NOT_ENCODER: Dict[str, Callable[[str], bool]] = {
    "hf_vit": lambda k: k.startswith(("decoder.", "pooler.")),
    "hf_beit": lambda k: k.startswith(("lm_head.", "pooler.")),
    "timm_vit": lambda k: k.startswith(("head.", "fc_norm.", "decoder_")) or k == "mask_token",
    "timm_beit": lambda k: k.startswith(("head.", "fc_norm.", "lm_head.", "cls_pt_")),
}


@dataclasses.dataclass(frozen=True)
class Weights:
    """The tensors of a weights file or folder and what the folder records about them."""
    path: str
    state: Dict[str, Any]
    layout: str  # a key of LAYOUT_NAMES
    hf_config: Optional[dict] = None  # a Hugging Face config.json
    timm_config: Optional[dict] = None  # a timm config.json
    export: Optional[dict] = None  # mim_jax_export.json

    @property
    def name(self) -> str:
        return LAYOUT_NAMES[self.layout]

    @property
    def description(self) -> str:
        """'a ResNet in the timm ResNet layout', for messages."""
        return f"a {sizes.KINDS[self.backbone]} in the {self.name} layout"

    @property
    def backbone(self) -> str:
        """'vit', 'swin', 'resnet' or 'convnext' (mim_jax's model.name)."""
        if self.layout == "hf_swin" or (self.layout == "simmim" and _is_simmim_swin(self.state)):
            return "swin"
        return {"timm_resnet": "resnet", "timm_convnext": "convnext"}.get(self.layout, "vit")


# ---------------------------------------------------------------- finding and reading

def _read_json(path: epath.Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None
    return record if isinstance(record, dict) else None


def _folder_records(folder: epath.Path):
    """(Hugging Face config, timm config, export record) of a folder; None where absent. A
    config.json of neither kind (a mim_jax run's) is no weights record."""
    config = _read_json(folder / files.HF_CONFIG_NAME) or {}
    hf = config if "model_type" in config else None
    timm = config if "architecture" in config else None
    return hf, timm, _read_json(folder / EXPORT_RECORD)


def read_export_record(path) -> Optional[dict]:
    """mim_jax_export.json of a folder (or of a file's folder): the exported run's format,
    objective, model and data blocks and step; None where there is none."""
    path = epath.Path(path)
    return _read_json((path if path.is_dir() else path.parent) / EXPORT_RECORD)


def is_weights(path) -> bool:
    """Whether `path` is a weights file or a folder of weights (Hugging Face, timm, exported
    by mim_jax: model.safetensors, ... or a config.json of theirs) rather than a mim_jax
    run."""
    if not path:
        return False
    path = epath.Path(path)
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    if any((path / name).is_file() for name in files.FOLDER_WEIGHTS):
        return True
    hf, timm, export = _folder_records(path)
    return bool(hf or timm or export)


def read(path) -> Weights:
    """The tensors of a weights file or folder (files.read_weights: safetensors, PyTorch state
    dicts with weights_only, Hugging Face folders) with the folder's records; a file next to
    a Hugging Face / timm config.json takes that too. Raises ValueError saying why not."""
    path = epath.Path(path)
    folder = path if path.is_dir() else path.parent
    hf, timm, export = _folder_records(folder)
    state = files.read_weights(path)
    return Weights(path=str(path), state=state, layout=_layout(state, hf, timm),
                   hf_config=hf, timm_config=timm, export=export)


def _layout(state: Mapping[str, Any], hf: Optional[dict], timm: Optional[dict]) -> str:
    if hf is not None:
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"config.json has model_type={model_type!r}; mim_jax reads "
                             f"{sorted(HF_MODEL_TYPES)}.")
        return HF_MODEL_TYPES[model_type]
    if timm is not None:
        architecture = str(timm.get("architecture"))
        for prefix, layout in TIMM_ARCHITECTURES.items():
            if architecture.startswith(prefix):
                return layout
        raise ValueError(f"config.json has architecture={architecture!r}; mim_jax reads timm's "
                         f"{[p + '*' for p in TIMM_ARCHITECTURES]}.")
    return layout_of_keys(state)


def layout_of_keys(state: Mapping[str, Any]) -> str:
    """The layout a bare state dict's key names say."""
    if official_simmim.is_official_simmim(state):
        return "simmim"
    if official_beit.is_official_beit(state):
        return "timm_beit"
    if "patch_embed.proj.weight" in state:
        return "timm_vit"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "timm_resnet"
    if "stem.0.weight" in state and "stages.0.blocks.0.conv_dw.weight" in state:
        return "timm_convnext"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state):
        if any(".blocks.0." in k for k in state):
            return "hf_swin"
        if any(k.startswith("beit.") or "lambda_1" in k or "relative_position_bias" in k
               for k in state):
            return "hf_beit"
        return "hf_vit"
    raise ValueError(f"the tensors ({_sample(state)}) are in no layout mim_jax reads: "
                     f"{sorted(set(LAYOUT_NAMES.values()))}.")


def _sample(state: Mapping[str, Any]) -> str:
    keys = sorted(state)
    return ", ".join(keys[:4]) + (f", … ({len(keys)} in all)" if len(keys) > 4 else "")


def _is_simmim_swin(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("encoder.layers.") for k in state)


# ---------------------------------------------------------------- what the records say

def recorded_vit_heads(weights: Weights) -> Optional[int]:
    """The ViT's head count where a record says it: config.json's num_attention_heads
    (Hugging Face) or model_args / the architecture's size name (timm), or the exported run's
    model block; None for a bare file."""
    if weights.hf_config is not None and weights.hf_config.get("num_attention_heads"):
        return int(weights.hf_config["num_attention_heads"])
    if weights.timm_config is not None:
        args = weights.timm_config.get("model_args") or {}
        if args.get("num_heads"):
            return int(args["num_heads"])
        size = _TIMM_SIZE_RE.match(str(weights.timm_config.get("architecture")))
        if size:
            return vit.VARIANTS[_TIMM_SIZES[size.group(1)]]["num_heads"]
    model = (weights.export or {}).get("model") or {}
    if model.get("num_heads"):
        return int(model["num_heads"])
    if model.get("variant") and model.get("name", "vit") == "vit":
        return vit.parse_variant(model["variant"])["num_heads"]
    return None


def recorded_input(weights: Weights) -> Dict[str, Any]:
    """The image size, mean and std the weights were trained with, where recorded: the
    exported run's data block, timm's pretrained_cfg, a Hugging Face config's image_size."""
    out: Dict[str, Any] = {}
    if weights.hf_config is not None:
        size = weights.hf_config.get("image_size")
        out["image_size"] = size[0] if isinstance(size, (list, tuple)) else size
    if weights.timm_config is not None:
        cfg = weights.timm_config.get("pretrained_cfg") or {}
        if cfg.get("input_size"):
            out["image_size"] = cfg["input_size"][-1]
        out.update({k: tuple(cfg[k]) for k in ("mean", "std") if cfg.get(k)})
    data = (weights.export or {}).get("data") or {}
    out.update({k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
                if k in ("image_size", "mean", "std") and v})
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------- encoders

def _encoder_part(weights: Weights) -> Dict[str, Any]:
    drop = _NOT_ENCODER.get(weights.layout, lambda k: False)
    return {k: v for k, v in weights.state.items() if not drop(k)}


def vit_encoder(weights: Weights, num_heads: int) -> dict:
    """The ViT encoder of a file in any ViT layout, with its position table as stored
    (sizes.positions tells a learned one from the fixed sin-cos one). Every key of the
    encoder must be there and nothing else, heads and decoders aside."""
    state = _encoder_part(weights)
    if weights.layout == "hf_vit":
        params = hf_vit.simmim_params_from_hf_vit(state, num_heads=num_heads)
    elif weights.layout == "hf_beit":
        params = hf_beit.vit_params_from_hf_beit(state, num_heads=num_heads)
    elif weights.layout == "timm_vit":
        params = timm_vit.vit_params_from_timm(state, num_heads=num_heads)
    elif weights.layout == "timm_beit":
        params = official_beit.beit_params_from_official(state, num_heads=num_heads)
    elif weights.layout == "simmim" and weights.backbone == "vit":
        params = official_simmim.simmim_params_from_official(state, num_heads=num_heads)
    else:
        raise ValueError(f"the weights are {weights.description}, not a ViT.")
    return params["encoder"]


def swin_config(weights: Weights) -> swin.SwinConfig:
    """The Swin a file holds: its Hugging Face config.json, or an official SimMIM file's
    tables and buffers."""
    if weights.layout == "simmim":
        return official_simmim.swin_config_from_official(weights.state)
    if weights.hf_config is None:
        raise ValueError("a Hugging Face Swin file needs the config.json saved with it (head "
                         "counts and window size are not in the weights): pass the folder.")
    return hf_swin.config_from_hf(weights.hf_config)


def swin_encoder(weights: Weights, config: swin.SwinConfig) -> dict:
    if weights.layout == "simmim":
        params = official_simmim.simmim_params_from_official(weights.state, swin_config=config)
    elif weights.layout == "hf_swin":
        params = hf_swin.swin_params_from_hf(weights.state, config=config)
    else:
        raise ValueError(f"the weights are {weights.description}, not a Swin.")
    return params["encoder"]


def convnet_variables(weights: Weights, like) -> dict:
    """{'params': {'encoder', ...}, ['batch_stats': ...]} of a timm ResNet / ConvNeXt file,
    at the depths and widths the file has (the rest of the architecture as `like`, a
    ResNetConfig or ConvNeXtConfig). A classifier head is left out."""
    if weights.layout not in ("timm_resnet", "timm_convnext"):
        raise ValueError(f"the weights are {weights.description}, not a timm ResNet or "
                         "ConvNeXt.")
    arch = timm_convnet.config_of_state(weights.state, like)
    return timm_convnet.convnet_variables_from_timm(weights.state, config=arch, strict=False)
