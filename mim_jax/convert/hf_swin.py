"""Hugging Face transformers Swin checkpoints (SwinForMaskedImageModeling, SwinModel) <->
mim_jax Swin parameters (+ the SimMIM head).

Key names are those of transformers 5.x (`swin.encoder.layers.I.blocks.J.attention.q_proj`,
`...attention.relative_position_bias.relative_position_bias_table`, `...mlp.fc1`). Checkpoints
saved by 4.x (most Hub files, e.g. microsoft/swin-base-simmim-window6-192) use
`attention.self.{query,key,value}`, `attention.self.relative_position_bias_table`,
`attention.output.dense`, `intermediate.dense` and `output.dense`; transformers renames those
on load and so do we. 4.x files also store the `relative_position_index` buffers; they are not
imported (ours are computed) but must equal ours, which catches a wrong window size.

Our tree is the SimMIM objective's: {'encoder': Swin params, 'decoder': {'kernel': (1, 1,
C_final, stride**2 * channels), 'bias': (stride**2 * channels,)}}, the decoder being the SimMIM
head's 1x1 conv (`decoder.0`) as a flax nn.Conv. Its output channels keep torch's PixelShuffle
order: channel c * r * r + i * r + j becomes pixel (h * r + i, w * r + j) of image channel c
(r = stride).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import numpy as np

from mim_jax.convert import common
from mim_jax.models import swin

WHAT = "Hugging Face Swin"

# 4.x -> 5.x names, applied in order ("attention.output.dense" before "output.dense", which in
# 4.x is the second MLP layer).
_LEGACY_RENAMES = tuple((re.compile(old), new) for old, new in (
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.relative_position_(bias_table|index)$",
     r".attention.relative_position_bias.relative_position_\1"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
))
_INDEX_RE = re.compile(
    r"^(?P<prefix>.*)encoder\.layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\."
    r"attention\.relative_position_bias\.relative_position_index$")


def _no_bias_linear(key: str) -> common.Plan:
    return {"kernel": common.Leaf((key,), lambda w: w.T, lambda k: (k.T,))}


def encoder_plan(config: swin.SwinConfig, *, patch_embed: str, patch_norm: str,
                 mask_token: Optional[str], layers: str, norm: str,
                 block: Callable[[str, int], common.Plan]) -> common.Plan:
    """Our Swin tree, given a layout's names: of the patch embedding and its norm, the mask
    token (None: none), the stage list (`{layers}{i}.blocks.{j}.`, `{layers}{i}.downsample.`,
    as in both the HF and the official layout), the final norm, and `block(prefix, heads)`,
    one block's plan (with its attn/relative_position_bias_table)."""
    plan: common.Plan = {"patch_embed": common.patch_conv(patch_embed),
                         "patch_norm": common.layernorm(patch_norm)}
    if mask_token:
        plan["mask_token"] = common.tensor(mask_token)
    for i, depth in enumerate(config.depths):
        stage = {f"block_{j}": block(f"{layers}{i}.blocks.{j}.", config.num_heads[i])
                 for j in range(depth)}
        if i < config.num_stages - 1:
            stage["downsample"] = {"norm": common.layernorm(f"{layers}{i}.downsample.norm"),
                                   "reduction": _no_bias_linear(
                                       f"{layers}{i}.downsample.reduction.weight")}
        plan[f"stage_{i}"] = stage
    plan["norm"] = common.layernorm(norm)
    return plan


def _hf_block(p: str, heads: int) -> common.Plan:
    attn = f"{p}attention."
    block = common.block(
        norm1=f"{p}layernorm_before",
        qkv=common.qkv_separate(f"{attn}q_proj", f"{attn}k_proj", f"{attn}v_proj", heads),
        proj=f"{attn}o_proj", norm2=f"{p}layernorm_after", fc1=f"{p}mlp.fc1",
        fc2=f"{p}mlp.fc2", num_heads=heads)
    block["attn"]["relative_position_bias_table"] = common.tensor(
        f"{attn}relative_position_bias.relative_position_bias_table")
    return block


def _encoder_plan(config: swin.SwinConfig, prefix: str, mask_token: bool) -> common.Plan:
    emb = f"{prefix}embeddings."
    return encoder_plan(config, patch_embed=f"{emb}patch_embeddings.projection",
                        patch_norm=f"{emb}norm", mask_token=f"{emb}mask_token" if mask_token
                        else None, layers=f"{prefix}encoder.layers.",
                        norm=f"{prefix}layernorm", block=_hf_block)


def decoder_plan() -> common.Plan:
    """SimMIM head: Conv2d(C, r*r*3, 1) weight (out, C, 1, 1) -> flax Conv kernel (1, 1, C, out)."""
    return common.patch_conv("decoder.0")


def _check_index_buffers(state: Dict[str, Any], origin: Dict[str, str], config: swin.SwinConfig,
                         prefix: str) -> None:
    """Stored relative_position_index buffers must equal ours; they are then dropped."""
    for key in [k for k in state if _INDEX_RE.match(k)]:
        m = _INDEX_RE.match(key)
        stage, block = int(m["stage"]), int(m["block"])
        if (m["prefix"] != prefix or stage >= config.num_stages
                or block >= config.depths[stage]):
            continue  # not one of ours: left in place for the strict key check to report
        window = config.stage_window(stage)
        ours = swin.relative_position_index(window).reshape(-1)
        theirs = np.asarray(common.to_numpy(state.pop(key))).reshape(-1)
        if theirs.shape != ours.shape or not np.array_equal(theirs, ours):
            raise ValueError(
                f"{origin[key]} (shape {theirs.shape}) differs from the relative position index "
                f"of a {window}x{window} window (shape {ours.shape}); check "
                f"config.window_size={config.window_size}.")


def _check_shapes(params: dict, config: swin.SwinConfig, mask_token: bool) -> None:
    model = swin.Swin(config, use_mask_token=mask_token)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                                  np.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
        node = params
        for entry in path:
            node = node[entry.key]
        if node.shape != leaf.shape:
            bad.append(f"{'/'.join(e.key for e in path)}: checkpoint {node.shape}, "
                       f"config {leaf.shape}")
    if bad:
        raise ValueError(f"{WHAT} state dict does not fit config={config}: " + "; ".join(bad))


def config_from_hf(hf_config) -> swin.SwinConfig:
    """A transformers SwinConfig (or its to_dict()) -> our SwinConfig; features we do not
    implement (absolute position embeddings, non-square inputs, another activation, no qkv
    bias) raise ValueError instead of converting to a different network."""
    get = hf_config.get if isinstance(hf_config, Mapping) else \
        lambda name, default=None: getattr(hf_config, name, default)
    unsupported = dict(use_absolute_embeddings=(get("use_absolute_embeddings", False), False),
                       hidden_act=(get("hidden_act", "gelu"), "gelu"),
                       qkv_bias=(get("qkv_bias", True), True))
    for name, (value, allowed) in unsupported.items():
        if value != allowed:
            raise ValueError(f"HF config {name}={value!r} is not supported; allowed: {allowed!r}.")
    sizes = {}
    for name in ("image_size", "patch_size"):
        value = get(name)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"HF config {name}={value!r}: only square sizes are supported.")
            value = value[0]
        sizes[name] = value
    return swin.SwinConfig(
        image_size=sizes["image_size"], patch_size=sizes["patch_size"],
        embed_dim=get("embed_dim"), depths=tuple(get("depths")),
        num_heads=tuple(get("num_heads")), window_size=get("window_size"),
        mlp_ratio=float(get("mlp_ratio", 4.0)), channels=get("num_channels", 3),
        layer_norm_eps=get("layer_norm_eps", swin.LAYER_NORM_EPS))


def swin_params_from_hf(state_dict: Mapping[str, Any], *, config: swin.SwinConfig,
                        prefix: Optional[str] = None, strict: bool = True) -> dict:
    """SwinForMaskedImageModeling (or bare SwinModel) state dict -> {'encoder', 'decoder'}.

    Values may be torch tensors or numpy arrays; the result is float32 numpy. `prefix` is the
    encoder's key prefix: 'swin.' for SwinForMaskedImageModeling, '' for a bare SwinModel;
    None picks 'swin.' when such keys exist. The encoder gets 'mask_token' only if the
    checkpoint has one (build Swin with use_mask_token accordingly); 'decoder' is present only
    with `decoder.*` keys. Head counts and window size are not stored in checkpoints, so they
    come from `config` (HF config: num_heads, window_size) and every shape is checked against
    it. Missing keys raise ValueError; unexpected ones too unless strict=False.
    """
    state, origin = common.rename_keys(state_dict, _LEGACY_RENAMES)
    if prefix is None:
        prefix = "swin." if any(k.startswith("swin.") for k in state) else ""
    mask_token = f"{prefix}embeddings.mask_token" in state
    plan = {"encoder": _encoder_plan(config, prefix, mask_token)}
    if any(k.startswith("decoder.") for k in state):
        plan["decoder"] = decoder_plan()
    _check_index_buffers(state, origin, config, prefix)
    common.check_keys(state, common.plan_keys(plan), strict, WHAT)
    params = common.load(plan, state)
    _check_shapes(params["encoder"], config, mask_token)
    if "decoder" in params:
        want = (1, 1, config.num_features, config.stride**2 * config.channels)
        got = params["decoder"]["kernel"].shape
        if got != want or params["decoder"]["bias"].shape != want[3:]:
            raise ValueError(
                f"decoder.0 has kernel {got[:2]} mapping {got[2]} -> {got[3]} channels; config "
                f"needs 1x1 from {want[2]} -> {want[3]} (num_features -> stride**2 * channels "
                f"with stride {config.stride}; the HF config's encoder_stride must equal it).")
    return params


def swin_params_to_hf(params: Mapping, *, config: swin.SwinConfig,
                      prefix: str = "swin.") -> Dict[str, np.ndarray]:
    """Our {'encoder'[, 'decoder']} tree -> transformers 5.x state dict (prefix '' for a bare
    SwinModel), loadable with load_state_dict(strict=True); index buffers are not written
    (transformers recomputes them)."""
    encoder = params["encoder"]
    plan = {"encoder": _encoder_plan(config, prefix, "mask_token" in encoder)}
    if "decoder" in params:
        plan["decoder"] = decoder_plan()
    return common.dump(plan, params, WHAT)
