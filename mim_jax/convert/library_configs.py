"""The config files PyTorch libraries read next to exported weights: a transformers
config.json (ViTMAE, ViT, BEiT, Swin) and a timm config.json (what
`timm.create_model('local-dir:DIR', pretrained=True)` reads: architecture, model_args,
pretrained_cfg). Plain dicts built from mim_jax's resolved model configs; neither library is
imported here.

Settings mim_jax's models fix (exact GELU; LayerNorm epsilon 1e-6 for ViTs, 1e-5 for Swin)
are written out, so the libraries' defaults (transformers' BEiT: 1e-12) never apply.
"""
from __future__ import annotations

from typing import Optional, Sequence

from mim_jax.models import convnext, resnet, swin, vit

VIT_LAYER_NORM_EPS = 1e-6


def _hf_vit_common(arch: vit.ViTConfig) -> dict:
    return dict(hidden_size=arch.width, num_hidden_layers=arch.depth,
                num_attention_heads=arch.num_heads, intermediate_size=arch.mlp_dim,
                hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS, image_size=arch.image_size,
                patch_size=arch.patch_size, num_channels=arch.channels, qkv_bias=True,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_vit_mae(arch: vit.ViTConfig, *, decoder_width: int, decoder_depth: int,
               decoder_heads: int, decoder_mlp_dim: int, mask_ratio: float,
               norm_pix_loss: bool) -> dict:
    """ViTMAEForPreTraining (ViTMAEModel reads the encoder part)."""
    return dict(model_type="vit_mae", architectures=["ViTMAEForPreTraining"],
                **_hf_vit_common(arch), decoder_hidden_size=decoder_width,
                decoder_num_hidden_layers=decoder_depth,
                decoder_num_attention_heads=decoder_heads,
                decoder_intermediate_size=decoder_mlp_dim, mask_ratio=mask_ratio,
                norm_pix_loss=norm_pix_loss)


def hf_vit_simmim(arch: vit.ViTConfig) -> dict:
    """ViTForMaskedImageModeling (a plain ViT: q/k/v biases, no layer scale or relative
    positions; SimMIM's head predicts each patch's pixels, encoder_stride = patch size)."""
    return dict(model_type="vit", architectures=["ViTForMaskedImageModeling"],
                **_hf_vit_common(arch), encoder_stride=arch.patch_size)


def hf_beit(arch: vit.ViTConfig, *, abs_pos: bool, rel_pos: str,
            layer_scale: Optional[float], mask_token: bool,
            vocab_size: Optional[int] = None) -> dict:
    """BeitForMaskedImageModeling when `vocab_size` is given (the LM head; its final norm is the
    top-level `layernorm`, hence use_mean_pooling=True), else BeitModel (final norm inside)."""
    common = _hf_vit_common(arch)
    del common["qkv_bias"]  # BEiT always has q and v biases (zeros are the same model)
    out = dict(model_type="beit", **common,
               use_mask_token=mask_token, use_absolute_position_embeddings=abs_pos,
               use_shared_relative_position_bias=rel_pos == "shared",
               use_relative_position_bias=rel_pos == "per_layer",
               layer_scale_init_value=layer_scale if layer_scale else 0.0,
               drop_path_rate=0.0)
    if vocab_size is None:
        return dict(out, architectures=["BeitModel"], use_mean_pooling=False)
    return dict(out, architectures=["BeitForMaskedImageModeling"], use_mean_pooling=True,
                vocab_size=vocab_size)


def hf_swin(arch: swin.SwinConfig, *, masked_image_modeling: bool) -> dict:
    """SwinForMaskedImageModeling (the SimMIM head, encoder_stride = the model's stride) or
    SwinModel."""
    return dict(model_type="swin",
                architectures=["SwinForMaskedImageModeling" if masked_image_modeling
                               else "SwinModel"],
                image_size=arch.image_size, patch_size=arch.patch_size,
                num_channels=arch.channels, embed_dim=arch.embed_dim,
                depths=list(arch.depths), num_heads=list(arch.num_heads),
                window_size=arch.window_size, mlp_ratio=arch.mlp_ratio, qkv_bias=True,
                hidden_act="gelu", layer_norm_eps=arch.layer_norm_eps, drop_path_rate=0.0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                encoder_stride=arch.stride)


def _timm(architecture: str, model_args: dict, *, image_size: int, channels: int,
          mean: Sequence[float], std: Sequence[float], num_classes: int = 0) -> dict:
    """num_classes 0: no classifier (the encoder's features)."""
    return dict(architecture=architecture, num_classes=num_classes,
                model_args=dict(model_args, num_classes=num_classes),
                pretrained_cfg=dict(input_size=[channels, image_size, image_size],
                                    mean=list(mean), std=list(std), num_classes=num_classes,
                                    interpolation="bicubic", crop_pct=1.0))


def timm_vit(arch: vit.ViTConfig, *, mean, std, num_classes: int = 0) -> dict:
    """timm's VisionTransformer (the official MAE encoder's keys): the CLS token's output, or
    with `num_classes` a classifier over the average of the patch tokens, normalised by
    fc_norm instead of the final norm (mim_jax's fine-tuning with pool='gap')."""
    pool = dict(global_pool="avg", fc_norm=True) if num_classes else dict(global_pool="token")
    return _timm("vit_base_patch16_224", dict(
        img_size=arch.image_size, patch_size=arch.patch_size, in_chans=arch.channels,
        embed_dim=arch.width, depth=arch.depth, num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_dim / arch.width, qkv_bias=True, class_token=True, **pool),
        image_size=arch.image_size, channels=arch.channels, mean=mean, std=std,
        num_classes=num_classes)


def timm_beit(arch: vit.ViTConfig, *, abs_pos: bool, rel_pos: str,
              layer_scale: Optional[float], mean, std) -> dict:
    """timm's Beit (the official unilm BEiT encoder's keys), CLS-token output."""
    return _timm("beit_base_patch16_224", dict(
        img_size=arch.image_size, patch_size=arch.patch_size, in_chans=arch.channels,
        embed_dim=arch.width, depth=arch.depth, num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_dim / arch.width, qkv_bias=True, use_abs_pos_emb=abs_pos,
        use_rel_pos_bias=rel_pos == "per_layer", use_shared_rel_pos_bias=rel_pos == "shared",
        init_values=layer_scale or None, global_pool="token"),
        image_size=arch.image_size, channels=arch.channels, mean=mean, std=std)


def timm_convnet(arch, *, image_size: int, mean, std, num_classes: int = 0) -> dict:
    """timm's ResNet (bottleneck blocks) or ConvNeXt, with a classifier of `num_classes`."""
    common = dict(image_size=image_size, channels=arch.channels, mean=mean, std=std,
                  num_classes=num_classes)
    if isinstance(arch, resnet.ResNetConfig):
        return _timm("resnet50", dict(layers=list(arch.depths), channels=list(arch.widths),
                                      stem_width=arch.stem_width, in_chans=arch.channels),
                     **common)
    if isinstance(arch, convnext.ConvNeXtConfig):
        return _timm("convnext_tiny", dict(depths=list(arch.depths), dims=list(arch.dims),
                                           ls_init_value=arch.layer_scale_init,
                                           in_chans=arch.channels), **common)
    raise ValueError(f"no timm config for {type(arch).__name__}.")
