"""torchscale 0.3.0 `BEiT3` state dicts <-> mim_jax MultiwayEncoder parameters
(mim_jax.models.multiway), in both directions from one plan.

Two layouts hold the same tensors:
* torchscale's: `BEiT3(args).state_dict()`: `text_embed.weight`, `vision_embed.{proj, cls_token,
  mask_token}`, `encoder.embed_positions.{A, B}.weight` (vision, text position tables),
  `encoder.layers.N.{self_attn.{q,k,v,out}_proj, self_attn.inner_attn_ln,
  self_attn_layer_norm, final_layer_norm, ffn.{fc1, ffn_layernorm, fc2}}.{A, B}` and
  `encoder.layer_norm.{A, B}`; A is the vision copy, B the text one.
* unilm's released BEiT-3 files: the same keys under a top-level 'model', each prefixed
  'beit3.' (BEiT3Wrapper's attribute); a fine-tuned file's heads sit beside them.

torchscale's BEiT3 always decouples attention per modality (multiway=True) and has no
vision-language FFN, so our multiway_attention=False and vl_ffn_layers > 0 have no counterpart.
Sub-LN (torchscale's subln, the default) is read from the presence of `inner_attn_ln`. Only the
encoder is converted: build BEiT3 with no_output_layer=True (as unilm does), or pass
strict=False to skip `encoder.output_projection`. Checkpoints do not store num_heads (12 for
base, 16 for large) nor layernorm_eps (1e-5 in the released configs).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.convert import common, hf_vit
from mim_jax.models import multiway

NAME = "torchscale BEiT3"
RELEASED_PREFIX = "beit3."
_LAYERS = "encoder.layers."
_COPIES = {"vision": "A", "text": "B"}  # MultiwayNetwork's A / B


@dataclasses.dataclass(frozen=True)
class Features:
    depth: int
    num_heads: int
    sub_ln: bool


def _per_modality(build) -> common.Plan:
    return {ours: build(theirs) for ours, theirs in _COPIES.items()}


def _layer(p: str, f: Features) -> common.Plan:
    attn = f"{p}self_attn."
    plan: common.Plan = {
        "attn_norm": _per_modality(lambda c: common.layernorm(f"{p}self_attn_layer_norm.{c}")),
        "attn": {
            "qkv": _per_modality(lambda c: common.qkv_separate(
                f"{attn}q_proj.{c}", f"{attn}k_proj.{c}", f"{attn}v_proj.{c}", f.num_heads)),
            "proj": _per_modality(lambda c: common.linear(f"{attn}out_proj.{c}")),
        },
        "ffn_norm": _per_modality(lambda c: common.layernorm(f"{p}final_layer_norm.{c}")),
        "ffn": _per_modality(lambda c: {"fc1": common.linear(f"{p}ffn.{c}.fc1"),
                                        "fc2": common.linear(f"{p}ffn.{c}.fc2")}),
    }
    if f.sub_ln:
        plan["attn"]["inner_norm"] = _per_modality(
            lambda c: common.layernorm(f"{attn}inner_attn_ln.{c}"))
        for c, ffn in zip(_COPIES.values(), plan["ffn"].values()):
            ffn["norm"] = common.layernorm(f"{p}ffn.{c}.ffn_layernorm")
    return plan


def layout_plan(f: Features) -> common.Plan:
    """The plan of torchscale's BEiT3 keys (no prefix)."""
    plan: common.Plan = {
        "patch_embed": common.patch_conv("vision_embed.proj"),
        "cls_token": common.tensor("vision_embed.cls_token"),
        "mask_token": common.tensor("vision_embed.mask_token"),
        "vision_pos_embed": common.tensor("encoder.embed_positions.A.weight"),
        "text_embed": common.tensor("text_embed.weight"),
        "text_pos_embed": common.tensor("encoder.embed_positions.B.weight"),
        "norm": _per_modality(lambda c: common.layernorm(f"encoder.layer_norm.{c}")),
    }
    plan.update({f"layer_{i}": _layer(f"{_LAYERS}{i}.", f) for i in range(f.depth)})
    return plan


def _unwrap(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """A released file ({'model': {'beit3.…': …}}) or a bare BEiT3 state dict -> BEiT3 keys;
    keys outside 'beit3.' (a fine-tuned file's heads) stay as they are."""
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    if any(k.startswith(RELEASED_PREFIX) for k in state_dict):
        return {k[len(RELEASED_PREFIX):] if k.startswith(RELEASED_PREFIX) else k: v
                for k, v in state_dict.items()}
    return dict(state_dict)


def _shape(state, key) -> tuple:
    if key not in state:
        raise ValueError(f"{NAME} state dict has no {key!r}; expected a BEiT3 encoder (keys "
                         f"'vision_embed.*', 'text_embed.*', 'encoder.*', optionally under "
                         f"'model' with the prefix {RELEASED_PREFIX!r}).")
    return tuple(np.shape(state[key]))


def config_from_torchscale(state_dict: Mapping[str, Any], *, num_heads: int,
                           layer_norm_eps: float = 1e-5) -> multiway.MultiwayConfig:
    """The MultiwayConfig a BEiT3 state dict (either layout) implies: width, patch size and
    channels from the patch conv, image size from the vision position table, vocabulary and
    text positions from theirs, depth from the layer indices, FFN width from most layers'
    fc1, Sub-LN from `inner_attn_ln`."""
    num_heads = hf_vit.check_heads(num_heads)
    state = _unwrap(state_dict)
    return _implied_config(state, num_heads, layer_norm_eps)


def _implied_config(state, num_heads, layer_norm_eps) -> multiway.MultiwayConfig:
    width, channels, patch, _ = _shape(state, "vision_embed.proj.weight")
    rows = _shape(state, "encoder.embed_positions.A.weight")[0]
    grid = math.isqrt(max(rows - multiway.POSITION_OFFSET - 1, 0))
    if grid < 1 or grid ** 2 + multiway.POSITION_OFFSET + 1 != rows:
        raise ValueError(f"encoder.embed_positions.A.weight has {rows} rows; expected "
                         f"grid**2 + 3 (a square patch grid, the CLS token and 2 unused rows).")
    depth = hf_vit.layer_count(state, _LAYERS, NAME)
    fc1 = [_shape(state, k)[0] for k in state
           if k.startswith(_LAYERS) and k.endswith(".ffn.A.fc1.weight")]
    if not fc1:
        raise ValueError(f"{NAME} state dict has no '{_LAYERS}<i>.ffn.A.fc1.weight'.")
    if width % num_heads:
        raise ValueError(f"the checkpoint's width {width} is not divisible by "
                         f"num_heads={num_heads}.")
    return multiway.check_config(multiway.MultiwayConfig(
        width=int(width), depth=depth, num_heads=num_heads,
        mlp_dim=int(collections.Counter(fc1).most_common(1)[0][0]), patch_size=int(patch),
        image_size=grid * int(patch), channels=int(channels),
        vocab_size=int(_shape(state, "text_embed.weight")[0]),
        max_text_positions=int(_shape(state, "encoder.embed_positions.B.weight")[0]),
        sub_ln=any(k.startswith(_LAYERS) and ".self_attn.inner_attn_ln." in k for k in state),
        layer_norm_eps=layer_norm_eps))


def expected_params(config: multiway.MultiwayConfig):
    """Our parameter tree's shapes for a config (jax.eval_shape; no computation)."""
    model = multiway.MultiwayEncoder(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                                  jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def beit3_params_from_torchscale(state_dict: Mapping[str, Any], *, num_heads: int,
                                 strict: bool = True, expected: Optional[Mapping] = None,
                                 ) -> dict:
    """A torchscale BEiT3 state dict, or a released unilm file ('model' / 'beit3.' keys) ->
    MultiwayEncoder params (float32 numpy; multiway_attention=True, vl_ffn_layers=0).

    Missing keys raise ValueError; unexpected ones too unless strict=False (a fine-tuned
    file's heads). Every tensor's shape is checked against `expected` (our parameter tree or
    its jax.eval_shape, e.g. expected_params(config)) when given, else against the model the
    checkpoint's own sizes imply (config_from_torchscale); all mismatches are listed in one
    ValueError."""
    num_heads = hf_vit.check_heads(num_heads)
    state = _unwrap(state_dict)
    depth = hf_vit.layer_count(state, _LAYERS, NAME)
    sub_ln = any(k.startswith(_LAYERS) and ".self_attn.inner_attn_ln." in k for k in state)
    plan = layout_plan(Features(depth=depth, num_heads=num_heads, sub_ln=sub_ln))
    common.check_keys(state, common.plan_keys(plan), strict, NAME)
    if expected is None:
        cfg = _implied_config(state, num_heads, 1e-5)
        expected = expected_params(cfg)
        target = (f"a MultiwayEncoder of width {cfg.width}, depth {cfg.depth}, FFN "
                  f"{cfg.mlp_dim}, patch {cfg.patch_size}, image {cfg.image_size}, vocabulary "
                  f"{cfg.vocab_size} (the sizes this checkpoint implies)")
    else:
        target = "the target model"
    return common.load(plan, state, expected=common.expected_shapes(expected),
                       what=f"{NAME} state dict", target=target)


def _features(params: Mapping) -> Features:
    layer = params.get("layer_0")
    if not isinstance(layer, Mapping):
        raise ValueError(f"expected MultiwayEncoder parameters with layer_0, layer_1, …; got "
                         f"top-level keys {sorted(params)}.")
    if "scale" in layer["attn_norm"]:
        raise ValueError(f"multiway_attention=False (shared attention) has no {NAME} "
                         f"counterpart: torchscale decouples attention per modality.")
    depth = sum(k.startswith("layer_") for k in params)
    vl = [name for name, layer in params.items()
          if name.startswith("layer_") and "vl" in layer["ffn"]]
    if vl:
        raise ValueError(f"vl_ffn_layers > 0 has no {NAME} counterpart (no vision-language "
                         f"FFN); the parameters have one in {vl}.")
    heads = int(np.shape(layer["attn"]["qkv"]["vision"]["kernel"])[2])  # (D, 3, H, Dh)
    return Features(depth=depth, num_heads=heads, sub_ln="inner_norm" in layer["attn"])


def beit3_params_to_torchscale(params: Mapping, *, released: bool = False) -> dict:
    """MultiwayEncoder params -> a state dict that torchscale's BEiT3 (multiway=True,
    no_output_layer=True, subln as the params have it) loads with strict=True; with
    released=True, unilm's file layout {'model': {'beit3.<key>': …}} instead. float32 numpy."""
    out = common.dump(layout_plan(_features(params)), params, NAME)
    if released:
        return {"model": {RELEASED_PREFIX + k: v for k, v in out.items()}}
    return out


def torchscale_encoder_config(config: multiway.MultiwayConfig) -> dict:
    """The keyword arguments of torchscale's EncoderConfig for the BEiT3 matching `config`
    (as unilm's _get_base_config builds them), for `BEiT3(EncoderConfig(**kwargs))`."""
    if not config.multiway_attention or config.vl_ffn_layers:
        raise ValueError(f"multiway_attention={config.multiway_attention}, vl_ffn_layers="
                         f"{config.vl_ffn_layers}: torchscale's BEiT3 needs True and 0.")
    return dict(
        img_size=config.image_size, patch_size=config.patch_size, in_chans=config.channels,
        vocab_size=config.vocab_size, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, encoder_embed_dim=config.width,
        encoder_attention_heads=config.num_heads, encoder_ffn_embed_dim=config.mlp_dim,
        encoder_layers=config.depth, subln=config.sub_ln, layernorm_eps=config.layer_norm_eps,
        max_source_positions=config.max_text_positions)
