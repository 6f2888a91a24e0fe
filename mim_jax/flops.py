"""Analytic model FLOPs, for throughput and MFU reports: the counting helpers every objective
builds its own count from (Objective.forward_flops), and the devices' peaks.

Convention (the one behind the usual ViT figures: B/16 35.2, L/16 123.2, H/14 334.8 GFLOP per
224 px image): a multiply-add counts as 2 FLOPs, and only matrix multiplications are counted:
the patch embedding, every Dense layer, and the two attention products (Q K^T and A V).
Softmax, LayerNorm, GELU, bias adds, residuals, the loss and the optimizer update are left out;
they are memory-bound and would only inflate MFU. A training step counts 3x the forward pass
(forward + gradients of activations + gradients of weights), the usual MFU convention.

Per transformer block over n tokens of width d with MLP width m:
  qkv 6nd^2 + out-projection 2nd^2 + MLP 4ndm + attention 4n^2d
which is the familiar 24nd^2 + 4n^2d for m = 4d. Swin blocks attend within windows of w tokens,
so their attention term is 4nwd; its patch merging is a Dense from 4d to 2d on n/4 tokens.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from mim_jax import models
from mim_jax.models import vit

TRAIN_TO_FORWARD = 3.0


def dense_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def block_flops(tokens: int, width: int, mlp_dim: int, attended: Optional[int] = None) -> float:
    """Forward FLOPs of one pre-norm transformer block (matmuls only); each token attends to
    `attended` tokens (all `tokens` by default, the window size for Swin)."""
    attended = tokens if attended is None else attended
    projections = dense_flops(tokens, width, 3 * width) + dense_flops(tokens, width, width)
    mlp = dense_flops(tokens, width, mlp_dim) + dense_flops(tokens, mlp_dim, width)
    attention = 2 * 2.0 * tokens * attended * width  # Q K^T and A V, summed over heads
    return projections + mlp + attention


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    return depth * block_flops(tokens, width, mlp_dim)


def patch_embed_flops(arch) -> float:
    """The stride-p convolution is a Dense from p*p*C to the embedding width on every patch."""
    width = arch.width if hasattr(arch, "width") else arch.embed_dim
    return dense_flops(arch.num_patches, arch.patch_size**2 * arch.channels, width)


def vit_forward_flops(arch: vit.ViTConfig, cls_token: bool = True) -> dict:
    """Forward FLOPs per image of a ViT encoder on all patches (no classifier head)."""
    tokens = arch.num_patches + int(cls_token)
    return {"patch_embed": patch_embed_flops(arch),
            "encoder": transformer_flops(tokens, arch.width, arch.depth, arch.mlp_dim)}


def swin_forward_flops(arch) -> dict:
    """Forward FLOPs per image of a Swin encoder (a models.swin.SwinConfig) on all patches."""
    encoder = merging = 0.0
    for stage in range(arch.num_stages):
        tokens, width = arch.stage_resolution(stage)**2, arch.stage_dim(stage)
        encoder += arch.depths[stage] * block_flops(tokens, width, int(arch.mlp_ratio * width),
                                                    attended=arch.stage_window(stage)**2)
        if stage < arch.num_stages - 1:
            merging += dense_flops(tokens // 4, 4 * width, 2 * width)
    return {"patch_embed": patch_embed_flops(arch), "encoder": encoder,
            "patch_merging": merging}


def encoder_forward_flops(arch, cls_token: bool = True) -> dict:
    """Forward FLOPs per image of a ViT or Swin encoder on every patch; {} for a ConvNet,
    which has no analytic count."""
    if hasattr(arch, "embed_dim"):  # Swin
        return swin_forward_flops(arch)
    if hasattr(arch, "num_patches"):
        return vit_forward_flops(arch, cls_token)
    return {}


def vit_arch(config) -> vit.ViTConfig:
    """The encoder's resolved hyper-parameters (variant + overrides) of an experiment config."""
    model_cfg = config.model
    return vit.resolve_vit_config(
        model_cfg.variant, config.data.image_size, config.data.get("channels", 3),
        **{k: model_cfg.get(k) for k in ("patch_size", "width", "depth", "num_heads", "mlp_dim")})


def backbone_arch(config):
    """The resolved encoder hyper-parameters (ViTConfig, SwinConfig, ...) of an experiment
    config. A BEiT-3 run's Multiway encoder takes its vocabulary from objective.text."""
    extra = {}
    objective = config.get("objective")
    if config.model.get("name") == "multiway" and objective is not None and "text" in objective:
        extra["vocab_size"] = objective.text.vocab_size
    return models.backbone_from_config(config.model, config.data.image_size,
                                       config.data.get("channels", 3), **extra).config


def train_step_flops(forward: Mapping[str, float], forward_only: Sequence[str] = ()) -> float:
    """Train-step FLOPs per image from the forward ones by part: 3x forward, except for the
    parts that run forward only (a linear probe's frozen encoder)."""
    return sum(v if part in forward_only else TRAIN_TO_FORWARD * v
               for part, v in forward.items())


# Dense bf16 peak FLOP/s of one device (chip), by a lower-case substring of device_kind; the
# first match wins, so more specific names come first. Measured runs in float32 are still
# reported against the bf16 peak (the usual MFU convention).
PEAK_FLOPS_TABLE = (
    ("h100", 989e12),  # SXM; PCIe / NVL parts are excluded in peak_flops_for (lower peaks)
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports itself as "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e
    ("tpu v6e", 918e12),
)
_NOT_IN_TABLE = ("pcie", "nvl")


def peak_flops_for(device_kind: str, platform_name: str, override: Optional[float] = None):
    """-> (peak FLOP/s of one device or None, where the figure comes from)."""
    if override:
        return float(override), "given explicitly"
    kind = device_kind.lower()
    if platform_name == "cpu" or any(word in kind for word in _NOT_IN_TABLE):
        return None, f"no peak known for {device_kind!r} (give one explicitly)"
    for key, value in PEAK_FLOPS_TABLE:
        if key in kind:
            return value, f"table ({key}, bf16 dense)"
    return None, f"no peak known for {device_kind!r} (give one explicitly)"


def device_peak_flops(device) -> Optional[float]:
    """Table peak of one jax device, or None (CPUs, parts not in the table). For MFU over a
    mesh multiply by the device count: reporting.Progress takes the total peak."""
    return peak_flops_for(device.device_kind, device.platform)[0]
