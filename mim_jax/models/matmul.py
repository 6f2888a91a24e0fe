"""Matrix products of the transformer layers: full float32, or bfloat16 inputs with float32
accumulation (`model.matmul_precision`) for the layers' weights; and the softmax attention.

Why bfloat16 inputs: CPUs with AVX512-BF16 (and AMX) multiply bfloat16 pairs at about twice
the float32 rate when the products are summed in float32, but XLA's CPU backend takes that
path only for a dot whose inputs are bfloat16 and whose result is float32; it ignores
`precision=` on float32 inputs, and a bfloat16 x bfloat16 -> bfloat16 dot is slower than
float32. So `bf16_dot_general` rounds both inputs to bfloat16, accumulates in float32, and its
backward pass does the same for the two gradient products (JAX's own transpose of such a dot
would multiply the float32 cotangent by a bfloat16 operand: a float32 product again). Only
the products change: activations, norms, softmax, the loss and the parameters stay float32.
This is what TPUs do by default for float32 matmuls (one bfloat16 pass), so a run with it
sees the rounding a TPU run sees, except in the attention: the models multiply q k^T and p v
in the activations' own dtype (`vit.attend` says why).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mim_jax import blas
from mim_jax.models import activations

MATMUL_PRECISIONS = ("float32", "bfloat16", "auto")


def cpu_has_native_bf16() -> bool:
    """Whether this host's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16; Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(matmul_precision: str) -> str:
    """'float32' or 'bfloat16'. 'auto' is bfloat16 where that is faster - computing on a CPU
    with native bfloat16 products - and float32 elsewhere (a TPU already multiplies float32
    in bfloat16 passes by default; GPUs have their own fast paths)."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"model.matmul_precision={matmul_precision!r}; allowed: "
                         f"{list(MATMUL_PRECISIONS)}.")
    if matmul_precision != "auto":
        return matmul_precision
    fast = jax.default_backend() == "cpu" and cpu_has_native_bf16()
    return "bfloat16" if fast else "float32"


def dot_general_for(matmul_precision: str):
    """The dot_general of the layers: None (flax's default, lax.dot_general) or the bfloat16
    one."""
    if resolve_precision(matmul_precision) == "float32":
        return blas.dot_general  # lax.dot_general unless mim_jax.blas is enabled
    return bf16_dot_general


def _dims(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return (tuple(map(int, lc)), tuple(map(int, rc))), (tuple(map(int, lb)), tuple(map(int, rb)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _rounded_dot(lhs, rhs, dims, dtype, lhs_dtype, rhs_dtype):
    del lhs_dtype, rhs_dtype  # the cotangents' types, for the backward pass
    return plain_matmul(lhs.astype(dtype), rhs.astype(dtype), dims)


def _rounded_dot_fwd(lhs, rhs, dims, dtype, lhs_dtype, rhs_dtype):
    del lhs_dtype, rhs_dtype
    rounded = lhs.astype(dtype), rhs.astype(dtype)  # what the backward products need
    return plain_matmul(*rounded, dims), rounded


def _rounded_dot_bwd(dims, dtype, lhs_dtype, rhs_dtype, rounded, g):
    d_lhs, d_rhs = dot_transposes(g.astype(dtype), *rounded, dims)
    return d_lhs.astype(lhs_dtype), d_rhs.astype(rhs_dtype)


_rounded_dot.defvjp(_rounded_dot_fwd, _rounded_dot_bwd)


def plain_matmul(lhs, rhs, dims):
    """dot_general(lhs, rhs, dims) with float32 sums, computed as a batched [M, K] x [K, N]
    product of operands laid out that way. XLA's CPU backend multiplies bfloat16 into
    float32 only in its fast (YNNPACK) kernels; when this was written (BENCHMARKS.md section
    8) they took a contracted axis last on the left and first on the right, and for another
    layout XLA fell back to a kernel that has no such product ("Unsupported element type for
    DotThunk") — which is what the weight gradients, contracting the batch and token axes,
    would get. With jax 0.10.2 JAX's own form of d x runs in bfloat16 and this layout of it
    does not, so it serves the forward product and d W (equally fast there either way), and
    `dot_transposes` forms d x itself. The transposes are kept apart from the product (an
    optimisation barrier), or XLA would fold them back into it."""
    (lc, rc), (lb, rb) = dims
    lhs_free = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
    rhs_free = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
    lhs_order, rhs_order = list(lb) + lhs_free + list(lc), list(rb) + list(rc) + rhs_free
    moved = []
    for x, order in ((lhs, lhs_order), (rhs, rhs_order)):
        if order != list(range(x.ndim)):
            x = _barrier(jnp.transpose(x, order))
        moved.append(x)
    size = lambda x, axes: int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    batch, m, k, n = size(lhs, lb), size(lhs, lhs_free), size(lhs, lc), size(rhs, rhs_free)
    if not lb:  # a plain 2-D product: remat's dots_no_batch policy saves it
        out = lax.dot_general(moved[0].reshape(m, k), moved[1].reshape(k, n),
                              (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        out = lax.dot_general(moved[0].reshape(batch, m, k), moved[1].reshape(batch, k, n),
                              (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    return out.reshape([lhs.shape[a] for a in lb] + [lhs.shape[a] for a in lhs_free] +
                       [rhs.shape[a] for a in rhs_free])


def dot_transposes(g, lhs, rhs, dims):
    """Gradients of dot_general(lhs, rhs, dims) for the output cotangent `g`, each one
    product with float32 sums. The output's axes are: batch, lhs free, rhs free.

    d lhs = g . rhs^T is one dot_general in the form JAX's own transpose writes (rhs
    contracted on its free axes). Laid out [M, K] x [K, N] instead, with the layer's weight
    transposed behind a barrier, XLA (jax 0.10.2) converted that bfloat16 product to float32:
    the d x of the MAE ViT-B/16 step's MLP layers and of its decoder's embedding and
    prediction layers, 42 of its products, ran at
    134-235 GFLOP/s, against 547-1,048 in this form, and the step took 25% less time with it
    (BENCHMARKS.md section 15). d rhs keeps plain_matmul's layout, with its axes in the order
    of the operand it belongs to (d kernel = x^T g, not (g^T x)^T: XLA would turn the latter
    into a product that contracts its left operand's first axis)."""
    (lc, rc), (lb, rb) = dims
    lhs_free = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
    rhs_free = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
    nb = len(lb)
    g_batch = tuple(range(nb))
    g_lhs = tuple(range(nb, nb + len(lhs_free)))
    g_rhs = tuple(range(nb + len(lhs_free), g.ndim))
    # d lhs = g . rhs over rhs's free axes: batch, lhs free, then rhs's contracted axes in
    # increasing order, each standing for its lhs partner.
    d_lhs = lax.dot_general(g, rhs, ((g_rhs, tuple(rhs_free)), (g_batch, rb)),
                            preferred_element_type=jnp.float32)
    partner = dict(zip(rc, lc))
    d_lhs = _arrange(d_lhs, list(lb) + lhs_free + [partner[a] for a in sorted(rc)])
    # d rhs = lhs . g over lhs's free axes: batch, lhs's contracted axes (in increasing
    # order, each standing for its rhs partner), then rhs free.
    d_rhs = plain_matmul(lhs, g, ((tuple(lhs_free), g_lhs), (lb, g_batch)))
    partner = dict(zip(lc, rc))
    d_rhs = _arrange(d_rhs, list(rb) + [partner[a] for a in sorted(lc)] + rhs_free)
    return d_lhs, d_rhs


def _arrange(x, axes):
    """x, whose axis i is the target's axis axes[i], in the target's order."""
    order = np.argsort(axes)
    if list(order) == list(range(x.ndim)):
        return x
    return jnp.transpose(_barrier(x), order)  # not folded into the product


def _barrier(x):
    """Keeps a transpose apart from the product it feeds in a program for a CPU (see
    plain_matmul); other backends lay out their products themselves, and a barrier would
    only cost them copies (and, under FSDP, a second gather of a transposed kernel). Chosen
    when the step is lowered for its platform, not by the host's default backend, so a TPU
    program compiled ahead of time on a CPU host (mim_jax.aot) has none."""
    return lax.platform_dependent(x, cpu=lax.optimization_barrier, default=lambda y: y)


def rounded_dot_general(lhs, rhs, dimension_numbers, dtype=jnp.bfloat16,
                        preferred_element_type=None):
    """lax.dot_general on inputs rounded to `dtype`, accumulated in float32, forward and
    backward; the result has `preferred_element_type` or the inputs' promoted type."""
    out = _rounded_dot(lhs, rhs, _dims(dimension_numbers), jnp.dtype(dtype), lhs.dtype, rhs.dtype)
    return out.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None, **unused):
    """A drop-in `dot_general` (flax's `dot_general=` argument) with bfloat16 inputs."""
    del precision, unused
    return rounded_dot_general(lhs, rhs, dimension_numbers, jnp.bfloat16,
                               preferred_element_type)


# [B, Nq, H, D] x [B, Nk, H, D] -> [B, H, Nq, Nk]: batch (B, H), contract D.
_LOGITS_DIMS = (((3,), (3,)), ((0, 2), (0, 2)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def scaled_logits(q, k, scale: float):
    """(q * scale) k^T as [B, H, Nq, Nk] float32 logits of float32 q, k [B, N, H, D]: the
    forward pass is lax.dot_general's. In a program for a CPU the backward pass forms both
    gradients as products whose operands are laid out [M, K] x [K, N]: JAX's own transpose
    computes d k as d logits^T (q * scale), a batched product whose left operand is read
    transposed, and oneDNN ran that form at a quarter of its rate (21 of the MAE decoder
    attention's ~100 ms). Here d k = ((q * scale)^T d logits)^T, the small operand transposed
    instead (6 ms), and d q multiplies by k * scale rather than scaling its result (XLA
    materialised the broadcast scale for that). Programs for other platforms get JAX's own
    transposes. A custom_vjp: forward-mode (jvp, jacfwd) is not defined for it."""
    return _plain_logits(q, k, scale)


def _plain_logits(q, k, scale):
    return lax.dot_general(q * scale, k, _LOGITS_DIMS, preferred_element_type=jnp.float32)


def _scaled_logits_fwd(q, k, scale):
    return _plain_logits(q, k, scale), (q, k)


def _logits_grads_for_cpu(q, k, d_logits, scale):
    # d q [B, H, Nq, D] = d logits . (k * scale): batch (B, H), contract Nk.
    d_q = lax.dot_general(d_logits, k * scale, (((3,), (1,)), ((0, 1), (0, 2))))
    # d k^T [B, H, D, Nk] = (q * scale)^T . d logits: batch (B, H), contract Nq.
    d_k_t = lax.dot_general(q * scale, d_logits, (((1,), (2,)), ((0, 2), (0, 1))))
    return jnp.swapaxes(d_q, 1, 2), jnp.transpose(d_k_t, (0, 3, 1, 2))


def _logits_grads_by_jax(q, k, d_logits, scale):
    return jax.vjp(lambda q, k: _plain_logits(q, k, scale), q, k)[1](d_logits)


def _scaled_logits_bwd(scale, residuals, d_logits):
    q, k = residuals
    d_q, d_k = lax.platform_dependent(
        q, k, d_logits, cpu=functools.partial(_logits_grads_for_cpu, scale=scale),
        default=functools.partial(_logits_grads_by_jax, scale=scale))
    return d_q.astype(q.dtype), d_k.astype(k.dtype)


scaled_logits.defvjp(_scaled_logits_fwd, _scaled_logits_bwd)


def attention(q, k, v, bias=None, dot_general: Optional[callable] = None):
    """Softmax attention of q, k, v [B, N, heads, head_dim] -> [B, N, heads, head_dim], with an
    optional additive logit bias broadcastable to [B, heads, N, N].

    Mathematically jax.nn.dot_product_attention's XLA implementation (and the references'
    `(q * scale) @ k^T`), laid out for fewer copies: q is scaled before the product (N x
    head_dim values instead of N x N; with bfloat16 q one more rounding than scaling the
    logits), the logits come out as [B, heads, N, N] from one batched product, and the
    softmax is taken in float32. On a CPU its forward and backward ran 15-28% faster than
    jax.nn.dot_product_attention at MAE's shapes; with float32 q and k the logits' backward
    is `scaled_logits`' (so forward-mode autodiff is not defined there). It is the default
    on every backend (model.attention_impl=None); 'xla' and 'cudnn' select JAX's. The models
    call it without `dot_general` (`vit.attend` says why); the argument is for other
    callers' products."""
    dot = dot_general or lax.dot_general
    if dot_general is None and q.dtype == jnp.float32 and k.dtype == jnp.float32:
        logits = scaled_logits(q, k, float(q.shape[-1] ** -0.5))
    else:
        scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        logits_dot = dot
        if dot_general is None and q.dtype == jnp.bfloat16:
            # As jax.nn.dot_product_attention: bfloat16 q / k into float32 logits must name
            # the algorithm, or the backward pass mixes types (a GPU then runs it in float32 /
            # TF32).
            logits_dot = functools.partial(lax.dot_general,
                                           precision=lax.DotAlgorithmPreset.BF16_BF16_F32)
        logits = logits_dot(q * scale, k, _LOGITS_DIMS, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = activations.softmax(logits, -1, v.dtype)
    # [B, H, Nq, Nk] x [B, Nk, H, D] -> [B, H, Nq, D]: batch (B, H), contract Nk.
    out = dot(probs, v, (((3,), (1,)), ((0, 1), (0, 2))), preferred_element_type=v.dtype)
    return jnp.swapaxes(out, 1, 2)
