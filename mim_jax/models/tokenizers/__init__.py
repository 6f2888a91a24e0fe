"""Frozen visual tokenizers that give BEiT its targets: images -> token ids, inside the jitted
train step.

One interface for every tokenizer (the DALL-E dVAE of BEiT v1, the VQ-KD of BEiT v2):
  build(tok_cfg, image_size, channels) -> TokenizerSpec
    name        tok_cfg.name ('dall_e' or 'vqkd').
    module      a linen module whose `encode(images)` maps float32 images in [0, 1], NHWC, at
                the pretraining image size, to int32 token ids [B, L] (row-major over the
                token grid); it resizes to its own input size itself (the dVAE's 112 px view).
    vocab_size  number of distinct ids.
    grid        token grid side (L = grid * grid); BEiT's patch grid must equal it.
    config      the block's validated values (incl. `checkpoint`), for whoever reads the weights.
Nothing here reads a file: mim_jax.pretrained reads the weights tok_cfg.checkpoint names (a
converted reference file or a mim_jax run) and passes the block a mim_jax VQ-KD run recorded.
Tokenizer weights are never trained by the objective that uses them: BEiT keeps them in the
train state's model_state, so a resumed run does not depend on the file still being there.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import flax.linen as nn

# tok_cfg.name -> module that defines build(tok_cfg, image_size, channels) -> TokenizerSpec.
_MODULES = {"dall_e": "mim_jax.models.tokenizers.dvae",
            "vqkd": "mim_jax.models.tokenizers.vqkd"}


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    name: str
    module: nn.Module
    vocab_size: int
    grid: int
    config: Mapping[str, Any]

    def encode(self, params, images):
        """images: float32 [B, H, W, C] in [0, 1] -> int32 token ids [B, grid * grid]."""
        return self.module.apply({"params": params}, images, method="encode")


def names():
    return sorted(_MODULES)


def build(tok_cfg, image_size: int, channels: int) -> TokenizerSpec:
    name = tok_cfg.get("name")
    if name not in _MODULES:
        raise ValueError(f"objective.tokenizer.name={name!r} is not a known tokenizer; allowed: "
                         f"{names()}.")
    return importlib.import_module(_MODULES[name]).build(tok_cfg, image_size, channels)
