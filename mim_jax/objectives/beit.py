"""BEiT (Bao et al. 2022) and BEiT v2 (Peng et al. 2022): blockwise-masked patches replaced by
a learned token, and cross-entropy over a frozen tokenizer's visual tokens at the masked
positions.

v1 predicts DALL-E dVAE tokens of a 112 px view (objective.tokenizer.name='dall_e'); v2 predicts
VQ-KD tokens of the same image (name='vqkd') and may add the CLS-pretraining head: two blocks
over [final CLS, block `early_layers`'s patch tokens] whose masked tokens go through the same
norm and LM head, a second cross-entropy added to the first.

The tokenizer is frozen: its weights live in the train state's model_state (read once by
mim_jax.pretrained into a fresh run, then checkpointed with it) and its ids are computed inside
the jitted step.
Deliberate difference from v1's reference: the tokenizer view is resized on device from the
model's crop (lanczos3) instead of being a second PIL resize of the same crop.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mim_jax import flops, masking, models
from mim_jax.models import vit
from mim_jax.objectives.base import Frozen, Objective, make_rngs


class BEiT(nn.Module):
    encoder: vit.ViT  # use_mask_token=True, cls_token=True
    vocab_size: int
    # BEiT v2's CLS-pretraining head: number of blocks (0 = off) over block `early_layers`.
    cls_head_layers: int = 0
    early_layers: int = 9

    @nn.compact
    def __call__(self, images, token_mask, *, train: bool = False):
        """-> logits [B, L, vocab] for every patch (and the CLS head's, or None)."""
        enc = self.encoder
        lm_head = nn.Dense(self.vocab_size, dtype=enc.dtype, param_dtype=enc.param_dtype,
                           dot_general=enc.dot_general,
                           kernel_init=vit.beit_trunc_normal(), name="lm_head")
        if not self.cls_head_layers:
            tokens = enc(images, token_mask=token_mask, train=train)
            return lm_head(tokens[:, 1:]), None
        # The head needs the final CLS and the early patch states before the final norm.
        final, early = enc(images, token_mask=token_mask, train=train, capture=self.early_layers)
        cfg = enc.config
        head = vit.Transformer(
            depth=self.cls_head_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
            drop_path_rate=enc.drop_path_rate, qkv_bias=enc.qkv_bias,
            layer_scale_init=enc.layer_scale_init, dtype=enc.dtype, param_dtype=enc.param_dtype,
            # The reference creates these blocks after its init has run: PyTorch's default
            # Linear init, then only the depth rescale (fix_init_cls_pt_weight).
            init_style="torch", dot_general=enc.dot_general,
            attention_fn=enc.attention_fn, activation=enc.activation,
            rate_depth=max(cfg.depth, self.early_layers + self.cls_head_layers),
            rate_offset=self.early_layers,
            # with per-layer tables (fine-tuning layout) the head's blocks have their own too
            rel_pos_grid=cfg.grid if enc.rel_pos_bias == "per_layer" else None,
            rel_pos_cls=enc.cls_token, name="cls_head")
        bias = enc.relative_position_bias()
        x = head(jnp.concatenate([final[:, :1], early[:, 1:]], axis=1),
                 deterministic=not train, attn_bias=bias)
        norm = enc.norm  # shared with the main branch (shared_lm_head, as the reference)
        return lm_head(norm(final)[:, 1:]), lm_head(norm(x)[:, 1:])


def masked_cross_entropy(logits, labels, mask):
    """Mean cross-entropy over the masked positions of the whole batch (the reference selects
    x[bool_masked_pos] and averages), and the fraction of them predicted exactly."""
    mask = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(ce * mask) / count, jnp.sum(hits * mask) / count


def most_frequent_token_accuracy(labels, mask, vocab_size: int):
    """Accuracy of always answering the batch's most frequent masked token: the constant guess
    a learning model must beat (chance is 1 / vocab)."""
    mask = mask.astype(jnp.float32)
    counts = jnp.zeros(vocab_size, jnp.float32).at[labels.reshape(-1)].add(mask.reshape(-1))
    return jnp.max(counts) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_mask_config(m, grid: int) -> None:
    total = grid * grid
    n = m.num_masking_patches
    if not isinstance(n, int) or not 0 < n < total:
        raise ValueError(f"objective.mask.num_masking_patches={n!r} must be an integer in "
                         f"[1, {total - 1}] (the patch grid is {grid}x{grid}).")
    low = m.min_num_patches
    if not isinstance(low, int) or not 1 <= low <= n:
        raise ValueError(f"objective.mask.min_num_patches={low!r} must be an integer in "
                         f"[1, num_masking_patches={n}].")


def _images_01(images, data_cfg):
    """Normalised pixels back to [0, 1], the range every tokenizer is defined on."""
    mean = jnp.asarray(data_cfg.mean, jnp.float32)
    std = jnp.asarray(data_cfg.std, jnp.float32)
    return jnp.clip(images.astype(jnp.float32) * std + mean, 0.0, 1.0)


def needs(config) -> dict:
    """The frozen tokenizer objective.tokenizer names, kept in model_state['tokenizer']."""
    del config
    return {"tokenizer": Frozen(kind="tokenizer", source="objective.tokenizer",
                                into=("model_state", "tokenizer"))}


def build(config, frozen) -> Objective:
    """`frozen`: needs(config) resolved (mim_jax.pretrained): the tokenizer's module."""
    obj_cfg, data_cfg, model_cfg = config.objective, config.data, config.model
    if model_cfg.get("name", "vit") != "vit":
        raise ValueError(f"model.name={model_cfg.get('name')!r}: BEiT needs model.name='vit'.")
    if not model_cfg.get("cls_token", True):
        raise ValueError("model.cls_token=False: BEiT's encoder has a CLS token.")
    encoder = models.vit_from_config(model_cfg, data_cfg.image_size, data_cfg.channels,
                                     use_mask_token=True)
    arch = encoder.config
    grid = arch.grid
    tokenizer = frozen["tokenizer"].part
    if tokenizer.grid != grid:
        raise ValueError(
            f"objective.tokenizer gives a {tokenizer.grid}x{tokenizer.grid} token grid but the "
            f"model's patch grid is {grid}x{grid} (data.image_size={data_cfg.image_size}, "
            f"patch {arch.patch_size}): they must match.")
    m = obj_cfg.mask
    _check_mask_config(m, grid)
    head_layers = obj_cfg.get("cls_head_layers", 0)
    early = obj_cfg.get("early_layers", 9)
    if head_layers and not 1 <= early <= arch.depth:
        raise ValueError(f"objective.early_layers={early!r} must be a block number in "
                         f"[1, {arch.depth}].")
    model = BEiT(encoder=encoder, vocab_size=tokenizer.vocab_size, cls_head_layers=head_layers,
                 early_layers=early)
    image_shape = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)

    def draw_mask(key, batch_size):
        return masking.block_mask(
            key, batch_size, grid, grid, m.num_masking_patches,
            min_num_patches=m.min_num_patches, max_num_patches=m.get("max_num_patches"),
            min_aspect=m.get("min_aspect", 0.3), max_aspect=m.get("max_aspect"),
            exact=m.get("exact", False))

    def init_fn(rng):
        model_rng, tok_rng = jax.random.split(rng)
        images = jnp.zeros((1, *image_shape), jnp.float32)
        params = model.init({"params": model_rng, **make_rngs(model_rng)}, images,
                            jnp.zeros((1, grid * grid), bool), train=False)["params"]
        if model_cfg.get("init_style", "xavier") == "beit":
            enc = params["encoder"]
            params = dict(params, encoder=dict(
                enc, transformer=vit.rescale_beit_init(enc["transformer"])))
            if head_layers:  # the head's blocks continue the depth count
                params = dict(params, cls_head=vit.rescale_beit_init(params["cls_head"],
                                                                     early + 1))
        tok_params = tokenizer.module.init(tok_rng, images, method="encode")["params"]
        return params, {"tokenizer": tok_params}

    def loss_fn(params, model_state, batch, rngs, train: bool, with_outputs: bool = False, *,
                token_mask=None, labels=None):
        images = batch["image"]
        if token_mask is None:
            token_mask = draw_mask(rngs["mask"], images.shape[0])
        if labels is None:
            labels = batch.get("tokens")  # ids tokenized ahead of time, if the batch has them
        if labels is None:
            labels = tokenizer.encode(model_state["tokenizer"],
                                      _images_01(images, data_cfg))
        labels = jax.lax.stop_gradient(labels)
        logits, cls_logits = model.apply({"params": params}, images, token_mask, train=train,
                                         rngs=rngs)
        loss, accuracy = masked_cross_entropy(logits, labels, token_mask)
        metrics = {"mim_loss": loss, "mim_accuracy": accuracy,
                   "mim_accuracy_most_frequent_token": most_frequent_token_accuracy(
                       labels, token_mask, tokenizer.vocab_size),
                   "mask_ratio": jnp.mean(token_mask.astype(jnp.float32))}
        if cls_logits is not None:
            cls_loss, cls_accuracy = masked_cross_entropy(cls_logits, labels, token_mask)
            loss = loss + cls_loss
            metrics.update(cls_head_loss=cls_loss, cls_head_accuracy=cls_accuracy)
        metrics["loss"] = loss
        aux = {"metrics": metrics, "model_state": model_state}
        if with_outputs:
            aux["outputs"] = {"logits": logits, "labels": labels, "mask": token_mask}
        return loss, aux

    return Objective(name="beit", model=model, loss_fn=loss_fn, encoder_keys=("encoder",),
                     image_shape=image_shape,
                     init_args=lambda b: (jnp.zeros((b, grid * grid), bool),),
                     init_fn=init_fn,
                     forward_flops=forward_flops(arch, tokenizer.vocab_size, head_layers))


def forward_flops(arch: vit.ViTConfig, vocab_size: int, head_layers: int) -> dict:
    """The encoder on every patch + CLS, the LM head on every patch (as the model computes it),
    and v2's CLS head (its blocks on 1 + L tokens, then the LM head again). The frozen tokenizer
    is not counted: it is not part of the trained model."""
    out = dict(flops.vit_forward_flops(arch, True),
               lm_head=flops.dense_flops(arch.num_patches, arch.width, vocab_size))
    if head_layers:
        out["cls_head"] = flops.transformer_flops(arch.num_patches + 1, arch.width, head_layers,
                                                  arch.mlp_dim)
        out["cls_head_lm_head"] = out["lm_head"]
    return out


__all__ = ["BEiT", "build", "masked_cross_entropy", "most_frequent_token_accuracy", "needs"]
