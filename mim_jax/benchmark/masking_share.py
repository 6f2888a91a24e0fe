"""The share of a train step spent in masking: the objective's masking work, timed alone."""
from __future__ import annotations

import dataclasses
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from mim_jax import flops, masking, sharding
from mim_jax.benchmark.timing import call_summary, measure_each


@dataclasses.dataclass(frozen=True)
class MaskingWork:
    """The masking work of one train step, isolated: `forward(key, *inputs)` ->
    (outputs, aux); inputs and outputs are float arrays of the given shapes."""
    forward: Callable
    inputs: Tuple[Tuple[int, ...], ...]
    outputs: Tuple[Tuple[int, ...], ...]


def mae_masking_work(batch_size: int, num_patches: int, mask_ratio: float, enc_width: int,
                     dec_width: int) -> MaskingWork:
    """random_masking, the encoder's gather of the visible tokens and the decoder's unshuffle
    (mask tokens appended, then gathered back into patch order)."""
    keep = masking.num_visible(num_patches, mask_ratio)

    def forward(key, enc_tokens, dec_visible, mask_token):
        m = masking.random_masking(key, batch_size, num_patches, mask_ratio)
        kept = jnp.take_along_axis(enc_tokens, m.ids_keep[..., None], axis=1)
        fill = jnp.broadcast_to(mask_token, (batch_size, num_patches - keep, dec_width))
        full = jnp.concatenate([dec_visible, fill], axis=1)
        unshuffled = jnp.take_along_axis(full, m.ids_restore[..., None], axis=1)
        return (kept, unshuffled), m.mask

    return MaskingWork(
        forward, inputs=((batch_size, num_patches, enc_width), (batch_size, keep, dec_width),
                         (1, 1, dec_width)),
        outputs=((batch_size, keep, enc_width), (batch_size, num_patches, dec_width)))


def simmim_masking_work(batch_size: int, image_size: int, mask_patch_size: int,
                        patch_size: int, mask_ratio: float, width: int) -> MaskingWork:
    """simmim_mask and the replacement of the masked patch embeddings by the mask token."""
    tokens = (image_size // patch_size)**2

    def forward(key, embeddings, mask_token):
        token_mask = masking.simmim_mask(key, batch_size, image_size, mask_patch_size,
                                         patch_size, mask_ratio)
        w = token_mask[..., None].astype(embeddings.dtype)
        return (embeddings * (1 - w) + mask_token * w,), token_mask

    return MaskingWork(forward, inputs=((batch_size, tokens, width), (1, 1, width)),
                       outputs=((batch_size, tokens, width),))


def beit_masking_work(batch_size: int, grid: int, mask_cfg, width: int) -> MaskingWork:
    """block_mask (BEiT's blockwise masking) and the replacement of the masked patch
    embeddings by the mask token."""
    def forward(key, embeddings, mask_token):
        token_mask = masking.block_mask(
            key, batch_size, grid, grid, mask_cfg.num_masking_patches,
            min_num_patches=mask_cfg.min_num_patches,
            max_num_patches=mask_cfg.get("max_num_patches"),
            min_aspect=mask_cfg.get("min_aspect", 0.3), max_aspect=mask_cfg.get("max_aspect"),
            exact=mask_cfg.get("exact", False))
        w = token_mask[..., None].astype(embeddings.dtype)
        return (embeddings * (1 - w) + mask_token * w,), token_mask

    tokens = grid * grid
    return MaskingWork(forward, inputs=((batch_size, tokens, width), (1, 1, width)),
                       outputs=((batch_size, tokens, width),))


def masking_work_for(config) -> MaskingWork:
    if config.get("finetune") is not None:
        raise ValueError("fine-tuning masks nothing: no masking share.")
    obj, arch = config.objective, flops.backbone_arch(config)
    if obj.name == "mae":
        return mae_masking_work(config.batch_size, arch.num_patches, obj.mask_ratio,
                                arch.width, obj.decoder_width)
    if obj.name == "simmim":
        width = arch.embed_dim if hasattr(arch, "embed_dim") else arch.width
        return simmim_masking_work(config.batch_size, arch.image_size, obj.mask_patch_size,
                                   arch.patch_size, obj.mask_ratio, width)
    if obj.name == "beit":
        return beit_masking_work(config.batch_size, arch.grid, obj.mask, arch.width)
    raise ValueError(f"objective.name={obj.name!r}: no masking workload defined; "
                     "supported: ['mae', 'simmim', 'beit'].")


def masking_program(work: MaskingWork, with_backward: bool):
    """(key, inputs, cotangents) -> outputs (and, with the backward, the input gradients: the
    scatter-adds / selects the train step runs for the masking)."""
    def program(key, inputs, cotangents):
        if not with_backward:
            return work.forward(key, *inputs)
        outs, vjp, aux = jax.vjp(lambda *a: work.forward(key, *a), *inputs, has_aux=True)
        return outs, aux, vjp(cotangents)
    return program


def measure_masking(config, mesh, steps: int, warmup: int) -> dict:
    work = masking_work_for(config)
    rows, repl = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    keys = iter(jax.random.split(jax.random.key(7), len(work.inputs) + len(work.outputs)))
    place = lambda shape: jax.device_put(
        jax.random.normal(next(keys), shape), rows if shape[0] == config.batch_size else repl)
    inputs = tuple(place(s) for s in work.inputs)
    cotangents = tuple(place(s) for s in work.outputs)
    out = {}
    for label, backward in (("forward", False), ("forward_backward", True)):
        args = (jax.random.key(3), inputs, cotangents)
        compiled = jax.jit(masking_program(work, backward)).lower(*args).compile()
        calls = measure_each(lambda: jax.block_until_ready(compiled(*args)), steps, warmup)
        out[label] = call_summary(calls)
    return out

