"""Backbones: build them from the `config.model` block of an experiment config."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from jax import lax

from mim_jax.models import activations, attention, remat as remat_lib, vit

_DTYPES = ("float32", "bfloat16", "float16")
_QKV_BIAS = {"qkv": True, "qv": "qv", "none": False}
BACKBONES = ("vit", "swin", "resnet", "convnext", "multiway")
# config.model fields of the Multiway encoder (None: the preset's value); `variant` is a
# multiway.PRESETS name. vocab_size is the text vocabulary (its embedding rows): a BEiT-3
# objective passes its objective.text.vocab_size instead, a classifier names it here.
MULTIWAY_DEFAULTS = dict(
    name="multiway", variant="base", width=None, depth=None, num_heads=None, mlp_dim=None,
    patch_size=None, multiway_attention=None, vl_ffn_layers=None, sub_ln=None,
    max_text_positions=None, layer_norm_eps=None, vocab_size=None, init_style="torchscale",
    drop_path_rate=0.0, dtype="float32", param_dtype="float32", remat="none",
    attention_impl=None)


def dtype_from_name(name: str, field: str):
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r} is not a supported dtype; allowed: {list(_DTYPES)}.")
    return jnp.dtype(name)


def layer_functions(model_cfg) -> dict:
    """The products, attention and activation every layer takes (`dot_general`,
    `attention_fn`, `activation`), from config.model; attention_impl None (unset) is the
    default."""
    impl = model_cfg.get("attention_impl")
    impl = attention.DEFAULT if impl is None else impl
    if impl not in attention.IMPLEMENTATIONS:
        raise ValueError(f"model.attention_impl={impl!r}; allowed: "
                         f"{list(attention.IMPLEMENTATIONS)}.")
    return dict(dot_general=lax.dot_general, attention_fn=attention.IMPLEMENTATIONS[impl],
                activation=activations.gelu)


def _common_kwargs(model_cfg) -> dict:
    """Options every backbone shares, validated with the config field names."""
    rate = model_cfg.get("drop_path_rate", 0.0)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"model.drop_path_rate={rate!r} must be in [0, 1).")
    return dict(
        drop_path_rate=rate, remat=remat_lib.policy_name(model_cfg.get("remat", False)) or False,
        dtype=dtype_from_name(model_cfg.get("dtype", "float32"), "model.dtype"),
        param_dtype=dtype_from_name(model_cfg.get("param_dtype", "float32"), "model.param_dtype"),
        **layer_functions(model_cfg))


def vit_from_config(model_cfg, image_size: int, channels: int, **extra) -> vit.ViT:
    """A ViT from config.model (variant + overrides); `extra` are objective-specific options."""
    arch = vit.resolve_vit_config(
        model_cfg.variant, image_size, channels,
        **{k: model_cfg.get(k) for k in ("patch_size", "width", "depth", "num_heads", "mlp_dim")})
    qkv_bias = model_cfg.get("qkv_bias", "qkv")
    if qkv_bias not in _QKV_BIAS:
        raise ValueError(f"model.qkv_bias={qkv_bias!r}; allowed: {list(_QKV_BIAS)}.")
    options = dict(pos_embed=model_cfg.get("pos_embed", "sincos"),
                   cls_token=model_cfg.get("cls_token", True), qkv_bias=_QKV_BIAS[qkv_bias],
                   layer_scale_init=model_cfg.get("layer_scale_init"),
                   rel_pos_bias=model_cfg.get("rel_pos_bias", "none"),
                   init_style=model_cfg.get("init_style", "xavier"))
    for field, allowed in (("pos_embed", ("sincos", "learned", "none")),
                           ("rel_pos_bias", ("none", "shared", "per_layer")),
                           ("init_style", vit.INIT_STYLES)):
        if options[field] not in allowed:
            raise ValueError(f"model.{field}={options[field]!r}; allowed: {list(allowed)}.")
    options.update(extra)
    return vit.ViT(config=arch, scan=model_cfg.get("scan", False), **_common_kwargs(model_cfg),
                   **options)


def swin_from_config(model_cfg, image_size: int, channels: int, **extra):
    from mim_jax.models import swin
    overrides = {k: model_cfg.get(k) for k in ("patch_size", "embed_dim", "depths", "num_heads",
                                                "window_size", "mlp_ratio")}
    overrides = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                 for k, v in overrides.items()}
    arch = swin.resolve_swin_config(model_cfg.variant, image_size, channels, **overrides)
    return swin.Swin(config=arch, **_common_kwargs(model_cfg), **extra)


def _convnet_arch(model_cfg, image_size: int, resolve, fields, **fixed):
    """Variant + overrides -> resolved config, errors named with their `model.` field."""
    overrides = {k: model_cfg.get(k) for k in fields}
    overrides = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                 for k, v in overrides.items()}
    try:
        arch = resolve(model_cfg.variant, **fixed, **overrides)
    except ValueError as err:  # the message starts with the field name
        raise ValueError(f"model.{err}") from None
    stride = getattr(arch, "stride", 32)
    if image_size % stride:
        raise ValueError(f"data.image_size={image_size} is not a multiple of {stride}, the "
                         f"stride of model.name={model_cfg.get('name')!r}; allowed: multiples "
                         f"of {stride}.")
    return arch


def _convnet_kwargs(model_cfg) -> dict:
    kwargs = _common_kwargs(model_cfg)
    del kwargs["attention_fn"]  # validated but meaningless for ConvNets
    return kwargs


def resnet_from_config(model_cfg, image_size: int, channels: int, **extra):
    """A ResNet ('50', '101', '152', '200' + depths / stem_width / widths / stem_stride
    overrides; stem_stride 1 or 2 for a total stride of 8 or 16 instead of 32)."""
    from mim_jax.models import resnet
    arch = _convnet_arch(model_cfg, image_size, resnet.resolve_resnet_config,
                         ("depths", "stem_width", "widths", "stem_stride"), channels=channels)
    kwargs = _convnet_kwargs(model_cfg)
    del kwargs["dot_general"], kwargs["activation"]  # convolutions and the references' ReLU
    return resnet.ResNet(config=arch, **kwargs, **extra)


def convnext_from_config(model_cfg, image_size: int, channels: int, **extra):
    """A ConvNeXt ('T', 'S', 'B', 'L' + depths / dims overrides)."""
    from mim_jax.models import convnext
    arch = _convnet_arch(model_cfg, image_size, convnext.resolve_convnext_config,
                         ("depths", "dims"), channels=channels)
    return convnext.ConvNeXt(config=arch, **_convnet_kwargs(model_cfg), **extra)


def multiway_from_config(model_cfg, image_size: int, channels: int,
                         vocab_size: Optional[int] = None, **extra):
    """BEiT-3's MultiwayEncoder: a multiway.PRESETS `variant` plus overrides, on the data's
    images. The text vocabulary is `vocab_size` (a BEiT-3 objective's) or model.vocab_size;
    the text embedding is part of the encoder's parameters either way. `extra`: MultiwayEncoder
    options (final_norm)."""
    from mim_jax.models import multiway
    values = {k: model_cfg.get(k, v) for k, v in MULTIWAY_DEFAULTS.items()}
    if values["variant"] not in multiway.PRESETS:
        raise ValueError(f"model.variant={values['variant']!r}; allowed: "
                         f"{sorted(multiway.PRESETS)}.")
    given = values["vocab_size"]
    if vocab_size is None and given is None:
        raise ValueError("model.vocab_size is unset: the Multiway encoder's text embedding "
                         "needs the text vocabulary size (a BEiT-3 run's "
                         "objective.text.vocab_size).")
    if vocab_size is not None and given is not None and given != vocab_size:
        raise ValueError(f"model.vocab_size={given!r} but the text vocabulary has {vocab_size} "
                         "ids (objective.text.vocab_size): they must match, or leave "
                         "model.vocab_size unset.")
    sizes = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "multiway_attention",
             "vl_ffn_layers", "sub_ln", "max_text_positions", "layer_norm_eps")
    overrides = {k: values[k] for k in sizes if values[k] is not None}
    try:
        arch = multiway.preset(values["variant"], image_size=image_size, channels=channels,
                               vocab_size=given if vocab_size is None else vocab_size,
                               **overrides)
    except ValueError as err:  # the message starts with the field name
        raise ValueError(f"model.{err}") from None
    if values["init_style"] not in multiway.INIT_STYLES:
        raise ValueError(f"model.init_style={values['init_style']!r}; allowed: "
                         f"{list(multiway.INIT_STYLES)}.")
    return multiway.MultiwayEncoder(config=arch, init_style=values["init_style"],
                                    **_common_kwargs(model_cfg), **extra)


def backbone_from_config(model_cfg, image_size: int, channels: int, **extra):
    """The encoder config.model names (model.name, one of BACKBONES); `extra` are options of
    that backbone (a Multiway encoder's vocab_size among them)."""
    name = model_cfg.get("name", "vit")
    if name == "multiway":
        return multiway_from_config(model_cfg, image_size, channels, **extra)
    if name == "resnet":
        return resnet_from_config(model_cfg, image_size, channels, **extra)
    if name == "convnext":
        return convnext_from_config(model_cfg, image_size, channels, **extra)
    if name == "vit":
        return vit_from_config(model_cfg, image_size, channels, **extra)
    if name == "swin":
        return swin_from_config(model_cfg, image_size, channels, **extra)
    raise ValueError(f"model.name={name!r} is not a known backbone; allowed: {list(BACKBONES)}.")
