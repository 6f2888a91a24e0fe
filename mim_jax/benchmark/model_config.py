"""Benchmark config overrides (--batch, --image_size, --variant) and the model description."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mim_jax import flops


def apply_overrides(config, batch: Optional[int], image_size: Optional[int],
                    variant: Optional[str]):
    if batch is not None:
        if batch <= 0:
            raise ValueError(f"--batch={batch} must be > 0.")
        config.batch_size = batch
    if image_size is not None:
        config.data.image_size = image_size
    if variant is not None:
        config.model.variant = variant
    return config


def describe_model(config) -> dict:
    arch = flops.backbone_arch(config)
    finetune = config.get("finetune")
    obj = finetune if finetune is not None else config.objective
    return {"objective": finetune.mode if finetune is not None else obj.name,
            "backbone": config.model.get("name", "vit"),
            "variant": config.model.variant, "arch": dataclasses.asdict(arch),
            "image_size": config.data.image_size, "objective_config": obj.to_dict(),
            "dtype": config.model.get("dtype", "float32"),
            "remat": config.model.get("remat", False), "scan": config.model.get("scan", False),
            "batch_size": config.batch_size, "accum_steps": config.get("accum_steps", 1)}

