"""--mode compare_attention: softmax attention alone (forward + backward, float32, CPU),
mim_jax's next to PyTorch's scaled_dot_product_attention, at the shapes of the config's ViT:
its encoder (on the visible tokens for MAE) and MAE's decoder.

Why a mode of its own: the whole-step comparison (compare_torch) says how far apart the two
steps are; this says how much of that is the attention core, the part where PyTorch has a
fused CPU kernel (flash attention) and XLA composes batched products and a softmax.
"""
from __future__ import annotations

import dataclasses

import jax

from mim_jax import flops, masking
from mim_jax.benchmark.environment import environment
from mim_jax.benchmark.timing import call_summary, interleaved_calls, paired_ratios


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    label: str
    tokens: int
    heads: int
    head_dim: int
    layers: int  # how many times a train step runs it


def attention_shapes(config) -> list:
    """The attention shapes of the config's ViT, one per distinct layer kind."""
    arch = flops.backbone_arch(config)
    if not hasattr(arch, "num_patches") or not hasattr(arch, "width"):  # Swin, ConvNets
        raise ValueError(f"model.name={config.model.get('name', 'vit')!r}: --mode "
                         "compare_attention measures ViT attention; allowed: a ViT config.")
    obj = config.objective
    head_dim = arch.width // arch.num_heads
    if obj.name != "mae":
        return [AttentionShape("encoder", arch.num_patches + 1, arch.num_heads, head_dim,
                               arch.depth)]
    visible = masking.num_visible(arch.num_patches, obj.mask_ratio)
    return [AttentionShape("encoder (visible tokens)", visible + 1, arch.num_heads, head_dim,
                           arch.depth),
            AttentionShape("decoder", arch.num_patches + 1, obj.decoder_heads,
                           obj.decoder_width // obj.decoder_heads, obj.decoder_depth)]


def _jax_call(batch: int, shape: AttentionShape, impl):
    """Forward + backward of mim_jax's attend; blocks on the gradients."""
    import jax.numpy as jnp
    from mim_jax.models.vit import attend
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, g = (jax.random.normal(key, (batch, shape.tokens, shape.heads, shape.head_dim),
                                    jnp.float32) for key in keys)
    step = jax.jit(lambda q, k, v, g: jax.vjp(lambda *a: attend(*a, impl=impl), q, k, v)[1](g))
    return lambda: jax.block_until_ready(step(q, k, v, g))


def _torch_call(batch: int, shape: AttentionShape, fused: bool):
    import torch
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, shape.heads, shape.tokens, shape.head_dim, generator=gen,
                           requires_grad=True) for _ in range(3))
    g = torch.randn(batch, shape.heads, shape.tokens, shape.head_dim, generator=gen)

    def call():
        if fused:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:  # what a model without SDPA computes
            logits = (q * shape.head_dim ** -0.5) @ k.transpose(-1, -2)
            out = torch.softmax(logits, dim=-1) @ v
        out.backward(g)
        q.grad = k.grad = v.grad = None
    return call


def run_compare_attention(config, threads: int, steps: int, warmup: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    if jax.devices()[0].platform != "cpu":
        raise ValueError("--mode=compare_attention compares on the CPU; run with "
                         "JAX_PLATFORMS=cpu.")
    batch = config.batch_size
    rows = []
    for shape in attention_shapes(config):
        fns = {"mim_jax": _jax_call(batch, shape, None),
               "mim_jax xla": _jax_call(batch, shape, "xla"),
               "torch sdpa": _torch_call(batch, shape, True),
               "torch eager": _torch_call(batch, shape, False)}
        calls = interleaved_calls(fns, steps, warmup)
        summary = {name: call_summary(c) for name, c in calls.items()}
        rows.append({
            "shape": dataclasses.asdict(shape),
            "times": summary,
            "sdpa_over_mim_jax_paired": paired_ratios(calls["torch sdpa"], calls["mim_jax"],
                                                      "wall_s"),
            "per_step_s": {name: s["median_s"] * shape.layers for name, s in summary.items()},
            "flops": 4 * 3 * batch * shape.heads * shape.tokens ** 2 * shape.head_dim,
        })
    return {"mode": "compare_attention", "environment": environment(threads), "batch": batch,
            "shapes": rows,
            "method": "forward + backward (gradients of q, k, v) of one attention call, float32, "
                      "timed interleaved; per step = median x the layers that run it; FLOPs: "
                      "the two products, x3 for the backward"}

