"""The PyTorch side of compare_torch: transformers' models of the mim_jax config, each one
forward + backward + torch.optim.AdamW step per call (float32, train mode).

  MAE ViT     -> transformers.ViTMAEForPreTraining (it draws its own random masking)
  SimMIM Swin -> transformers.SwinForMaskedImageModeling, fed a bool_masked_pos drawn each
                 call by the rule of mim_jax.masking.simmim_mask
  BEiT ViT    -> transformers.BeitForMaskedImageModeling (+ v2's CLS head, built from its
                 BeitLayer), fed a blockwise bool_masked_pos drawn each call by the rule of
                 mim_jax.masking.block_mask and random token ids as labels (HF has no
                 tokenizer: the mim_jax step it is compared with reads precomputed 'tokens')
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


def hf_beit_config(config, vocab_size: int):
    """transformers.BeitConfig of exactly the mim_jax BEiT encoder in `config`: mask token, no
    absolute positions, one relative position bias shared by all blocks, layer scale, q / v
    biases (HF's BEiT has no k bias; mim_jax's 'qv' keeps a k slot fixed at zero)."""
    import transformers
    arch, model = flops.vit_arch(config), config.model
    if model.get("qkv_bias") != "qv" or model.get("pos_embed") != "none" \
            or model.get("rel_pos_bias") != "shared" or not model.get("layer_scale_init"):
        raise ValueError("compare_torch's BEiT is HF's BeitForMaskedImageModeling: it needs "
                         "model.qkv_bias='qv', pos_embed='none', rel_pos_bias='shared' and a "
                         "layer_scale_init (configs/beit.py).")
    return transformers.BeitConfig(
        vocab_size=vocab_size, hidden_size=arch.width, num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads, intermediate_size=arch.mlp_dim, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
        image_size=arch.image_size, patch_size=arch.patch_size, num_channels=arch.channels,
        use_mask_token=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=True,
        layer_scale_init_value=float(model.layer_scale_init),
        drop_path_rate=float(model.get("drop_path_rate", 0.0)), use_mean_pooling=True)


def reference_block_mask(rng: np.random.Generator, grid_h: int, grid_w: int,
                         num_masking_patches: int, min_num_patches: int = 16,
                         max_num_patches=None, min_aspect: float = 0.3, max_aspect=None,
                         exact: bool = False) -> np.ndarray:
    """One mask by the reference's MaskingGenerator rule, in numpy (the host-side twin of
    masking.block_mask; tests/test_masking_beit.py compares their distributions): rectangles of
    area ~ U(min, budget) and log-uniform aspect, up to 10 attempts per step, the first inside
    the grid that adds 1..budget new patches kept, until the target or a step with none kept;
    exact=True (v2) fills the shortfall with random unmasked patches. -> [grid_h * grid_w] bool,
    row-major."""
    target = num_masking_patches
    max_patches = target if max_num_patches is None else max_num_patches
    log_lo, log_hi = np.log(min_aspect), np.log(max_aspect or 1 / min_aspect)
    mask = np.zeros((grid_h, grid_w), bool)
    count = 0
    while count < target:
        budget = min(target - count, max_patches)
        added = 0
        for _ in range(10):
            # lo + (hi - lo) * u, as random.uniform: valid when budget < min_num_patches
            area = min_num_patches + (budget - min_num_patches) * rng.random()
            aspect = np.exp(rng.uniform(log_lo, log_hi))
            h = int(round(np.sqrt(area * aspect)))
            w = int(round(np.sqrt(area / aspect)))
            if h >= grid_h or w >= grid_w:
                continue
            top, left = rng.integers(0, grid_h - h + 1), rng.integers(0, grid_w - w + 1)
            window = mask[top:top + h, left:left + w]
            fresh = h * w - int(window.sum())
            if 0 < fresh <= budget:
                window[...] = True
                added = fresh
                break
        if not added:
            break
        count += added
    if exact and count < target:
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, target - count, replace=False)] = True
    return mask.ravel()


def beit_bool_masked_pos(rng: np.random.Generator, batch_size: int, grid: int,
                         num_masking_patches: int, min_num_patches: int = 16,
                         max_num_patches=None, min_aspect: float = 0.3, max_aspect=None,
                         exact: bool = False) -> np.ndarray:
    """[B, grid * grid] bool: reference_block_mask per sample (what the torch side feeds)."""
    return np.stack([reference_block_mask(rng, grid, grid, num_masking_patches, min_num_patches,
                                          max_num_patches, min_aspect, max_aspect, exact)
                     for _ in range(batch_size)])


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
    """forward + backward + optimizer step of `self.model` on fixed pixels (float32); subclasses
    say how the loss is computed."""

    def __init__(self, model, optimizer, images_nhwc, hf_model=None):
        self.model, self.optimizer = model, optimizer
        self.hf_model = model if hf_model is None else hf_model  # the transformers model
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
                "model_class": type(self.hf_model).__name__ + (
                    "" if self.model is self.hf_model else " + " + type(self.model).__name__),
                "attn_implementation": getattr(self.hf_model.config, "_attn_implementation",
                                               None),
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


def _beit_v2_model(mim, head_layers: int, early_layers: int):
    """BeitForMaskedImageModeling + BEiT v2's CLS head, as mim_jax's BEiT module: the head's
    BeitLayers (drop-path rates continuing the encoder's) run over [final CLS, block
    `early_layers`'s patch tokens] with the shared relative position bias; its masked tokens
    go through the same final norm and LM head. Forward hooks keep both blocks' outputs."""
    import torch
    from transformers.models.beit import modeling_beit

    hf = mim.config
    n = max(hf.num_hidden_layers, early_layers + head_layers)
    rates = np.linspace(0.0, hf.drop_path_rate, n)[early_layers:early_layers + head_layers]

    class BEiTv2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mim = mim
            self.cls_head = torch.nn.ModuleList(
                [modeling_beit.BeitLayer(hf, drop_path_rate=float(r)) for r in rates])
            self._kept = {}
            layers = mim.beit.layers
            for name, layer in (("early", layers[early_layers - 1]), ("final", layers[-1])):
                layer.register_forward_hook(self._keeper(name))

        def _keeper(self, name):
            def hook(module, args, output):
                self._kept[name] = output[0] if isinstance(output, tuple) else output
            return hook

        def forward(self, pixels, mask, labels):
            loss = self.mim(pixel_values=pixels, bool_masked_pos=mask, labels=labels).loss
            early, final = self._kept.pop("early"), self._kept.pop("final")
            size = tuple(pixels.shape[2:])
            window = (size[0] // hf.patch_size, size[1] // hf.patch_size)
            x = torch.cat([final[:, :1], early[:, 1:]], dim=1)
            bias = self.mim.beit.shared_position_bias(window, dim_size=x.shape[1])
            for layer in self.cls_head:
                x = layer(x, attention_mask=bias, resolution=size)
            logits = self.mim.lm_head(self.mim.layernorm(x)[:, 1:])
            return loss + torch.nn.functional.cross_entropy(logits[mask], labels)

    return BEiTv2()


class TorchBEiTStep(_TorchStep):
    """BeitForMaskedImageModeling (+ v2's CLS head) forward + backward + torch.optim.AdamW step
    (float32, train mode), with a fresh blockwise mask and random labels at the masked
    positions each call (mim_jax draws its mask inside its step and reads precomputed ids)."""

    def __init__(self, config, images_nhwc):
        import torch
        import transformers
        from mim_jax import pretrained
        torch.manual_seed(config.seed)
        obj, arch = config.objective, flops.vit_arch(config)
        self.vocab_size = pretrained.build_objective(config).model.vocab_size
        mim = transformers.BeitForMaskedImageModeling(
            hf_beit_config(config, self.vocab_size)).float().train()
        head_layers = obj.get("cls_head_layers", 0)
        model = (_beit_v2_model(mim, head_layers, obj.get("early_layers", 9))
                 if head_layers else mim)
        super().__init__(model, _adamw(model, config, ("cls_token", "mask_token",
                                                       "relative_position_bias_table")),
                         images_nhwc, hf_model=mim)
        self._rng = np.random.default_rng(config.seed)
        m = obj.mask
        self._mask_args = (self.pixels.shape[0], arch.grid, m.num_masking_patches)
        self._mask_kwargs = dict(
            min_num_patches=m.min_num_patches, max_num_patches=m.get("max_num_patches"),
            min_aspect=m.get("min_aspect", 0.3), max_aspect=m.get("max_aspect"),
            exact=m.get("exact", False))

    def _loss(self):
        import torch
        mask = torch.from_numpy(beit_bool_masked_pos(self._rng, *self._mask_args,
                                                     **self._mask_kwargs))
        labels = torch.from_numpy(
            self._rng.integers(0, self.vocab_size, int(mask.sum()), dtype=np.int64))
        if self.model is self.hf_model:
            return self.model(pixel_values=self.pixels, bool_masked_pos=mask, labels=labels).loss
        return self.model(self.pixels, mask, labels)


TORCH_STEPS = {("mae", "vit"): TorchMAEStep, ("simmim", "swin"): TorchSwinSimMIMStep,
               ("beit", "vit"): TorchBEiTStep}


def torch_step_class(config) -> type:
    """The PyTorch step of the config's objective / backbone; ValueError for other pairs."""
    pair = (config.objective.name, config.model.get("name", "vit"))
    if pair not in TORCH_STEPS:
        raise ValueError(
            f"objective.name={pair[0]!r} / model.name={pair[1]!r}: compare_torch compares the "
            "MAE ViT with transformers' ViTMAEForPreTraining (configs/mae.py), the SimMIM "
            "Swin with SwinForMaskedImageModeling (configs/simmim.py:model=swin_b) or the BEiT "
            "ViT with BeitForMaskedImageModeling (configs/beit.py).")
    return TORCH_STEPS[pair]
