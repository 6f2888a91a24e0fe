"""Pieces shared by every experiment config: the base config and the "k=v,k=v" arg parser."""
from __future__ import annotations

import ml_collections

from mim_jax.data.config import default_data_config, optional_field


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'variant=L/16,epochs=1600,quickstart' -> ConfigDict over `defaults`.

    A bare word sets a boolean flag to True. Values are typed like their default, and an
    unknown key fails with the allowed keys listed.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; allowed: {sorted(defaults)}.")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...).")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ValueError(f"config argument {key}={value!r} must be a "
                                 f"{type(default).__name__} (like {default!r}).") from None
        else:
            out[key] = value
    return out


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, over all processes and devices
    c.num_epochs = 100.0
    c.total_steps = 0  # > 0 overrides num_epochs
    c.warmup_epochs = 10.0
    c.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.accum_steps = 1  # gradient accumulation: micro-batch = batch_size / accum_steps
    c.log_every_steps = 50

    # Device mesh (mim_jax/sharding.py): the batch is split over data x fsdp; fsdp > 1 also
    # shards parameters, optimizer state and EMA (each tensor of >= fsdp_min_size elements
    # along a dimension the fsdp size divides). One axis may be -1: the devices left over.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.fsdp_min_size = 2 ** 14
    # (regex on 'params/encoder/.../kernel', per-dimension mesh axes), first match wins; e.g.
    # (("encoder/.*/mlp/.*/kernel", (None, "model")),). Unmatched tensors follow fsdp.
    c.partition_rules = ()

    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.05, grad_clip_norm=0.0, min_lr=0.0))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, asynchronous=True))
    c.evaluators = ml_collections.ConfigDict(dict(
        reconstruction=dict(type="reconstruction", every_steps=1000, num_images=8,
                            error_images=256)))

    c.model = vit_model_config("B/16")
    c.data = default_data_config()
    return c


# Model fields left None take the variant's value; being optional fields, a config's value can
# be given back to the variant with e.g. --config.model.width=None.
def _backbone_common(name: str, variant: str) -> dict:
    return dict(name=name, variant=variant, patch_size=optional_field(int),
                drop_path_rate=0.0, dtype="float32", param_dtype="float32",
                remat="none",  # 'none' | 'full' | 'dots' | 'dots_no_batch' (models/remat.py)
                attention_impl="xla")  # 'xla' | 'cudnn' | 'mim_jax' (models/attention.py)


def vit_model_config(variant: str) -> ml_collections.ConfigDict:
    """ViT: variant 'B/16' etc.; width/depth/num_heads/mlp_dim override it."""
    return ml_collections.ConfigDict(dict(
        _backbone_common("vit", variant),
        width=optional_field(int), depth=optional_field(int),
        num_heads=optional_field(int), mlp_dim=optional_field(int),
        scan=False,
        pos_embed="sincos",  # 'sincos' (fixed) | 'learned' | 'none'
        cls_token=True,
        qkv_bias="qkv",  # 'qkv' | 'qv' (BEiT-style: no k bias) | 'none'
        layer_scale_init=optional_field(float),  # None: no layer scale
        rel_pos_bias="none",  # 'none' | 'shared' | 'per_layer'
        init_style="xavier"))  # 'xavier' (MAE) | 'beit' (BEiT, SimMIM: truncated normal, rescaled)


def swin_model_config(variant: str, window_size: int) -> ml_collections.ConfigDict:
    """Swin: variant 'T' | 'S' | 'B' | 'L'; embed_dim/depths/num_heads override it."""
    return ml_collections.ConfigDict(dict(
        _backbone_common("swin", variant), window_size=window_size,
        embed_dim=optional_field(int), depths=optional_field(tuple),
        num_heads=optional_field(tuple)))


def quickstart_probes(every_steps: int) -> dict:
    """kNN and linear probe (evaluators/probe.py) of mean-pooled features on the bundled digits
    (4,500 train / 500 test). `python -m mim_jax.evaluate` adds the CLS token's."""
    common = dict(every_steps=every_steps, train_split="train", eval_split="test",
                  max_train_examples=0, max_eval_examples=0, pool="gap", batch_size=500)
    probe = dict(common, type="linear_probe", l2_grid=[10.0 ** (k / 2) for k in range(-16, 5)],
                 val_fraction=0.2, max_iter=1000)
    return dict(knn=dict(common, type="knn", k=20, temperature=0.07), linear_probe=probe)
