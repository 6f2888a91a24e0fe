"""BEiT checkpoints <-> the mim_jax BEiT objective's parameters
{'encoder': ViT, 'lm_head': Dense[, 'cls_head': blocks of BEiT v2's CLS-pretraining head]}.

The first half is shared by every BEiT layout (official_beit.py uses it too): which options a
checkpoint or a parameter tree has (`Features`), the per-block plan, and the import / export
steps around a layout's plan (strict key check, relative_position_index buffers, every shape
checked against our model, scan stacking). The second half is the Hugging Face layout:

* BeitForMaskedImageModeling <-> {'encoder', 'lm_head'}; BeitModel (use_mean_pooling=False)
  <-> {'encoder'}. The encoder is our ViT with cls_token=True, qkv_bias='qv', use_mask_token if
  the checkpoint has `embeddings.mask_token`, pos_embed='learned' if it has
  `embeddings.position_embeddings` else 'none', rel_pos_bias='shared' (`shared_position_bias`)
  / 'per_layer' (`layers.N.relative_position_bias`) / 'none', and layer_scale_init set if it
  has `lambda_1/2` (the value only matters for a fresh init). A mean-pooling BeitModel
  (use_mean_pooling=True) normalises the pooled feature, not the tokens: its encoder has no
  final norm (our ViT's final_norm=False), and its `pooler.layernorm` is a classifier's.
* Key names are those of transformers 5.x. Files saved by 4.x (most Hub files) use
  `encoder.layer.N.attention.attention.query`, `intermediate.dense`, ...,
  `encoder.relative_position_bias` and `attention.attention.relative_position_bias`;
  transformers renames those on load and so do we. 4.x files may also hold
  `relative_position_index` buffers: they are not imported (ours are computed) but must equal
  ours. Export writes 5.x names, which `load_state_dict(strict=True)` of a 5.x model takes
  (it has no persistent buffers).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.convert import common, hf_mae, hf_vit
from mim_jax.models import vit

BEIT = "Hugging Face BEiT"
_INDEX_SUFFIX = ".relative_position_index"


# ---------------------------------------------------------------- shared by BEiT layouts

@dataclasses.dataclass(frozen=True)
class BlockFeatures:
    qv_bias: bool  # q and v biases (k has none): our qkv_bias='qv'
    layer_scale: bool  # our ls1 / ls2 (gamma_1/2, lambda_1/2)
    rel_pos_table: bool  # a relative position bias table of the block's own


@dataclasses.dataclass(frozen=True)
class Features:
    """The options of a BEiT model, read from a checkpoint's keys or from our parameters."""
    num_heads: int
    depth: int
    blocks: BlockFeatures
    mask_token: bool
    pos_embed: bool  # learned absolute positions
    shared_rel_pos: bool
    lm_head: bool
    head_depth: int = 0  # BEiT v2's CLS-pretraining head
    head_blocks: Optional[BlockFeatures] = None
    # A LayerNorm over the output tokens. Models that pool before normalising (timm's and
    # Hugging Face's mean-pooling BEiT) have none: their norm belongs to the classifier.
    final_norm: bool = True


def qv_bias(q_key: str, v_key: str, num_heads: int) -> common.Leaf:
    """BEiT's q and v biases -> our (3, heads, head_dim) with a zero k slot. Export drops the k
    slot whatever it holds: a key bias adds q.b_k to every logit of a query, which the softmax
    cancels, so dropping it never changes the model."""
    def to_ours(qb, vb):
        return np.stack([qb, np.zeros_like(qb), vb]).reshape(3, num_heads, -1)
    return common.Leaf((q_key, v_key), to_ours, lambda b: (b[0].reshape(-1), b[2].reshape(-1)))


def block_plan(f: BlockFeatures, num_heads: int, *, qkv_kernel: common.Leaf, q_bias: str,
               v_bias: str, norm1: str, proj: str, norm2: str, fc1: str, fc2: str, ls1: str,
               ls2: str, table: str) -> common.Plan:
    """Our Block with the BEiT options `f`, given the checkpoint's names for its parts."""
    qkv = {"kernel": qkv_kernel}
    if f.qv_bias:
        qkv["bias"] = qv_bias(q_bias, v_bias, num_heads)
    plan = common.block(norm1=norm1, qkv=qkv, proj=proj, norm2=norm2, fc1=fc1, fc2=fc2,
                        num_heads=num_heads)
    if f.layer_scale:
        plan["ls1"], plan["ls2"] = common.tensor(ls1), common.tensor(ls2)
    if f.rel_pos_table:
        plan["rel_pos_bias"] = {"table": common.tensor(table)}
    return plan


def block_features(state: Mapping[str, Any], depth: int, names) -> BlockFeatures:
    """Options that any of `depth` layers has (`names(i)` -> dict of the layer's q_bias,
    v_bias, ls1, ls2, table keys): our blocks are uniform, so a layer that lacks what the others
    have then shows up as missing keys."""
    keys = [names(i) for i in range(depth)]
    has = lambda *parts: any(k[p] in state for k in keys for p in parts)  # noqa: E731
    return BlockFeatures(qv_bias=has("q_bias", "v_bias"), layer_scale=has("ls1", "ls2"),
                         rel_pos_table=has("table"))


def check_index_buffers(state: Dict[str, Any]) -> None:
    """Stored relative_position_index buffers must equal ours (BEiT's indexing with the three
    CLS entries last); they are then dropped from `state`."""
    for key in [k for k in state if k.endswith(_INDEX_SUFFIX)]:
        theirs = common.to_numpy(state.pop(key))
        side = math.isqrt(max(math.isqrt(theirs.size) - 1, 0))  # (N, N), N = side**2 + 1
        ours = vit.relative_position_index(side, side, cls_token=True) if side else np.zeros(0)
        if theirs.size != ours.size or not np.array_equal(theirs.reshape(-1), ours.reshape(-1)):
            raise ValueError(f"{key} (shape {theirs.shape}) is not the relative position index "
                             f"of a square patch grid with a CLS token that mim_jax computes.")


def index_buffer(table: np.ndarray) -> np.ndarray:
    """The relative_position_index buffer (int64, as torch's) that goes with a table."""
    side = (math.isqrt(table.shape[0] - 3) + 1) // 2
    return vit.relative_position_index(side, side, cls_token=True).astype(np.int64)


def _subplan(plan: common.Plan, keep) -> common.Plan:
    out = {}
    for name, node in plan.items():
        if isinstance(node, common.Leaf):
            if keep((name,)):
                out[name] = node
        else:
            sub = _subplan(node, lambda path, name=name: keep((name,) + path))
            if sub:
                out[name] = sub
    return out


def _is_position(path) -> bool:
    return path[-1] == "pos_embed" or path[-2:] == ("rel_pos_bias", "table")


def _implied_shapes(state, plan: common.Plan, f: Features):
    """Our parameter shapes for the sizes the checkpoint implies (width, patch, channels from
    the patch embedding, MLP width from most blocks, grid from the position tables, vocabulary
    from the LM head; a SimMIM head when the plan has a 'decoder'), from the real modules via
    jax.eval_shape. -> (shapes, description)."""
    enc = plan["encoder"]
    width, channels, patch, _ = np.shape(state[enc["patch_embed"]["kernel"].keys[0]])
    if width % f.num_heads:
        raise ValueError(f"the checkpoint's width {width} is not divisible by "
                         f"num_heads={f.num_heads}.")
    mlp_dim = collections.Counter(
        np.shape(state[b["fc1"]["kernel"].keys[0]])[0]
        for b in enc["transformer"].values()).most_common(1)[0][0]
    grid = 1  # any grid gives the same shapes when the model has no position tables
    for path, leaf in common.plan_leaves(plan):
        shape = np.shape(state[leaf.keys[0]])
        if path[-1] == "pos_embed" and len(shape) == 3:
            grid = max(math.isqrt(max(shape[1] - 1, 1)), 1)
        elif path[-2:] == ("rel_pos_bias", "table") and len(shape) == 2 and shape[0] > 3:
            grid = (math.isqrt(shape[0] - 3) + 1) // 2
    if f.shared_rel_pos and f.blocks.rel_pos_table:
        raise ValueError("the checkpoint has a shared and per-layer relative position biases; "
                         "mim_jax's ViT has one or the other (model.rel_pos_bias).")
    cfg = vit.ViTConfig(image_size=grid * int(patch), patch_size=int(patch), width=int(width),
                        depth=f.depth, num_heads=f.num_heads, mlp_dim=int(mlp_dim),
                        channels=int(channels))
    encoder = vit.ViT(
        cfg, cls_token=True, pos_embed="learned" if f.pos_embed else "none",
        use_mask_token=f.mask_token, qkv_bias="qv" if f.blocks.qv_bias else False,
        layer_scale_init=0.1 if f.blocks.layer_scale else None, final_norm=f.final_norm,
        rel_pos_bias=("shared" if f.shared_rel_pos else
                      "per_layer" if f.blocks.rel_pos_table else "none"))
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    token_mask = jax.ShapeDtypeStruct((1, cfg.num_patches), jnp.bool_) if f.mask_token else None
    what = (f"a BEiT of width {cfg.width}, depth {cfg.depth}, MLP {cfg.mlp_dim}, patch "
            f"{cfg.patch_size}, {cfg.channels} channels")
    if "decoder" in plan:  # official SimMIM: the 1x1 conv head of stride patch_size
        from mim_jax.objectives.simmim import SimMIM  # not at import, as BEiT below

        model = SimMIM(encoder=encoder, stride=cfg.patch_size, channels=cfg.channels)
        shapes = jax.eval_shape(model.init, jax.random.key(0), images, token_mask)["params"]
        return shapes, f"{what}, SimMIM head of stride {cfg.patch_size} (the sizes this " \
                       f"checkpoint implies)"
    if not f.lm_head:
        shapes = jax.eval_shape(encoder.init, jax.random.key(0), images,
                                token_mask=token_mask)["params"]
        return {"encoder": shapes}, what + " (the sizes this checkpoint implies)"
    from mim_jax.objectives.beit import BEiT  # not at import: objectives import converters

    vocab = np.shape(state[plan["lm_head"]["kernel"].keys[0]])[0]
    model = BEiT(encoder=encoder, vocab_size=int(vocab), cls_head_layers=f.head_depth,
                 early_layers=f.depth)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, token_mask)
    return shapes["params"], (f"{what}, vocabulary {vocab}, CLS head of {f.head_depth} blocks "
                              f"(the sizes this checkpoint implies)")


def _unscanned_shapes(tree: Mapping) -> dict:
    tree = dict(tree)
    enc = tree.get("encoder", {})
    if "blocks" in enc.get("transformer", {}):
        tree["encoder"] = dict(enc, transformer=jax.eval_shape(
            vit.unstack_block_params, dict(enc["transformer"])))
    return tree


def import_params(state: Dict[str, Any], plan: common.Plan, f: Features, *, what: str,
                  scan: bool, strict: bool, expected: Optional[Mapping]) -> dict:
    """Checkpoint (index buffers already checked and dropped) + plan -> our float32 numpy
    tree. Every tensor is checked against `expected` (our parameter tree or its
    jax.eval_shape; scanned or not; the encoder alone for an encoder-only plan) or else
    against the model the checkpoint's own sizes imply; all mismatches are listed at once."""
    common.check_keys(state, common.plan_keys(plan), strict, what)
    positions = common.load(_subplan(plan, _is_position), state)
    hf_vit.check_positions(_subplan(plan, _is_position), positions, f.num_heads)
    if expected is not None:
        if "encoder" not in expected:
            expected = {"encoder": expected}
        target_tree, target = _unscanned_shapes(expected), "the target model"
    else:
        target_tree, target = _implied_shapes(state, plan, f)
    params = common.load(plan, state, expected=common.expected_shapes(target_tree),
                         what=f"{what} state dict", target=target)
    return hf_vit.stack_if_scan(params, f.depth, scan)


def _unscan(params: Mapping) -> dict:
    params = {k: dict(v) if isinstance(v, Mapping) else v for k, v in params.items()}
    enc = params.get("encoder")
    if not isinstance(enc, Mapping) or not isinstance(enc.get("transformer"), Mapping):
        raise ValueError(f"expected BEiT parameters {{'encoder', 'lm_head'[, 'cls_head']}} with "
                         f"encoder/transformer blocks; got top-level keys {sorted(params)}.")
    if "blocks" in enc["transformer"]:
        enc["transformer"] = vit.unstack_block_params(dict(enc["transformer"]))
    return params


def _our_block_features(blocks: Mapping, what: str) -> BlockFeatures:
    block = blocks.get("block_0")
    if not isinstance(block, Mapping):
        raise ValueError(f"{what} parameters have no block_0.")
    return BlockFeatures(qv_bias="bias" in block["attn"]["qkv"], layer_scale="ls1" in block,
                         rel_pos_table="rel_pos_bias" in block)


def features_from_params(params: Mapping) -> Features:
    """The options of our (unscanned) BEiT parameters, for the export plan."""
    unknown = sorted(set(params) - {"encoder", "lm_head", "cls_head"})
    if unknown:
        raise ValueError(f"BEiT parameters have unknown top-level keys {unknown}; expected "
                         f"'encoder', 'lm_head' and optionally 'cls_head'.")
    enc = params["encoder"]
    blocks = enc["transformer"]
    heads = int(np.shape(blocks["block_0"]["attn"]["qkv"]["kernel"])[2])  # (D, 3, H, Dh)
    head = params.get("cls_head")
    if head is not None and "lm_head" not in params:
        raise ValueError("BEiT parameters have a 'cls_head' but no 'lm_head' (the CLS head's "
                         "predictions go through the shared LM head).")
    if not any(k in enc for k in ("pos_embed", "rel_pos_bias")) and not \
            _our_block_features(blocks, "encoder").rel_pos_table:
        raise ValueError("the encoder has no learned absolute positions and no relative "
                         "position bias: a fixed sin-cos position embedding (pos_embed="
                         "'sincos') has no counterpart in BEiT checkpoints.")
    return Features(
        num_heads=heads, depth=sum(k.startswith("block_") for k in blocks),
        blocks=_our_block_features(blocks, "encoder"), mask_token="mask_token" in enc,
        pos_embed="pos_embed" in enc, shared_rel_pos="rel_pos_bias" in enc,
        lm_head="lm_head" in params, final_norm="norm" in enc,
        head_depth=0 if head is None else sum(k.startswith("block_") for k in head),
        head_blocks=None if head is None else _our_block_features(head, "cls_head"))


def export_params(params: Mapping, plan_fn, what: str):
    """Our parameters (scanned or not) -> (checkpoint dict of float32 numpy, Features, the
    unscanned params); `plan_fn(features)` gives the layout's plan."""
    params = _unscan(params)
    f = features_from_params(params)
    return common.dump(plan_fn(f), params, what), f, params


# ---------------------------------------------------------------- Hugging Face layout

# BEiT-only 4.x -> 5.x names, applied before the ViT renames of hf_mae (whose layer rename
# only knows the 'vit.' prefix).
_LEGACY_RENAMES = tuple((re.compile(old), new) for old, new in (
    (r"^(beit\.)?encoder\.layer\.(\d+)\.", r"\1layers.\2."),
    (r"^(beit\.)?encoder\.relative_position_bias\.", r"\1shared_position_bias."),
    (r"\.attention\.attention\.relative_position_bias\.", ".relative_position_bias."),
))


def _current_names(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    renamed, _ = common.rename_keys(state_dict, _LEGACY_RENAMES)
    return hf_mae.current_names(renamed)


def _hf_names(prefix: str):
    def names(i):
        p = f"{prefix}layers.{i}."
        return dict(q_bias=f"{p}attention.q_proj.bias", v_bias=f"{p}attention.v_proj.bias",
                    ls1=f"{p}lambda_1", ls2=f"{p}lambda_2",
                    table=f"{p}relative_position_bias.relative_position_bias_table")
    return names


def _hf_block(p: str, f: BlockFeatures, heads: int) -> common.Plan:
    attn = f"{p}attention."
    kernel = common.qkv_separate(f"{attn}q_proj", f"{attn}k_proj", f"{attn}v_proj",
                                 heads)["kernel"]
    return block_plan(f, heads, qkv_kernel=kernel, q_bias=f"{attn}q_proj.bias",
                      v_bias=f"{attn}v_proj.bias", norm1=f"{p}layernorm_before",
                      proj=f"{attn}o_proj", norm2=f"{p}layernorm_after", fc1=f"{p}mlp.fc1",
                      fc2=f"{p}mlp.fc2", ls1=f"{p}lambda_1", ls2=f"{p}lambda_2",
                      table=f"{p}relative_position_bias.relative_position_bias_table")


def _hf_plan(f: Features, prefix: str, norm: Optional[str]) -> common.Plan:
    emb = f"{prefix}embeddings."
    encoder: common.Plan = {
        "patch_embed": common.patch_conv(f"{emb}patch_embeddings.projection"),
        "cls_token": common.tensor(f"{emb}cls_token"),
        "transformer": {f"block_{i}": _hf_block(f"{prefix}layers.{i}.", f.blocks, f.num_heads)
                        for i in range(f.depth)},
    }
    if f.final_norm:
        encoder["norm"] = common.layernorm(norm)
    if f.mask_token:
        encoder["mask_token"] = common.tensor(f"{emb}mask_token")
    if f.pos_embed:
        encoder["pos_embed"] = common.tensor(f"{emb}position_embeddings")
    if f.shared_rel_pos:
        encoder["rel_pos_bias"] = {
            "table": common.tensor(f"{prefix}shared_position_bias.relative_position_bias_table")}
    plan = {"encoder": encoder}
    if f.lm_head:
        plan["lm_head"] = common.linear("lm_head")
    return plan


def _final_norm(state: Mapping[str, Any], prefix: str) -> Optional[str]:
    """Our ViT ends in one LayerNorm over all tokens: BeitModel's `layernorm`
    (use_mean_pooling=False) or BeitForMaskedImageModeling's top-level one. A mean-pooling
    BeitModel has none (its `pooler.layernorm` normalises the pooled feature, which is the
    classifier's business): None, an encoder without a final norm."""
    candidates = [p for p in dict.fromkeys((f"{prefix}layernorm", "layernorm"))
                  if f"{p}.weight" in state]
    if len(candidates) > 1:
        raise ValueError(f"{BEIT} state dict has two final LayerNorms ({candidates}, i.e. "
                         f"use_mean_pooling=False inside BeitForMaskedImageModeling); mim_jax's "
                         f"ViT applies one.")
    return candidates[0] if candidates else None


def _import_hf(state_dict, num_heads, *, with_head: bool, scan, strict, expected) -> dict:
    num_heads = hf_vit.check_heads(num_heads)
    state = _current_names(state_dict)
    check_index_buffers(state)
    prefix = hf_vit.prefix_of(state, "beit")
    emb = f"{prefix}embeddings."
    depth = hf_vit.layer_count(state, f"{prefix}layers.", BEIT)
    norm = _final_norm(state, prefix)
    f = Features(
        num_heads=num_heads, depth=depth, blocks=block_features(state, depth, _hf_names(prefix)),
        mask_token=f"{emb}mask_token" in state, pos_embed=f"{emb}position_embeddings" in state,
        shared_rel_pos=f"{prefix}shared_position_bias.relative_position_bias_table" in state,
        lm_head=with_head and "lm_head.weight" in state, final_norm=norm is not None)
    plan = _hf_plan(f, prefix, norm)
    return import_params(state, plan, f, what=BEIT, scan=scan, strict=strict, expected=expected)


def vit_params_from_hf_beit(state_dict: Mapping[str, Any], *, num_heads: int,
                            scan: bool = False, strict: bool = True,
                            expected: Optional[Mapping] = None) -> dict:
    """BeitModel or BeitForMaskedImageModeling state dict -> {'encoder': ViT params} (see the
    module docstring for the ViT options it implies; a mean-pooling BeitModel's has no 'norm').

    num_heads is the HF config's num_attention_heads. BEiT's `lm_head`, a pooler and a
    classifier are not part of the ViT: pass strict=False to skip them (beit_params_from_hf
    keeps lm_head).
    """
    return _import_hf(state_dict, num_heads, with_head=False, scan=scan, strict=strict,
                      expected=expected)


def beit_params_from_hf(state_dict: Mapping[str, Any], *, num_heads: int, scan: bool = False,
                        strict: bool = True, expected: Optional[Mapping] = None) -> dict:
    """BeitForMaskedImageModeling state dict -> the BEiT objective's {'encoder', 'lm_head'}
    (float32 numpy; 'lm_head' only if the checkpoint has one, as a BeitModel has not).

    num_heads is the HF config's num_attention_heads (not stored in checkpoints). scan=True
    stacks the encoder blocks as model.scan=True expects. Missing keys raise ValueError;
    unexpected ones too unless strict=False. Every tensor's shape is checked against `expected`
    (e.g. jax.eval_shape of the objective's init) when given, else against the sizes the
    checkpoint implies; all mismatches are listed in one ValueError.
    """
    return _import_hf(state_dict, num_heads, with_head=True, scan=scan, strict=strict,
                      expected=expected)


def beit_params_to_hf(params: Mapping) -> Dict[str, np.ndarray]:
    """Our {'encoder', 'lm_head'} (scanned or not) -> a BeitForMaskedImageModeling state dict
    (5.x names) that `load_state_dict(strict=True)` accepts; {'encoder'} alone -> a BeitModel's
    (use_mean_pooling=False, add_pooling_layer=False).

    The HF config must match: use_mask_token, use_absolute_position_embeddings,
    use_shared_relative_position_bias / use_relative_position_bias, layer_scale_init_value > 0
    as the parameters have them, and use_mean_pooling=True for BeitForMaskedImageModeling (its
    final norm is the top-level `layernorm`). Without q/v biases (qkv_bias=False) zero ones are
    written, which is the same model. BEiT v2's CLS head has no HF counterpart.
    """
    if "cls_head" in params:
        raise ValueError(f"{BEIT} (BeitForMaskedImageModeling) has no CLS-pretraining head: "
                         f"export without params['cls_head'] or use the official layout "
                         f"(official_beit.beit_params_to_official).")
    prefix = "beit." if "lm_head" in params else ""
    out, f, _ = export_params(params, lambda f: _hf_plan(f, prefix, "layernorm"), BEIT)
    if not f.blocks.qv_bias:  # HF always has them; zeros are the same model
        for i in range(f.depth):
            p = f"{prefix}layers.{i}.attention."
            width = out[f"{p}q_proj.weight"].shape[0]
            out[f"{p}q_proj.bias"] = np.zeros(width, np.float32)
            out[f"{p}v_proj.bias"] = np.zeros(width, np.float32)
    return out
