"""Checkpoint converters between mim_jax parameters and PyTorch MAE, SimMIM, BEiT,
timm ConvNet (SparK) and torchscale BEiT-3 layouts.

All converters take plain mappings of torch tensors or numpy arrays and return float32 numpy
trees / dicts, so torch is only needed to read .pth files (files.load_torch_state_dict);
files.read_weights also reads safetensors files and Hugging Face folders. sources says which
layout a file or folder is in and reads the encoder in it; sizes describes an encoder (from
its parameters, or a ViT's from a file's tensors) so that it can be checked against a model.
"""
from mim_jax.convert.hf_beit import (beit_params_from_hf, beit_params_to_hf,
                                     vit_params_from_hf_beit)
from mim_jax.convert.hf_mae import encoder_params_to_hf, mae_params_from_hf, mae_params_to_hf
from mim_jax.convert.hf_swin import config_from_hf, swin_params_from_hf, swin_params_to_hf
from mim_jax.convert.hf_vit import simmim_params_from_hf_vit, simmim_params_to_hf_vit
from mim_jax.convert.official_beit import (beit_params_from_official, beit_params_to_official,
                                           is_official_beit)
from mim_jax.convert.files import load_torch_state_dict, read_weights, write_safetensors
from mim_jax.convert.official_mae import mae_params_from_official, mae_params_to_official
from mim_jax.convert.official_simmim import (is_official_simmim, simmim_params_from_official,
                                             simmim_params_to_official,
                                             swin_config_from_official)
from mim_jax.convert.timm_convnet import (convnet_variables_from_timm,
                                          convnet_variables_to_timm)
from mim_jax.convert.torchscale_beit3 import (beit3_params_from_torchscale,
                                              beit3_params_to_torchscale)

__all__ = [
    "beit3_params_from_torchscale",
    "beit3_params_to_torchscale",
    "beit_params_from_hf",
    "beit_params_from_official",
    "beit_params_to_hf",
    "beit_params_to_official",
    "config_from_hf",
    "convnet_variables_from_timm",
    "convnet_variables_to_timm",
    "encoder_params_to_hf",
    "is_official_beit",
    "is_official_simmim",
    "load_torch_state_dict",
    "mae_params_from_hf",
    "mae_params_from_official",
    "mae_params_to_hf",
    "mae_params_to_official",
    "read_weights",
    "simmim_params_from_hf_vit",
    "simmim_params_from_official",
    "simmim_params_to_hf_vit",
    "simmim_params_to_official",
    "swin_params_from_hf",
    "swin_config_from_official",
    "swin_params_to_hf",
    "vit_params_from_hf_beit",
    "write_safetensors",
]
