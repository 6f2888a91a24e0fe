"""The PyTorch side of --mode compare_torch: transformers' models of the mim_jax config, each
one forward + backward + torch.optim.AdamW step per call (float32, train mode).

  MAE ViT     -> transformers.ViTMAEForPreTraining (it draws its own random masking)
  SimMIM Swin -> transformers.SwinForMaskedImageModeling, fed a bool_masked_pos drawn each
                 call by the rule of mim_jax.masking.simmim_mask
"""
from __future__ import annotations

import numpy as np

from mim_jax import flops


def hf_vitmae_config(config):
    """transformers.ViTMAEConfig of exactly the mim_jax model in `config`."""
    import transformers
    arch, obj = flops.vit_arch(config), config.objective
    return transformers.ViTMAEConfig(
        hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.num_heads,
        intermediate_size=arch.mlp_dim, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, image_size=arch.image_size,
        patch_size=arch.patch_size, num_channels=arch.channels, qkv_bias=True,
        decoder_hidden_size=obj.decoder_width, decoder_num_hidden_layers=obj.decoder_depth,
        decoder_num_attention_heads=obj.decoder_heads,
        decoder_intermediate_size=int(obj.decoder_width * obj.get("decoder_mlp_ratio", 4.0)),
        mask_ratio=obj.mask_ratio, norm_pix_loss=bool(obj.norm_pix_loss))


def hf_swin_config(config):
    """transformers.SwinConfig of the mim_jax Swin encoder in `config` (SimMIM head: stride)."""
    import transformers
    arch = flops.backbone_arch(config)
    return transformers.SwinConfig(
        image_size=arch.image_size, patch_size=arch.patch_size, num_channels=arch.channels,
        embed_dim=arch.embed_dim, depths=list(arch.depths), num_heads=list(arch.num_heads),
        window_size=arch.window_size, mlp_ratio=arch.mlp_ratio, qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=float(config.model.get("drop_path_rate", 0.0)), hidden_act="gelu",
        use_absolute_embeddings=False, layer_norm_eps=arch.layer_norm_eps,
        encoder_stride=arch.patch_size * 2 ** (len(arch.depths) - 1))


def simmim_bool_masked_pos(rng: np.random.Generator, batch_size: int, image_size: int,
                           mask_patch_size: int, model_patch_size: int,
                           mask_ratio: float) -> np.ndarray:
    """numpy twin of masking.simmim_mask: ceil(r x cells) random cells of the mask-patch grid
    per sample, upsampled to the model's patch grid -> [B, (image_size / patch)^2] bool."""
    side = image_size // mask_patch_size
    cells = side * side
    count = int(np.ceil(cells * mask_ratio))
    order = np.argsort(rng.random((batch_size, cells)), axis=1)
    cell_mask = np.zeros((batch_size, cells), bool)
    np.put_along_axis(cell_mask, order[:, :count], True, axis=1)
    scale = mask_patch_size // model_patch_size
    grid = cell_mask.reshape(batch_size, side, 1, side, 1)
    grid = np.broadcast_to(grid, (batch_size, side, scale, side, scale))
    return np.ascontiguousarray(grid.reshape(batch_size, (side * scale) ** 2))


def _adamw(model, config, no_decay_names=()):
    """torch.optim.AdamW with the reference's groups: no weight decay on biases, norms and
    tokens (ndim <= 1) nor on parameters whose name contains one of `no_decay_names`."""
    import torch
    opt = config.optimizer
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    skip = lambda n, p: p.ndim <= 1 or any(k in n for k in no_decay_names)
    decay = [p for n, p in named if not skip(n, p)]
    no_decay = [p for n, p in named if skip(n, p)]
    lr = opt.base_lr * config.batch_size / opt.lr_batch_divisor
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(opt.b1, opt.b2),
        eps=opt.get("eps", 1e-8))


def _nchw(images_nhwc):
    import torch
    return torch.from_numpy(
        np.array(np.transpose(np.asarray(images_nhwc), (0, 3, 1, 2)), order="C", copy=True))


class _TorchStep:
    """forward + backward + optimizer step of `self.model` on fixed pixels; subclasses say
    how the loss is computed."""

    def __init__(self, model, optimizer, images_nhwc):
        self.model, self.optimizer = model, optimizer
        self.pixels = _nchw(images_nhwc)
        self.loss = None

    def _loss(self):
        raise NotImplementedError

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        self.optimizer.step()
        self.loss = float(loss.detach())
        return self.loss

    def describe(self) -> dict:
        import torch
        import transformers
        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "model_class": type(self.model).__name__,
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "torch_threads": torch.get_num_threads(),
                "optimizer": "torch.optim.AdamW (default implementation)",
                "parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}


class TorchMAEStep(_TorchStep):
    """ViTMAEForPreTraining forward + backward + torch.optim.AdamW step (float32, train mode)."""

    def __init__(self, config, images_nhwc):
        import torch
        import transformers
        torch.manual_seed(config.seed)
        model = transformers.ViTMAEForPreTraining(hf_vitmae_config(config)).float().train()
        super().__init__(model, _adamw(model, config), images_nhwc)

    def _loss(self):
        return self.model(pixel_values=self.pixels).loss


class TorchSwinSimMIMStep(_TorchStep):
    """SwinForMaskedImageModeling forward + backward + torch.optim.AdamW step (float32, train
    mode), with a fresh SimMIM mask each call (as mim_jax draws one inside its step)."""

    def __init__(self, config, images_nhwc):
        import torch
        import transformers
        torch.manual_seed(config.seed)
        model = transformers.SwinForMaskedImageModeling(hf_swin_config(config)).float().train()
        super().__init__(model, _adamw(model, config, ("relative_position_bias_table",)),
                         images_nhwc)
        obj, arch = config.objective, flops.backbone_arch(config)
        self._rng = np.random.default_rng(config.seed)
        self._mask_args = (self.pixels.shape[0], arch.image_size, obj.mask_patch_size,
                           arch.patch_size, obj.mask_ratio)

    def _loss(self):
        import torch
        mask = torch.from_numpy(simmim_bool_masked_pos(self._rng, *self._mask_args))
        return self.model(pixel_values=self.pixels, bool_masked_pos=mask).loss


TORCH_STEPS = {("mae", "vit"): TorchMAEStep, ("simmim", "swin"): TorchSwinSimMIMStep}


def torch_step_class(config) -> type:
    """The PyTorch step of the config's objective / backbone; ValueError for other pairs."""
    pair = (config.objective.name, config.model.get("name", "vit"))
    if pair not in TORCH_STEPS:
        raise ValueError(
            f"objective.name={pair[0]!r} / model.name={pair[1]!r}: compare_torch compares the "
            "MAE ViT with transformers' ViTMAEForPreTraining (configs/mae.py) or the SimMIM "
            "Swin with SwinForMaskedImageModeling (configs/simmim.py:model=swin_b).")
    return TORCH_STEPS[pair]
