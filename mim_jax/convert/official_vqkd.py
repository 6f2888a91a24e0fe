"""Official BEiT v2 VQ-KD checkpoints (unilm/beit2, e.g. vqkd_encoder_base_decoder_1x768x12_clip
-*.pth, state dict under 'model') <-> mim_jax VQ-KD parameters and codebook state.

Official keys -> ours (mim_jax.models.tokenizers.vqkd.VQKD):
  encoder.* / decoder.*                     encoder / decoder (a BEiT-style ViT: qkv.weight with
                                            q_bias and v_bias, learned pos_embed, fc_norm last)
  encode_task_layer.{0,2} / decode_task_layer.{0,2}   *_task_layer/fc1, fc2
  quantize.embedding.weight                 codebook (params of the frozen tokenizer; the
                                            trainer keeps it in model_state['codebook'])
  quantize.cluster_size                     model_state codebook 'cluster_size' (EMA usage)
  quantize.embedding.initted                model_state codebook 'initted'
  quantize.embedding.cluster_size, .embed_avg   not imported: the reference's training never
                                            updates them (its EMA writes the weight directly);
                                            export writes the usage counts and the codes there
  teacher_model.*, scaling_layer.*, loss*   ignored (the frozen teacher is not ours to convert)
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from mim_jax.convert import common

ENCODER, DECODER = "encoder.", "decoder."
_IGNORED = ("teacher_model.", "scaling_layer.", "loss")
_UNUSED_BUFFERS = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
                   "quantize.embedding.initted", "quantize.cluster_size")


def _qv_bias(prefix: str, num_heads: int) -> common.Leaf:
    """q_bias, v_bias (k has none) <-> our (3, heads, head_dim) bias with a zero k slot."""
    def to_ours(qb, vb):
        return np.stack([qb, np.zeros_like(qb), vb]).reshape(3, num_heads, -1)
    return common.Leaf((f"{prefix}q_bias", f"{prefix}v_bias"), to_ours,
                       lambda b: (b[0].reshape(-1), b[2].reshape(-1)))


def _vit(prefix: str, depth: int, num_heads: int) -> common.Plan:
    blocks = {}
    for i in range(depth):
        p = f"{prefix}blocks.{i}."
        qkv = {"kernel": common.qkv_fused(f"{p}attn.qkv", num_heads)["kernel"],
               "bias": _qv_bias(f"{p}attn.", num_heads)}
        blocks[f"block_{i}"] = common.block(
            norm1=f"{p}norm1", qkv=qkv, proj=f"{p}attn.proj", norm2=f"{p}norm2",
            fc1=f"{p}mlp.fc1", fc2=f"{p}mlp.fc2", num_heads=num_heads)
    return {"patch_embed": common.patch_conv(f"{prefix}patch_embed.proj"),
            "cls_token": common.tensor(f"{prefix}cls_token"),
            "pos_embed": common.tensor(f"{prefix}pos_embed"),
            "transformer": blocks,
            # use_mean_pooling=True: `norm` is Identity and fc_norm normalises the patch tokens.
            "norm": common.layernorm(f"{prefix}fc_norm")}


def _task_layer(prefix: str) -> common.Plan:
    return {"fc1": common.linear(f"{prefix}.0"), "fc2": common.linear(f"{prefix}.2")}


def plan(depth: int, num_heads: int, decoder_depth: int = 0,
         decoder_num_heads: Optional[int] = None) -> common.Plan:
    """The whole VQ-KD (decoder_depth 0: the encode-only tokenizer)."""
    out = {"encoder": _vit(ENCODER, depth, num_heads),
           "encode_task_layer": _task_layer("encode_task_layer"),
           "codebook": common.tensor("quantize.embedding.weight")}
    if decoder_depth:
        out["decoder"] = _vit(DECODER, decoder_depth, decoder_num_heads or num_heads)
        out["decode_task_layer"] = _task_layer("decode_task_layer")
    return out


def _unwrap(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    for key in ("model", "state_dict"):  # the reference's loader accepts either wrapper
        if isinstance(state_dict.get(key), Mapping):
            return dict(state_dict[key])
    return dict(state_dict)


def params_from_official(state_dict: Mapping[str, Any], *, num_heads: int = 12,
                         decoder_num_heads: int = 12, with_decoder: Optional[bool] = None,
                         expected: Optional[Mapping] = None, strict: bool = True) -> dict:
    """Official VQ-KD state dict -> our params {'encoder', 'encode_task_layer', 'codebook'
    [, 'decoder', 'decode_task_layer']} (float32 numpy).

    Depths come from the keys; head counts are not stored (official: 12 and 12). With
    `expected` (a params tree of arrays / ShapeDtypeStructs), the decoder is converted only if
    it has one and every tensor's shape is checked against it: all mismatched names are
    listed in one ValueError. strict: keys of no known part (teacher ones aside) raise."""
    state = _unwrap(state_dict)
    keys = [k for k in state if not k.startswith(_IGNORED)]
    if with_decoder is None:
        with_decoder = ("decoder" in expected) if expected is not None else any(
            k.startswith(DECODER) for k in keys)
    depth = common.layer_depth(keys, f"{ENCODER}blocks.")
    if depth == 0:
        raise ValueError("official VQ-KD state dict has no encoder layers ('encoder.blocks.<i>.').")
    decoder_depth = common.layer_depth(keys, f"{DECODER}blocks.") if with_decoder else 0
    if with_decoder and decoder_depth == 0:
        raise ValueError("official VQ-KD state dict has no decoder layers ('decoder.blocks.<i>.').")
    layout = plan(depth, num_heads, decoder_depth, decoder_num_heads)
    present = keys if with_decoder else [
        k for k in keys if not k.startswith((DECODER, "decode_task_layer."))]
    common.check_keys(present, common.plan_keys(layout) + list(_UNUSED_BUFFERS), strict,
                      "official VQ-KD")
    shapes = common.expected_shapes(expected) if expected is not None else None
    return common.load(layout, state, expected=shapes, what="official VQ-KD state dict",
                       target="the tokenizer" if expected is not None else "the model")


def codebook_state_from_official(state_dict: Mapping[str, Any]) -> dict:
    """The EMA codebook state the trainer keeps in model_state['codebook']."""
    state = _unwrap(state_dict)
    need = ("quantize.embedding.weight", "quantize.cluster_size", "quantize.embedding.initted")
    common.check_keys([k for k in need if k in state], need, False, "official VQ-KD")
    return {"embedding": common.owned(common.to_numpy(state[need[0]])),
            "cluster_size": common.owned(common.to_numpy(state[need[1]])),
            "initted": np.asarray(bool(common.to_numpy(state[need[2]]).reshape(-1)[0]))}


def _depth_heads(part: Mapping) -> tuple:
    blocks = part["transformer"]
    depth = sum(1 for name in blocks if name.startswith("block_"))
    return depth, int(np.shape(blocks["block_0"]["attn"]["qkv"]["kernel"])[2])  # (D, 3, H, Dh)


def params_to_official(params: Mapping, codebook_state: Optional[Mapping] = None
                       ) -> Dict[str, np.ndarray]:
    """Our params (with 'codebook', or with its EMA state given as `codebook_state`) ->
    the official key layout (no 'model' wrapper), ready for torch.save({'model': ...})."""
    params = dict(params)
    if codebook_state is not None:
        params["codebook"] = codebook_state["embedding"]
    if "codebook" not in params:
        raise ValueError("params_to_official needs the codebook: pass params with 'codebook' or "
                         "codebook_state={'embedding', 'cluster_size', 'initted'}.")
    depth, heads = _depth_heads(params["encoder"])
    dec_depth, dec_heads = _depth_heads(params["decoder"]) if "decoder" in params else (0, None)
    out = common.dump(plan(depth, heads, dec_depth, dec_heads), params, "VQ-KD")
    codes = out["quantize.embedding.weight"]
    counts = (common.to_numpy(codebook_state["cluster_size"]) if codebook_state is not None
              else np.zeros(codes.shape[0], np.float32))
    initted = bool(np.asarray(codebook_state["initted"])) if codebook_state is not None else True
    out["quantize.cluster_size"] = common.owned(counts)
    out["quantize.embedding.cluster_size"] = common.owned(counts)
    out["quantize.embedding.embed_avg"] = common.owned(codes)
    out["quantize.embedding.initted"] = np.asarray([float(initted)], np.float32)
    return out
