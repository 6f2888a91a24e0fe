"""Optimizers, learning-rate schedules and weight-decay masks."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax.errors import ConfigError

OPTIMIZERS = ("adamw", "lamb", "lars")
# LAMB's layer-wise adaptation: on weight-decayed tensors while the decay is non-zero (timm's
# default, SparK pretraining) or on every tensor (timm's always_adapt, SparK's fine-tuning).
TRUST_RATIO_SCOPES = ("decayed", "all")

# Parameters without weight decay besides biases and 1-D tensors (norm and layer scales), when
# a config names none (optimizer.no_decay): tokens, position embeddings and relative position
# tables, the rule of timm's fine-tuning. The pretraining configs name their reference's list.
DEFAULT_NO_DECAY = ("cls_token", "mask_token", "pos_embed", "relative_position_bias_table",
                    "rel_pos_bias/table")


def decay_mask(params, no_decay=DEFAULT_NO_DECAY):
    """True where weight decay applies. The references' rule: never a bias or a 1-D tensor,
    nor a parameter their skip list names; here `no_decay` holds names that match a parameter's
    own name or the end of its path ('rel_pos_bias/table'). Computed on shapes alone, so it
    works on abstract (eval_shape) trees too."""
    def rule(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        joined = "/".join(names)
        if names[-1] == "bias" or any(joined == n or joined.endswith("/" + n) for n in no_decay):
            return False
        # A scanned Transformer stacks its blocks on a leading depth axis ('blocks').
        return leaf.ndim - ("blocks" in names[:-1]) > 1
    return jax.tree_util.tree_map_with_path(rule, params)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(opt_cfg) -> None:
    """config.optimizer: every field's type and range, before anything is built."""
    name = opt_cfg.get("name")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} is not supported; allowed: {list(OPTIMIZERS)}.")

    def check(field, ok, allowed, default=None):
        value = opt_cfg.get(field, default)
        if not (_number(value) and math.isfinite(value) and ok(value)):
            raise ConfigError(f"optimizer.{field}={value!r} must be {allowed}.")

    check("base_lr", lambda v: v > 0, "a finite number > 0")
    check("lr_batch_divisor", lambda v: v > 0, "a finite number > 0", 256)
    check("weight_decay", lambda v: v >= 0, "a finite number >= 0", 0.0)
    if opt_cfg.get("weight_decay_end") is not None:
        check("weight_decay_end", lambda v: v >= 0,
              "a finite number >= 0 (unset: weight_decay stays constant)")
    check("min_lr", lambda v: v >= 0, "a finite number >= 0", 0.0)
    check("grad_clip_norm", lambda v: v >= 0, "a finite number >= 0 (0 = off)", 0.0)
    check("layer_decay", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)", 1.0)
    check("warmup_start_factor", lambda v: 0 <= v <= 1, "in [0, 1] (the warmup's first lr "
          "as a fraction of the peak)", 0.0)
    if name == "lamb":
        trust = opt_cfg.get("trust_ratio", "decayed")
        if trust not in TRUST_RATIO_SCOPES:
            raise ConfigError(f"optimizer.trust_ratio={trust!r} is not supported; allowed: "
                              f"{list(TRUST_RATIO_SCOPES)}.")
    schedule = opt_cfg.get("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={schedule!r} is not supported; allowed: "
                          f"{list(SCHEDULES)}.")
    epochs = opt_cfg.get("decay_epochs", ())
    if not isinstance(epochs, (tuple, list)) or not all(_number(e) and e > 0 for e in epochs):
        raise ConfigError(f"optimizer.decay_epochs={epochs!r} must be a tuple of epochs > 0 "
                          "(the multistep schedule's milestones).")
    check("decay_rate", lambda v: 0 < v <= 1, "in (0, 1]", 0.1)
    if not isinstance(opt_cfg.get("cosine_from_step_0", False), bool):
        raise ConfigError(f"optimizer.cosine_from_step_0={opt_cfg.get('cosine_from_step_0')!r} "
                          "must be true or false.")
    no_decay = opt_cfg.get("no_decay", DEFAULT_NO_DECAY)
    if not isinstance(no_decay, (tuple, list)) or not all(isinstance(n, str) for n in no_decay):
        raise ConfigError(f"optimizer.no_decay={no_decay!r} must be a tuple of parameter names.")
    if not isinstance(opt_cfg.get("bias_correction", True), bool):
        raise ConfigError(f"optimizer.bias_correction={opt_cfg.get('bias_correction')!r} must "
                          "be true or false.")
    if name == "lars":
        check("momentum", lambda v: 0 <= v < 1, "in [0, 1)", 0.9)
    else:
        check("b1", lambda v: 0 <= v < 1, "in [0, 1)", 0.9)
        check("b2", lambda v: 0 <= v < 1, "in [0, 1)", 0.999)
        check("eps", lambda v: v > 0, "a finite number > 0", 1e-8)


def peak_learning_rate(opt_cfg, global_batch_size: int) -> float:
    """lr = base_lr x global_batch / lr_batch_divisor (256 for MAE/BEiT, 512 for SimMIM)."""
    return opt_cfg.base_lr * global_batch_size / opt_cfg.lr_batch_divisor


SCHEDULES = ("cosine", "multistep")


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
                  warmup_start_factor: float = 0.0, *, decay: str = "cosine",
                  milestones=(), gamma: float = 0.1, cosine_from_step_0: bool = False):
    """Per-step linear warmup from warmup_start_factor x peak_lr (0: the MAE rule; SparK and
    SimMIM start at 0.005), then
      decay='cosine': half-cycle cosine down to min_lr over the steps after the warmup (MAE,
        BEiT); with cosine_from_step_0 over all steps, the warmup overriding its first ones
        (timm's CosineLRScheduler without warmup_prefix, as SimMIM's 100-epoch recipes);
      decay='multistep': peak_lr x gamma^(number of `milestones` passed) (SimMIM's 800-epoch
        recipes: x0.1 at epoch 700)."""
    warmup_steps = min(warmup_steps, total_steps)
    start = warmup_start_factor * peak_lr
    milestones = np.asarray(sorted(milestones), np.float32)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = start + (peak_lr - start) * step / max(warmup_steps, 1)
        if decay == "multistep":
            passed = jnp.sum(step >= milestones) if milestones.size else 0
            after = peak_lr * jnp.power(gamma, passed)
        else:
            first = 0 if cosine_from_step_0 else warmup_steps
            progress = jnp.clip((step - first) / max(total_steps - first, 1), 0, 1)
            after = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, after)
    # make_optimizer reads the run length from here, so a weight-decay schedule spans the
    # same steps as the learning rate without a second argument to thread through.
    schedule.total_steps = total_steps
    return schedule


def schedule_from_config(opt_cfg, peak_lr: float, total_steps: int, warmup_steps: int,
                         steps_per_epoch: int):
    """make_schedule with config.optimizer's fields: min_lr, warmup_start_factor, schedule
    ('cosine' | 'multistep'), decay_epochs and decay_rate (multistep), cosine_from_step_0."""
    return make_schedule(
        peak_lr, total_steps, warmup_steps, opt_cfg.get("min_lr", 0.0),
        opt_cfg.get("warmup_start_factor", 0.0), decay=opt_cfg.get("schedule", "cosine"),
        milestones=[int(round(e * steps_per_epoch)) for e in opt_cfg.get("decay_epochs", ())],
        gamma=opt_cfg.get("decay_rate", 0.1),
        cosine_from_step_0=opt_cfg.get("cosine_from_step_0", False))


def make_weight_decay_schedule(start: float, end: float, total_steps: int):
    """Per-step half-cycle cosine from `start` at step 0 to `end` at the last step
    (total_steps - 1), without warmup: SparK's weight-decay rule (0.04 -> 0.2)."""
    last = max(total_steps - 1, 1)

    def schedule(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / last, 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return schedule


def weight_decay_rule(opt_cfg, total_steps: Optional[int] = None):
    """optimizer.weight_decay as a float, or a per-step schedule when weight_decay_end is set."""
    end = opt_cfg.get("weight_decay_end")
    if end is None:
        return opt_cfg.weight_decay
    if total_steps is None:
        raise ValueError("optimizer.weight_decay_end needs the run's total steps: pass a "
                         "schedule from make_schedule or total_steps=.")
    return make_weight_decay_schedule(opt_cfg.weight_decay, end, total_steps)


def make_optimizer(opt_cfg, schedule, params=None,
                   total_steps: Optional[int] = None) -> optax.GradientTransformation:
    """AdamW (pretraining, fine-tuning), LAMB (SparK) or LARS (linear probe) from
    config.optimizer.

    `optimizer.layer_decay` in (0, 1) turns on layer-wise lr decay; it needs `params` (or their
    abstract shapes) to number the layers. `optimizer.weight_decay_end` (optional) moves the
    weight decay on a per-step cosine from weight_decay to it over `total_steps` (default: the
    length of a `schedule` from make_schedule); unset, the weight decay is constant.
    """
    if opt_cfg.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={opt_cfg.name!r} is not supported; allowed: "
                         f"{list(OPTIMIZERS)}.")
    if total_steps is None:
        total_steps = getattr(schedule, "total_steps", None)
    weight_decay = weight_decay_rule(opt_cfg, total_steps)
    no_decay = tuple(opt_cfg.get("no_decay", DEFAULT_NO_DECAY))
    mask = lambda tree: decay_mask(tree, no_decay)
    parts = []
    if opt_cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    if opt_cfg.name == "lars":
        parts.append(lars(schedule, momentum=opt_cfg.get("momentum", 0.9),
                          weight_decay=weight_decay))
        return optax.chain(*parts)
    if opt_cfg.get("bias_correction", True):
        parts.append(optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2,
                                         eps=opt_cfg.get("eps", 1e-8)))
    else:
        parts.append(scale_by_adam_uncorrected(opt_cfg.b1, opt_cfg.b2, opt_cfg.get("eps", 1e-8)))
    if opt_cfg.name == "lamb":
        parts.append(decayed_weights(weight_decay, mask, trust_ratio=True,
                                     adapt_all=opt_cfg.get("trust_ratio") == "all"))
    elif callable(weight_decay):
        parts.append(decayed_weights(weight_decay, mask))
    else:  # the original AdamW chain, state and all
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    decay = opt_cfg.get("layer_decay", 1.0)
    if decay != 1.0:
        if params is None:
            raise ValueError("optimizer.layer_decay needs the parameter tree to number layers.")
        parts.append(scale_by_tree(layer_decay_scales(params, decay)))
    # adamw == scale_by_adam -> add_decayed_weights -> scale_by_learning_rate (optax's own
    # definition), written out so the layer scale can sit before the learning rate; lamb adds
    # the trust ratio after the decay, and the layer scale multiplies the lr as a group lr does.
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def _names(path):
    return [getattr(k, "key", str(k)) for k in path]


def _count_blocks(tree, prefix="block_"):
    return sum(1 for k in tree if k.startswith(prefix))


def _convnet_layer_rule(encoder):
    """(rule(names inside the encoder) -> layer id, top) for SparK's ConvNets, the reference's
    fine-tuning grouping (downstream_imagenet/models/__init__.py of keyu-tian/SparK).

    ResNet: the stem is layer 0, stage 0 layer 1, stages 1 and 2 in groups of b1 / b2 blocks
    (2 / 3 for ResNet-50 and -101, 4 / 4 for -152 and -200, 2 / 3 for other depths), stage 3
    layer N = 2 + groups, the head N + 1. ConvNeXt: the stem is 0, stages 0 and 1 are 1 and 2,
    stage 2 in groups of 3 blocks from 3, stage 3 N (12 when stage 2 has more than 9 blocks,
    else 6, raised for custom depths so ids stay increasing); a stage's downsampling goes with
    its first block; the head N + 1.
    """
    depths = [_count_blocks(encoder[f"stage_{i}"]) for i in range(4)]
    if "stem_bn" in encoder:  # ResNet
        group = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4),
                 (30, 48): (5, 6)}.get((depths[1], depths[2]), (2, 3))
        n1, n2 = (math.ceil(d / g) for d, g in zip(depths[1:3], group))
        top_block = 2 + n1 + n2

        def block_id(stage, block):
            return (1, 2 + block // group[0], 2 + n1 + block // group[1], top_block)[stage]
    else:  # ConvNeXt
        top_block = max(12 if depths[2] > 9 else 6, 3 + (depths[2] - 1) // 3 + 1)

        def block_id(stage, block):
            return (1, 2, 3 + block // 3, top_block)[stage]

    def rule(names):
        if not names[0].startswith("stage_"):
            return 0  # stem_conv, stem_bn / stem_norm
        stage = int(names[0][len("stage_"):])
        block = int(names[1][len("block_"):]) if names[1].startswith("block_") else 0
        return block_id(stage, block)
    return rule, top_block + 1


# What precedes the first block (layer 0): ViT / Swin, and the Multiway encoder's embeddings.
_EMBEDDINGS = ("patch_embed", "patch_norm", "cls_token", "mask_token", "pos_embed",
               "rel_pos_bias", "vision_pos_embed", "text_embed", "text_pos_embed")


def layer_ids(params):
    """Layer index of every parameter for layer-wise lr decay, and the top index.

    The references' rule: patch embedding, CLS / mask tokens and positions are layer 0, block
    i of a ViT is layer i + 1, everything after the last block (final norm, fc_norm, head) is
    the top layer, depth + 1. BEiT-3's Multiway encoder follows unilm's rule
    (get_num_layer_for_vit in beit3/optim_factory.py): every embedding (patch, text, vision
    and text positions, CLS and mask tokens) is layer 0, layer_i is i + 1, the rest the top.
    For Swin (SimMIM's rule) blocks are numbered across stages and a stage's patch merging
    sits with the last block of that stage. ResNet and ConvNeXt follow SparK's grouping
    (_convnet_layer_rule). Scanned ViT blocks (leading depth axis) get an id
    array of shape [depth, 1, ...]. Returns (ids tree, top).
    """
    encoder = params.get("encoder", params)
    convnet_rule = None
    if "transformer" in encoder:  # ViT
        blocks = encoder["transformer"]
        if "blocks" in blocks:
            depth = jax.tree.leaves(blocks["blocks"])[0].shape[0]
        else:
            depth = _count_blocks(blocks)
        stage_starts = None
    elif "text_embed" in encoder:  # Multiway
        depth = _count_blocks(encoder, "layer_")
        stage_starts = None
    elif "stem_conv" in encoder:  # ResNet / ConvNeXt
        convnet_rule, top = _convnet_layer_rule(encoder)
        depth = top - 1
    elif any(k.startswith("stage_") for k in encoder):  # Swin
        depths = [_count_blocks(encoder[f"stage_{i}"])
                  for i in range(sum(k.startswith("stage_") for k in encoder))]
        depth = sum(depths)
        stage_starts = np.concatenate([[0], np.cumsum(depths)])
    else:
        raise ValueError(f"layer-wise lr decay knows ViT, Swin, ResNet, ConvNeXt and Multiway "
                         f"encoders; got parameters {sorted(encoder)}.")
    top = depth + 1
    in_encoder = "encoder" in params

    def rule(path, leaf):
        names = _names(path)
        if in_encoder:
            if names[0] != "encoder":
                return top  # fc_norm, head, ...
            names = names[1:]
        if convnet_rule is not None:
            return convnet_rule(names)
        first = names[0]
        if first in _EMBEDDINGS:
            return 0
        if first.startswith("layer_"):  # Multiway
            return int(first[len("layer_"):]) + 1
        if first == "transformer":
            if names[1] == "blocks":
                n = leaf.shape[0]
                return np.arange(1, n + 1).reshape((n,) + (1,) * (leaf.ndim - 1))
            return int(names[1][len("block_"):]) + 1
        if first.startswith("stage_"):
            stage = int(first[len("stage_"):])
            if names[1] == "downsample":
                return int(stage_starts[stage + 1])
            return int(stage_starts[stage]) + int(names[1][len("block_"):]) + 1
        return top
    return jax.tree_util.tree_map_with_path(rule, params), top


def layer_decay_scales(params, decay: float):
    """Per-parameter lr multipliers decay ** (top - layer id) (1 for the head)."""
    ids, top = layer_ids(params)
    return jax.tree.map(lambda i: np.asarray(decay, np.float32) ** (top - np.asarray(i)), ids)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-parameter factor (layer-wise lr decay).

    Placed before the learning rate (and after weight decay is added), it scales the whole
    step of a parameter, which is what a per-group lr does in the PyTorch references.
    """
    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
    return optax.GradientTransformation(init_fn, update_fn)


class DecayState(NamedTuple):
    count: jax.Array  # updates applied so far: the weight-decay schedule's step


def _stacked(params):
    """True for leaves of scanned ViT blocks ('blocks'), whose leading axis is the depth."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "blocks" in _names(path), params)


class AdamMoments(NamedTuple):
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_uncorrected(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's m / (sqrt(v) + eps) without bias correction: timm's Lamb(bias_correction=False),
    which SparK fine-tunes ResNets with."""
    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return AdamMoments(mu=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return out, AdamMoments(mu=mu, nu=nu)
    return optax.GradientTransformation(init_fn, update_fn)


def decayed_weights(weight_decay: Union[float, Callable], mask, trust_ratio: bool = False,
                    adapt_all: bool = False) -> optax.GradientTransformation:
    """Adds weight_decay(step) x param to the update where `mask` (a tree or a function of the
    params) is True; with `trust_ratio`, LAMB's layer-wise adaptation then scales those
    updates by ||param|| / ||update|| (1 where either norm is 0).

    The LAMB rule is timm's (SparK's): no clip of the ratio, and only the decayed group is
    adapted, and only while its weight decay is non-zero; `adapt_all` (timm's always_adapt)
    adapts every tensor at every step. A scanned block's leaf is one tensor per block, so its
    norms are taken per entry of the leading depth axis.
    """
    wd_fn = weight_decay if callable(weight_decay) else (lambda step: weight_decay)

    def init_fn(params):
        del params
        return DecayState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters: pass params to tx.update.")
        wd = jnp.asarray(wd_fn(state.count), jnp.float32)
        masks = mask(params) if callable(mask) else mask
        stacked = _stacked(params)

        def leaf(u, p, decay, stack):
            if not (decay or (trust_ratio and adapt_all)):
                return u
            if decay:
                u = u + wd.astype(u.dtype) * p
            if not trust_ratio:
                return u
            axes = tuple(range(1, p.ndim)) if stack and p.ndim > 1 else None
            norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes,
                                              keepdims=axes is not None))
            w, g = norm(p), norm(u)
            adapt = (w > 0) & (g > 0) & ((wd != 0) | adapt_all)
            ratio = jnp.where(adapt, w / jnp.where(g > 0, g, 1.0), 1.0)
            return u * ratio.astype(u.dtype)
        updates = jax.tree.map(leaf, updates, params, masks, stacked)
        return updates, DecayState(count=optax.safe_increment(state.count))
    return optax.GradientTransformation(init_fn, update_fn)


def lars(schedule, *, momentum: float = 0.9, weight_decay: Union[float, Callable] = 0.0,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """LARS as in the MAE linear-probe code: weight decay and the trust ratio apply to
    matrices only (ndim > 1), momentum accumulates the unscaled step and the lr multiplies
    the momentum buffer (so a changing lr does not rescale past steps, unlike optax.lars).
    `weight_decay` may be a per-step schedule (make_weight_decay_schedule)."""
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    decay = (decayed_weights(weight_decay, matrices) if callable(weight_decay)
             else optax.add_decayed_weights(weight_decay, mask=matrices))
    return optax.chain(
        decay,
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
                     matrices),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(schedule))
