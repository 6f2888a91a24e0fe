"""Rematerialisation (activation checkpointing) of repeated blocks, by policy name.

model.remat chooses what a block keeps from its forward pass for the backward pass:
- 'none' (or False): everything (fastest, most memory);
- 'full' (or True): nothing but the block's input; the forward runs again in the backward pass;
- 'dots': the results of matrix multiplications (saves the large recomputations, keeps the
  big [tokens x width] products: a middle ground);
- 'dots_no_batch': only matmul results without a batch dimension (mostly weight-shaped).
"""
from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ALLOWED = (False, True, "none", *POLICIES)


def policy_name(value):
    """The policy of a model.remat value (None: no remat); ValueError naming the field.
    Booleans (also as the strings 'true' / 'false' from a command line) mean 'full' / 'none'."""
    text = value.lower() if isinstance(value, str) else value
    if text in (False, None, "none", "", "false"):
        return None
    if text in (True, "true"):
        return "full"
    if text in POLICIES:
        return text
    raise ValueError(f"model.remat={value!r}; allowed: {list(ALLOWED)}.")


def wrap(block_cls, remat, static_argnums):
    """`block_cls` itself, or its rematerialised version under the chosen policy. Arguments in
    `static_argnums` (counting self) must stay Python values, e.g. `deterministic`."""
    name = policy_name(remat)
    if name is None:
        return block_cls
    return nn.remat(block_cls, static_argnums=static_argnums, policy=POLICIES[name])
