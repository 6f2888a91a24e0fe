"""Official microsoft/SimMIM checkpoints <-> the mim_jax SimMIM objective's parameters
{'encoder'[, 'decoder']}.

The pretraining script saves SimMIM(encoder, decoder) under a top-level 'model' key: the
encoder's keys start with `encoder.` and the head is `decoder.0`, a Conv2d(num_features,
stride**2 * 3, 1) before a PixelShuffle (our flax 1x1 Conv, output channels in PixelShuffle
order; see hf_swin.py). Two encoders occur:

* ViT (VisionTransformerForSimMIM): BEiT's layout (official_beit.py) under `encoder.`:
  patch_embed.proj, cls_token, mask_token, optional pos_embed, a shared
  rel_pos_bias.relative_position_bias_table or per-block attn.relative_position_bias_table,
  blocks.N.{norm1, attn.qkv (no bias), attn.q_bias, attn.v_bias, attn.proj, gamma_1, gamma_2,
  norm2, mlp.fc1, mlp.fc2}, norm. Our ViT with cls_token=True, qkv_bias='qv' and the options
  the keys imply (the SimMIM ViT-B recipe: pos_embed='none', rel_pos_bias='shared',
  layer_scale_init set); the head's stride is the patch size.
* Swin (SwinTransformerForSimMIM): patch_embed.{proj, norm}, mask_token,
  layers.I.blocks.J.{norm1, attn.qkv, attn.relative_position_bias_table, attn.proj, norm2,
  mlp.fc1, mlp.fc2}, layers.I.downsample.{norm, reduction}, norm. Head counts, window and
  image size are not parameters: they come from a SwinConfig (swin_config_from_official reads
  them from the tables and buffers of a file).

The reference registers buffers that travel in its state dicts: relative_position_index
(int64) in every attention and, in the Swin blocks that shift their windows, attn_mask
(float32, -100 between tokens of different shift regions). They are checked against ours on
import, which catches a wrong window or image size, and written on export, so the reference
modules' load_state_dict(strict=True) takes the exported dict.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.convert import common, hf_beit, hf_swin, hf_vit, official_beit
from mim_jax.models import swin

NAME = "official SimMIM"
ENCODER = "encoder."
_SWIN_BUFFER = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\."
                          r"(attn\.relative_position_index|attn_mask)$")


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(state_dict.get("model"), Mapping):
        return state_dict["model"]
    return state_dict


def _is_swin(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(f"{ENCODER}layers.") for k in state)


def _has_decoder(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("decoder.") for k in state)


def is_official_simmim(state_dict: Mapping[str, Any]) -> bool:
    """Whether a (possibly 'model'-wrapped) state dict is an official SimMIM file: a ViT or
    Swin patch embedding under `encoder.` with the head `decoder.0`, or such an encoder alone
    (every key under `encoder.`). Other files with an `encoder.` (BEiT v2's VQ-KD tokenizer)
    hold further parts; Hugging Face files name theirs differently."""
    state = _unwrap(state_dict)
    if f"{ENCODER}patch_embed.proj.weight" not in state:
        return False
    return "decoder.0.weight" in state or all(k.startswith(ENCODER) for k in state)


# ---------------------------------------------------------------- ViT

def _vit_from_official(state: Dict[str, Any], num_heads, *, scan: bool, strict: bool,
                       expected: Optional[Mapping]) -> dict:
    num_heads = hf_vit.check_heads(num_heads)
    hf_beit.check_index_buffers(state)
    f = official_beit.encoder_features(state, num_heads, prefix=ENCODER, what=NAME)
    plan = official_beit.layout_plan(f, ENCODER)
    if _has_decoder(state):
        plan["decoder"] = hf_swin.decoder_plan()
    return hf_beit.import_params(state, plan, f, what=NAME, scan=scan, strict=strict,
                                 expected=expected)


def _vit_to_official(params: Mapping) -> Dict[str, np.ndarray]:
    out = official_beit.export({"encoder": params["encoder"]}, prefix=ENCODER, what=NAME)
    if "decoder" in params:
        out.update(common.dump({"decoder": hf_swin.decoder_plan()},
                               {"decoder": params["decoder"]}, NAME))
    return out


# ---------------------------------------------------------------- Swin

def _swin_block(p: str, heads: int) -> common.Plan:
    block = common.block(norm1=f"{p}norm1", qkv=common.qkv_fused(f"{p}attn.qkv", heads),
                         proj=f"{p}attn.proj", norm2=f"{p}norm2", fc1=f"{p}mlp.fc1",
                         fc2=f"{p}mlp.fc2", num_heads=heads)
    block["attn"]["relative_position_bias_table"] = common.tensor(
        f"{p}attn.relative_position_bias_table")
    return block


def _swin_plan(config: swin.SwinConfig, mask_token: bool, decoder: bool) -> common.Plan:
    plan = {"encoder": hf_swin.encoder_plan(
        config, patch_embed=f"{ENCODER}patch_embed.proj",
        patch_norm=f"{ENCODER}patch_embed.norm",
        mask_token=f"{ENCODER}mask_token" if mask_token else None,
        layers=f"{ENCODER}layers.", norm=f"{ENCODER}norm", block=_swin_block)}
    if decoder:
        plan["decoder"] = hf_swin.decoder_plan()
    return plan


def _swin_buffers(config: swin.SwinConfig) -> Dict[str, np.ndarray]:
    """Every buffer the reference encoder registers for `config`: the int64
    relative_position_index of each block and the float32 attn_mask of each shifted one."""
    out = {}
    for i, depth in enumerate(config.depths):
        window, size = config.stage_window(i), config.stage_resolution(i)
        index = swin.relative_position_index(window).astype(np.int64)
        for j in range(depth):
            p = f"{ENCODER}layers.{i}.blocks.{j}."
            out[f"{p}attn.relative_position_index"] = index
            mask = swin.shifted_window_mask(size, window, config.stage_shift(i) if j % 2 else 0)
            if mask is not None:
                out[f"{p}attn_mask"] = mask
    return out


def _describe(config: swin.SwinConfig) -> str:
    return (f"swin_config (image_size={config.image_size}, window_size={config.window_size}, "
            f"depths={config.depths}, num_heads={config.num_heads})")


def _check_swin_buffers(state: Dict[str, Any], config: swin.SwinConfig) -> None:
    """Stored index and attn_mask buffers must be those of `config`; they are then dropped.
    A file that stores its buffers must also hold the attn_mask of every block we shift (a
    stage that fit in one window during pretraining has none, whatever the window size)."""
    ours = _swin_buffers(config)
    bad: Dict[tuple, list] = {}  # (stage, buffer, what is wrong) -> block numbers
    seen = set()
    for key in [k for k in state if _SWIN_BUFFER.match(k)]:
        stage, block, kind = _SWIN_BUFFER.match(key).groups()
        stage, block = int(stage), int(block)
        if stage >= config.num_stages or block >= config.depths[stage]:
            continue  # not one of our blocks: left for the strict key check to report
        theirs, want = common.to_numpy(state.pop(key)), ours.get(key)
        seen.add(key)
        if want is None or theirs.shape != want.shape or not np.array_equal(theirs, want):
            bad.setdefault((stage, kind, "differ"), []).append(block)
    if seen:
        for key in ours:
            if key.endswith("attn_mask") and key not in seen:
                stage, block, kind = _SWIN_BUFFER.match(key).groups()
                bad.setdefault((int(stage), kind, "missing"), []).append(int(block))
    if not bad:
        return
    problems = []
    for (stage, kind, wrong), blocks in sorted(bad.items()):
        names = f"{ENCODER}layers.{stage}.blocks.{{{','.join(map(str, sorted(blocks)))}}}.{kind}"
        window, shift = config.stage_window(stage), config.stage_shift(stage)
        size = config.stage_resolution(stage)
        if kind != "attn_mask":
            problems.append(f"{names} differ from the index of a {window}x{window} window")
        elif shift == 0:
            problems.append(f"{names} stored, but stage {stage} ({size}x{size} tokens, "
                            f"window {window}) does not shift its windows")
        elif wrong == "missing":
            problems.append(f"{names} missing, though stage {stage} ({size}x{size} tokens, "
                            f"window {window}) shifts its windows by {shift}")
        else:
            problems.append(f"{names} differ from the masks of {size}x{size} tokens in "
                            f"{window}x{window} windows shifted by {shift}")
    raise ValueError(f"{NAME} buffers do not fit {_describe(config)}: " + "; ".join(problems)
                     + "; swin_config needs the pretraining run's window_size and image_size.")


def _swin_shapes(config: swin.SwinConfig, mask_token: bool, decoder: bool) -> dict:
    """Our parameter tree for `config` (jax.eval_shape of the real modules): the Swin, plus
    the SimMIM head with `decoder`."""
    from mim_jax.objectives.simmim import SimMIM  # not at import: objectives import converters

    encoder = swin.Swin(config, use_mask_token=mask_token)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels),
                                  jnp.float32)
    token_mask = jax.ShapeDtypeStruct((1, config.num_patches), jnp.bool_) if mask_token else None
    if not decoder:
        return {"encoder": jax.eval_shape(encoder.init, jax.random.key(0), images,
                                          token_mask=token_mask)["params"]}
    model = SimMIM(encoder=encoder, stride=config.stride, channels=config.channels)
    return jax.eval_shape(model.init, jax.random.key(0), images, token_mask)["params"]


def _check_swin_config(config) -> swin.SwinConfig:
    if not isinstance(config, swin.SwinConfig):
        raise ValueError(f"swin_config={config!r} must be a mim_jax.models.swin.SwinConfig "
                         f"(swin_config_from_official reads one from a file).")
    return config


def _swin_from_official(state: Dict[str, Any], config: swin.SwinConfig, *, strict: bool,
                        expected: Optional[Mapping]) -> dict:
    _check_swin_buffers(state, config)
    mask_token, decoder = f"{ENCODER}mask_token" in state, _has_decoder(state)
    plan = _swin_plan(config, mask_token, decoder)
    common.check_keys(state, common.plan_keys(plan), strict, NAME)
    if expected is None:
        target_tree, target = _swin_shapes(config, mask_token, decoder), _describe(config)
    else:
        target_tree = expected if "encoder" in expected else {"encoder": expected}
        target = "the target model"
    return common.load(plan, state, expected=common.expected_shapes(target_tree),
                       what=f"{NAME} state dict", target=target)


def _swin_to_official(params: Mapping, config: swin.SwinConfig) -> Dict[str, np.ndarray]:
    mask_token, decoder = "mask_token" in params["encoder"], "decoder" in params
    out = common.dump(_swin_plan(config, mask_token, decoder), params, NAME)
    want = common.expected_shapes(_swin_shapes(config, mask_token, decoder))
    have = common.expected_shapes(params)
    bad = [f"{'/'.join(path)} {have[path]} (config: {shape})" for path, shape in want.items()
           if path in have and have[path] != shape]
    if bad:
        raise ValueError(f"Swin parameters do not fit {_describe(config)}: " + "; ".join(bad)
                         + ".")
    out.update(_swin_buffers(config))
    return out


def swin_config_from_official(state_dict: Mapping[str, Any]) -> swin.SwinConfig:
    """The SwinConfig of an official SimMIM Swin file, read from its tensors: width, patch and
    channels from the patch embedding, depths from the block keys, head counts and windows
    from the relative position tables, the MLP ratio from the first block, and the image size
    from the attn_mask buffers (or, without any, from the stage whose window is clipped to
    its resolution). The layer-norm eps is the reference's (1e-5)."""
    state = _unwrap(state_dict)
    p = f"{ENCODER}layers."
    shape = lambda key: tuple(np.shape(state[key]))  # noqa: E731
    try:
        width, channels, patch, _ = shape(f"{ENCODER}patch_embed.proj.weight")
        stages = common.layer_depth(state, p)
        if not stages:
            raise KeyError(f"{p}0.*")
        depths = tuple(common.layer_depth(state, f"{p}{i}.blocks.") for i in range(stages))
        tables = [shape(f"{p}{i}.blocks.0.attn.relative_position_bias_table")
                  for i in range(stages)]
        mlp = shape(f"{p}0.blocks.0.mlp.fc1.weight")[0]
    except (KeyError, ValueError) as err:
        raise ValueError(f"{NAME} state dict has no Swin encoder to read a configuration from "
                         f"({err}).") from None
    windows = [(math.isqrt(rows) + 1) // 2 for rows, _ in tables]
    grid = None
    for i in range(stages):
        mask = f"{p}{i}.blocks.1.attn_mask"
        if mask in state:  # (windows, N, N): the stage's resolution, in windows of windows[i]
            grid = math.isqrt(shape(mask)[0]) * windows[i] * 2**i
            break
        if windows[i] < windows[0]:  # the first stage whose window is clipped to its size
            grid = windows[i] * 2**i
            break
    if grid is None and depths[-1] > 1:  # no shift anywhere: the last stage fits one window
        grid = windows[-1] * 2**(stages - 1)
    if grid is None:
        raise ValueError(f"{NAME} state dict does not tell its image size (no attn_mask "
                         f"buffers); build the SwinConfig by hand.")
    return swin.SwinConfig(image_size=grid * patch, patch_size=patch, embed_dim=width,
                           depths=depths, num_heads=tuple(heads for _, heads in tables),
                           window_size=windows[0], mlp_ratio=mlp / width, channels=channels)


# ---------------------------------------------------------------- public

def simmim_params_from_official(state_dict: Mapping[str, Any], *, num_heads: Optional[int] = None,
                                swin_config: Optional[swin.SwinConfig] = None,
                                scan: bool = False, strict: bool = True,
                                expected: Optional[Mapping] = None) -> dict:
    """Official SimMIM state dict -> {'encoder'[, 'decoder']} (float32 numpy; 'decoder' only if
    the file has the head). A top-level 'model' key is unwrapped, so a training checkpoint
    read by load_torch_state_dict converts as it is.

    Pass num_heads for a ViT encoder (12 for ViT-B; checkpoints do not store it), swin_config
    for a Swin one (mim_jax.models.swin.SwinConfig: head counts, window and image size of the
    pretraining run; swin_config_from_official reads them from the file). scan=True stacks the
    ViT blocks as model.scan=True expects. Stored relative_position_index and attn_mask buffers
    must equal ours and are not imported. Missing keys raise ValueError; unexpected ones too
    unless strict=False. Every tensor's shape is checked against `expected` (our parameter
    tree, e.g. jax.eval_shape of the objective's init) when given, else against the sizes the
    checkpoint (ViT) or swin_config (Swin) implies; all mismatches are listed in one ValueError.
    """
    state = dict(_unwrap(state_dict))
    kind = "Swin" if _is_swin(state) else "ViT"
    if (num_heads is None) == (swin_config is None):
        raise ValueError(f"pass num_heads (ViT encoder) or swin_config (Swin encoder), one of "
                         f"them; this {NAME} state dict holds a {kind} encoder.")
    if swin_config is None:
        if kind == "Swin":
            raise ValueError(f"{NAME} state dict holds a Swin encoder ({ENCODER}layers.*): pass "
                             f"swin_config (swin_config_from_official reads it) instead of "
                             f"num_heads.")
        return _vit_from_official(state, num_heads, scan=scan, strict=strict, expected=expected)
    if kind != "Swin":
        raise ValueError(f"{NAME} state dict holds no Swin stages ({ENCODER}layers.*): a ViT "
                         f"encoder ({ENCODER}blocks.*) takes num_heads instead of swin_config.")
    if scan:
        raise ValueError("scan=True stacks ViT blocks; mim_jax's Swin has no scanned layout.")
    return _swin_from_official(state, _check_swin_config(swin_config), strict=strict,
                               expected=expected)


def simmim_params_to_official(params: Mapping, *,
                              swin_config: Optional[swin.SwinConfig] = None
                              ) -> Dict[str, np.ndarray]:
    """Our {'encoder'[, 'decoder']} -> an official SimMIM state dict (no 'model' wrapper):
    float32 weights under `encoder.` and `decoder.0.`, plus every buffer the reference
    registers (int64 relative_position_index, Swin's float32 attn_mask of shifted blocks), so
    the reference's load_state_dict(strict=True) accepts it.

    A ViT encoder (scanned or not) is written in BEiT's layout (see official_beit's export for
    the reference options it needs; q/v biases only: a key bias is dropped, which the softmax
    makes the same model). A Swin encoder needs the swin_config it was built with; its
    parameters are checked against it.
    """
    if not isinstance(params, Mapping) or "encoder" not in params or \
            set(params) - {"encoder", "decoder"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"expected SimMIM parameters {{'encoder'[, 'decoder']}}; got {got}.")
    is_swin = "stage_0" in params["encoder"]
    if swin_config is None:
        if is_swin:
            raise ValueError("Swin parameters (encoder/stage_*): pass the swin_config they were "
                             "built with.")
        return _vit_to_official(params)
    if not is_swin:
        raise ValueError("swin_config was given but the encoder is not a Swin (no "
                         "encoder/stage_0).")
    return _swin_to_official(params, _check_swin_config(swin_config))
