"""Optimizers, learning-rate schedules and weight-decay masks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Parameters the references exclude from weight decay besides biases and norm scales.
_NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "relative_position_bias_table")


def decay_mask(params):
    """True where weight decay applies: matrices/kernels, never biases, norms, tokens, pos-embed.

    Mirrors the reference rule (ndim <= 1 or a bias -> no decay) plus the named tokens; it is
    computed on shapes alone, so it works on abstract (eval_shape) trees too.
    """
    def rule(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] in _NO_DECAY_NAMES or names[-1] in ("bias", "scale"):
            return False
        if len(names) > 1 and names[-2] == "rel_pos_bias":  # our ViT's relative-position table
            return False
        # Scanned blocks carry a leading depth axis, so a stacked bias is 2-D: the name decides.
        return leaf.ndim > 1
    return jax.tree_util.tree_map_with_path(rule, params)


def peak_learning_rate(opt_cfg, global_batch_size: int) -> float:
    """lr = base_lr x global_batch / lr_batch_divisor (256 for MAE/BEiT, 512 for SimMIM)."""
    return opt_cfg.base_lr * global_batch_size / opt_cfg.lr_batch_divisor


def make_schedule(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    """Per-step linear warmup from 0, then half-cycle cosine down to min_lr (the MAE rule)."""
    warmup_steps = min(warmup_steps, total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cos = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(progress, 0, 1)))
        return jnp.where(step < warmup_steps, warm, cos)
    return schedule


def make_optimizer(opt_cfg, schedule) -> optax.GradientTransformation:
    if opt_cfg.name != "adamw":
        raise ValueError(f"optimizer.name={opt_cfg.name!r} is not supported; allowed: ['adamw'].")
    parts = []
    if opt_cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.get("eps", 1e-8),
                             weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
