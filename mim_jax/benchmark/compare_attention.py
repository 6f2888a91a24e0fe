"""--mode compare_attention: softmax attention alone (forward + backward, float32, CPU),
mim_jax's next to PyTorch's scaled_dot_product_attention, at the shapes of the config's model:
a ViT's encoder (on the visible tokens for MAE) and MAE's decoder, or each Swin stage's
windows (with the relative position bias, and the shift mask in shifted blocks).

Why a mode of its own: the whole-step comparison (compare_torch) says how far apart the two
steps are; this says how much of that is the attention core. PyTorch's eager form is timed
too, to tell a fused kernel's gain from that of its batched products (BENCHMARKS.md 10).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from mim_jax import cpu_dots, flops, masking
from mim_jax.benchmark.environment import environment
from mim_jax.benchmark.timing import call_summary, interleaved_calls, paired_ratios


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    label: str
    tokens: int
    heads: int
    head_dim: int
    layers: int  # how many times a train step runs it
    windows: int = 1  # attention calls per image (Swin: windows), batched together
    # None; 'shared': a trainable [1, heads, N, N] bias (Swin's relative position bias);
    # 'per_window': that bias plus a fixed per-window mask, broadcast to every image's
    # windows as mim_jax's Swin does in its shifted blocks.
    bias: Optional[str] = None


def attention_shapes(config) -> list:
    """The attention shapes of the config's model, one per distinct layer kind."""
    arch = flops.backbone_arch(config)
    if hasattr(arch, "embed_dim"):
        return _swin_shapes(arch)
    if not hasattr(arch, "num_patches"):  # ConvNets
        raise ValueError(f"model.name={config.model.get('name', 'vit')!r}: --mode "
                         "compare_attention measures ViT or Swin attention; allowed: a ViT or "
                         "Swin config.")
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


def _swin_shapes(arch) -> list:
    shapes, grid = [], arch.image_size // arch.patch_size
    for stage, (depth, heads) in enumerate(zip(arch.depths, arch.num_heads)):
        side = grid // 2 ** stage
        window = min(arch.window_size, side)  # a stage no larger than a window: one, unshifted
        shifted = depth // 2 if window < side else 0
        common = dict(tokens=window * window, heads=heads,
                      head_dim=arch.embed_dim * 2 ** stage // heads,
                      windows=(side // window) ** 2)
        shapes.append(AttentionShape(f"stage {stage + 1} windows", layers=depth - shifted,
                                     bias="shared", **common))
        if shifted:
            shapes.append(AttentionShape(f"stage {stage + 1} shifted windows", layers=shifted,
                                         bias="per_window", **common))
    return shapes


def _inputs(batch: int, shape: AttentionShape):
    """q, k, v, the output cotangent [batch x windows, N, heads, D], the trainable bias and
    the fixed mask (numpy, float32), the same on both sides."""
    rng = np.random.default_rng(0)
    calls = batch * shape.windows
    qkvg = [rng.standard_normal((calls, shape.tokens, shape.heads, shape.head_dim),
                                np.float32) for _ in range(4)]
    bias = mask = None
    if shape.bias:
        bias = rng.standard_normal((1, shape.heads, shape.tokens, shape.tokens), np.float32)
    if shape.bias == "per_window":  # Swin's shift mask: 0 or -100 between regions
        mask = np.where(rng.random((shape.windows, 1, shape.tokens, shape.tokens)) < 0.3,
                        -100.0, 0.0).astype(np.float32)
    return qkvg, bias, mask


def _full_bias(bias, mask, batch: int, xp_broadcast):
    """[1, H, N, N] bias (+ [nW, 1, N, N] mask) -> one per attention call, [B x nW, H, N, N]."""
    if mask is None:
        return bias
    per_window = bias + mask  # [nW, H, N, N]
    return xp_broadcast(per_window, batch)


def _jax_call(batch: int, shape: AttentionShape, impl, products: str = "xla"):
    """Forward + backward of mim_jax's attend, compiled for the products' library the train
    step would use (`products`: a config.cpu_dots choice): a call that returns the gradients
    of q, k, v and of the bias once they are computed, and the library it got."""
    import jax.numpy as jnp
    from mim_jax.models.vit import attend
    (q, k, v, g), bias, mask = _inputs(batch, shape)
    tile = lambda t, b: jnp.broadcast_to(t[None], (b,) + t.shape).reshape((-1,) + t.shape[1:])

    def fn(q, k, v, bias):
        full = None if bias is None else _full_bias(bias, mask, batch, tile)
        return attend(q, k, v, full, impl=impl)
    step = jax.jit(lambda q, k, v, bias, g: jax.vjp(fn, q, k, v, bias)[1](g))
    args = [jnp.asarray(a) if a is not None else None for a in (q, k, v, bias, g)]
    compiled, library = cpu_dots.compile_step(step.lower(*args), products)
    return (lambda: jax.block_until_ready(compiled(*args))), library


def _torch_call(batch: int, shape: AttentionShape, fused: bool):
    import torch
    (q, k, v, g), bias, mask = _inputs(batch, shape)
    # torch's layout: [calls, heads, N, D]
    q, k, v = (torch.from_numpy(t).transpose(1, 2).contiguous().requires_grad_()
               for t in (q, k, v))
    g = torch.from_numpy(g).transpose(1, 2).contiguous()
    bias = torch.from_numpy(bias).requires_grad_() if bias is not None else None
    mask = torch.from_numpy(mask) if mask is not None else None
    tile = lambda t, b: t.unsqueeze(0).expand((b,) + tuple(t.shape)).reshape((-1,) + t.shape[1:])

    def call():
        full = None if bias is None else _full_bias(bias, mask, batch, tile)
        if fused:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full)
        else:  # what a model without SDPA computes
            logits = (q * shape.head_dim ** -0.5) @ k.transpose(-1, -2)
            if full is not None:
                logits = logits + full
            out = torch.softmax(logits, dim=-1) @ v
        out.backward(g)
        grads = [None if t is None else t.grad for t in (q, k, v, bias)]
        for t in (q, k, v, bias):
            if t is not None:
                t.grad = None
        return grads  # q, k, v in torch's [calls, heads, N, D] layout
    return call


def run_compare_attention(config, threads: int, steps: int, warmup: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    if jax.devices()[0].platform != "cpu":
        raise ValueError("--mode=compare_attention compares on the CPU; run with "
                         "JAX_PLATFORMS=cpu.")
    batch = config.batch_size
    products = config.get("cpu_dots", "auto")
    rows, libraries = [], set()
    for shape in attention_shapes(config):
        fns = {}
        for name, impl in (("mim_jax", None), ("mim_jax xla", "xla")):
            fns[name], library = _jax_call(batch, shape, impl, products)
            libraries.add(library)
        fns.update({"torch sdpa": _torch_call(batch, shape, True),
                    "torch eager": _torch_call(batch, shape, False)})
        calls = interleaved_calls(fns, steps, warmup)
        summary = {name: call_summary(c) for name, c in calls.items()}
        rows.append({
            "shape": dataclasses.asdict(shape),
            "times": summary,
            "sdpa_over_mim_jax_paired": paired_ratios(calls["torch sdpa"], calls["mim_jax"],
                                                      "wall_s"),
            "per_step_s": {name: s["median_s"] * shape.layers for name, s in summary.items()},
            "flops": (4 * 3 * batch * shape.windows * shape.heads * shape.tokens ** 2
                      * shape.head_dim),
        })
    return {"mode": "compare_attention", "environment": environment(threads), "batch": batch,
            "shapes": rows, "products": "/".join(sorted(libraries)),
            "method": "forward + backward (gradients of q, k, v and of the bias where there is "
                      "one) of one attention call, float32, mim_jax's compiled for the "
                      "products' library of the train step (config.cpu_dots), "
                      "timed interleaved; per step = median x the layers that run it; FLOPs: "
                      "the two products, x3 for the backward"}

