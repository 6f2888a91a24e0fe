"""timm ResNet (`resnet50`, ...) and ConvNeXt (`convnext_tiny`, ...) state dicts <-> mim_jax
variables, both ways.

SparK releases its pretrained encoders in timm's layout ("timm style"), and timm is where
fine-tuned ConvNets come from, so this is the one ConvNet layout we read and write.

Our side is a variables dict {'params': {'encoder': ..., [heads]}, 'batch_stats': {'encoder':
...}} ('batch_stats' for ResNet only): the tree of classifier.Classifier around our ResNet /
ConvNeXt. A classification head in the checkpoint becomes the Classifier's parts: ResNet's
`fc` -> 'head'; ConvNeXt's `head.norm` (LayerNorm after pooling, present even in headless
timm models) -> 'fc_norm' and `head.fc` -> 'head'. Depths and widths come from `config`
(checkpoints do not store them); every key is checked against it (missing always raises,
unexpected raises when strict) and every converted shape against the model's, all problems
listed in one ValueError.

BatchNorm's `num_batches_tracked` counters are accepted and dropped on import (with momentum
set, torch does not use them) and written as 0 on export so load_state_dict(strict=True) works.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Union

import jax
import numpy as np

from mim_jax.convert import common
from mim_jax.models import convnext, resnet

Config = Union[resnet.ResNetConfig, convnext.ConvNeXtConfig]


def _conv(prefix: str, bias: bool) -> common.Plan:
    """torch Conv2d weight (O, I/groups, kh, kw) -> flax kernel (kh, kw, I/groups, O);
    depthwise convs need nothing special: their (C, 1, k, k) becomes (k, k, 1, C)."""
    plan = {"kernel": common.Leaf((f"{prefix}.weight",), lambda w: w.transpose(2, 3, 1, 0),
                                  lambda k: (k.transpose(3, 2, 0, 1),))}
    if bias:
        plan["bias"] = common.tensor(f"{prefix}.bias")
    return plan


def _bn(prefix: str, params: dict, stats: dict, name: str) -> None:
    params[name] = {"scale": common.tensor(f"{prefix}.weight"),
                    "bias": common.tensor(f"{prefix}.bias")}
    stats[name] = {"mean": common.tensor(f"{prefix}.running_mean"),
                   "var": common.tensor(f"{prefix}.running_var")}


def _resnet_plan(config: resnet.ResNetConfig, head: bool) -> common.Plan:
    params: dict = {"stem_conv": _conv("conv1", False)}
    stats: dict = {}
    _bn("bn1", params, stats, "stem_bn")
    in_width = config.stem_width
    for i, (depth, width) in enumerate(zip(config.depths, config.widths)):
        p_stage, s_stage = params.setdefault(f"stage_{i}", {}), stats.setdefault(f"stage_{i}", {})
        for j in range(depth):
            key, p_block, s_block = f"layer{i + 1}.{j}.", {}, {}
            for n in (1, 2, 3):
                p_block[f"conv{n}"] = _conv(f"{key}conv{n}", False)
                _bn(f"{key}bn{n}", p_block, s_block, f"bn{n}")
            if j == 0 and (i > 0 or in_width != resnet.EXPANSION * width):
                p_block["downsample_conv"] = _conv(f"{key}downsample.0", False)
                _bn(f"{key}downsample.1", p_block, s_block, "downsample_bn")
            p_stage[f"block_{j}"], s_stage[f"block_{j}"] = p_block, s_block
        in_width = resnet.EXPANSION * width
    plan: dict = {"params": {"encoder": params}, "batch_stats": {"encoder": stats}}
    if head:
        plan["params"]["head"] = common.linear("fc")
    return plan


def _convnext_plan(config: convnext.ConvNeXtConfig, head: bool) -> common.Plan:
    params: dict = {"stem_conv": _conv("stem.0", True), "stem_norm": common.layernorm("stem.1")}
    for i, depth in enumerate(config.depths):
        key, stage = f"stages.{i}.", {}
        if i > 0:
            stage["downsample_norm"] = common.layernorm(f"{key}downsample.0")
            stage["downsample_conv"] = _conv(f"{key}downsample.1", True)
        for j in range(depth):
            b = f"{key}blocks.{j}."
            stage[f"block_{j}"] = {"dwconv": _conv(f"{b}conv_dw", True),
                                   "norm": common.layernorm(f"{b}norm"),
                                   "fc1": common.linear(f"{b}mlp.fc1"),
                                   "fc2": common.linear(f"{b}mlp.fc2"),
                                   "gamma": common.tensor(f"{b}gamma")}
        params[f"stage_{i}"] = stage
    plan: dict = {"params": {"encoder": params, "fc_norm": common.layernorm("head.norm")}}
    if head:
        plan["params"]["head"] = common.linear("head.fc")
    return plan


def _model(config: Config):
    if isinstance(config, resnet.ResNetConfig):
        return resnet.ResNet(config), "timm ResNet", "fc.weight", _resnet_plan
    if isinstance(config, convnext.ConvNeXtConfig):
        return convnext.ConvNeXt(config), "timm ConvNeXt", "head.fc.weight", _convnext_plan
    raise ValueError(f"config={config!r}; allowed: a resnet.ResNetConfig or a "
                     f"convnext.ConvNeXtConfig.")


def _first_dim(state: Mapping[str, Any], key: str) -> int:
    if key not in state:
        raise ValueError(f"timm state dict has no {key}.")
    return int(np.shape(state[key])[0])


def config_of_state(state: Mapping[str, Any], like: Config) -> Config:
    """`like` with the depths and widths a timm ResNet / ConvNeXt state dict has (what the
    weights do not say, such as a ResNet's stem stride, stays as in `like`)."""
    if isinstance(like, resnet.ResNetConfig):
        depths = [common.layer_depth(state, f"layer{i + 1}.") for i in range(4)]
        return dataclasses.replace(
            like, depths=tuple(depths), stem_width=_first_dim(state, "conv1.weight"),
            widths=tuple(_first_dim(state, f"layer{i + 1}.0.conv1.weight") for i in range(4)),
            channels=int(np.shape(state["conv1.weight"])[1]))
    if isinstance(like, convnext.ConvNeXtConfig):
        depths = [common.layer_depth(state, f"stages.{i}.blocks.") for i in range(4)]
        return dataclasses.replace(
            like, depths=tuple(depths),
            dims=tuple(_first_dim(state, f"stages.{i}.blocks.0.conv_dw.weight")
                       for i in range(4)),
            channels=int(np.shape(state["stem.0.weight"])[1]))
    raise ValueError(f"like={like!r}; allowed: a resnet.ResNetConfig or a "
                     f"convnext.ConvNeXtConfig.")


def _expected(config: Config, head_shape) -> Dict:
    """Path -> shape of everything the plan produces, from the model's abstract init."""
    model = _model(config)[0]
    images = jax.ShapeDtypeStruct((1, 32, 32, config.channels), np.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    expected = common.expected_shapes({name: {"encoder": variables[name]} for name in variables})
    width = config.stage_widths[-1]
    if isinstance(config, convnext.ConvNeXtConfig):
        expected[("params", "fc_norm", "scale")] = expected[("params", "fc_norm", "bias")] = (
            width,)
    if head_shape is not None:  # classes from the checkpoint, input width from the config
        expected[("params", "head", "kernel")] = (width, head_shape[0])
        expected[("params", "head", "bias")] = (head_shape[0],)
    return expected


def _counters(plan: common.Plan):
    """num_batches_tracked key of every BatchNorm in the plan."""
    return [k.replace(".running_mean", ".num_batches_tracked")
            for k in common.plan_keys(plan) if k.endswith(".running_mean")]


def convnet_variables_from_timm(state_dict: Mapping[str, Any], *, config: Config,
                        strict: bool = True) -> dict:
    """timm ResNet / ConvNeXt state dict -> {'params': {'encoder', [fc_norm], [head]},
    ['batch_stats': {'encoder'}]} as float32 numpy, for the architecture in `config`
    (resnet.ResNetConfig or convnext.ConvNeXtConfig). A head is imported when present."""
    _, what, head_key, make_plan = _model(config)
    plan = make_plan(config, head_key in state_dict)
    state = {k: v for k, v in state_dict.items() if k not in set(_counters(plan))}
    common.check_keys(state, common.plan_keys(plan), strict, what)
    head_shape = np.shape(state[head_key]) if head_key in state else None
    return common.load(plan, state, expected=_expected(config, head_shape), what=what,
                       target=f"config {config}")


def convnet_variables_to_timm(variables: Mapping, *, config: Config) -> Dict[str, np.ndarray]:
    """Our variables (as returned by convnet_variables_from_timm; a ConvNeXt without 'fc_norm' gets
    timm's initial head norm, ones and zeros) -> timm state dict for load_state_dict(strict=
    True) into the same timm architecture (num_classes=0 when there is no 'head')."""
    _, what, _, make_plan = _model(config)
    params = dict(variables["params"])
    if isinstance(config, convnext.ConvNeXtConfig) and "fc_norm" not in params:
        width = config.dims[-1]
        params["fc_norm"] = {"scale": np.ones(width, np.float32),
                             "bias": np.zeros(width, np.float32)}
    tree = {"params": params}
    if "batch_stats" in variables:
        tree["batch_stats"] = variables["batch_stats"]
    plan = make_plan(config, "head" in params)
    out = common.dump(plan, tree, what)
    for key in _counters(plan):
        out[key] = np.zeros((), np.int64)
    return out
