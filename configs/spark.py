"""SparK pretraining of ConvNets (Tian et al., ICLR 2023).

ImageNet-1K recipe of the reference (224 px; ResNet-50 by default):
  python -m mim_jax.main --config configs/spark.py:model=resnet50 --workdir runs/spark_r50
  python -m mim_jax.main --config configs/spark.py:model=convnext_s --workdir runs/spark_cnxs

Quickstart on the bundled 5,000 MNIST digits (a tiny ResNet of total stride 8 at 32 px, offline,
about 5 minutes on 2 CPU cores), then its kNN / linear probe / fine-tuning against random init:
  python -m mim_jax.main --config configs/spark.py:quickstart --workdir runs/spark_quickstart
  python -m mim_jax.evaluate --config configs/spark.py:quickstart --workdir runs/spark_quickstart

Arguments: model=resnet50|resnet101|resnet152|resnet200|convnext_s|convnext_b|convnext_l,
epochs (default 1600 for ResNets, 800 for ConvNeXts), batch=4096, data=imagenet2012, quickstart,
gather_visible=true (ConvNeXt: run the blocks' per-position layers on visible positions only;
the same result with less work - false runs them densely and masks, as the reference).

The recipe: mask ratio 0.6 of the stride-32 cells (7 x 7 at 224 px: 20 kept), light decoder of
width 768, densify norm BatchNorm (ResNets) / LayerNorm (ConvNeXts); base lr 2e-4 x bs/256,
40 warmup epochs, cosine; RandomResizedCrop(0.67-1, bicubic) + flip; drop path 0.05 / 0.08 /
0.1 / 0.15 (ResNet-50 / 101 / 152 / 200), 0.2 / 0.3 / 0.4 (ConvNeXt-S / B / L);
LAMB (b2 0.95 for ResNets, 0.999 for ConvNeXts, eps 1e-6, global-norm clip 5, trust ratio on
decayed weights only) with weight decay rising 0.04 -> 0.2 on a per-step cosine over the run;
the warmup starts at 0.005 x the peak lr and the cosine ends at 0.001 x the peak, as there.
Fine-tuning: configs/finetune.py:model=resnet50,pretrained=WORKDIR (SparK's table).
"""
import ml_collections

from configs import common
from mim_jax.data.config import optional_field

# name -> (backbone, variant, drop path, densify norm, LAMB b2, default epochs)
MODELS = {
    "resnet50": ("resnet", "50", 0.05, "bn", 0.95, 1600.0),
    "resnet101": ("resnet", "101", 0.08, "bn", 0.95, 1600.0),
    "resnet152": ("resnet", "152", 0.10, "bn", 0.95, 1600.0),
    "resnet200": ("resnet", "200", 0.15, "bn", 0.95, 1600.0),
    "convnext_s": ("convnext", "S", 0.2, "ln", 0.999, 800.0),
    "convnext_b": ("convnext", "B", 0.3, "ln", 0.999, 800.0),
    "convnext_l": ("convnext", "L", 0.4, "ln", 0.999, 800.0),
}


def convnet_model_config(name: str, variant: str) -> ml_collections.ConfigDict:
    """ResNet (depths / stem_width / widths override the variant) or ConvNeXt (depths / dims)."""
    fields = (("depths", "stem_width", "widths") if name == "resnet" else ("depths", "dims"))
    types = dict(depths=tuple, stem_width=int, widths=tuple, dims=tuple)
    # ResNet stem_stride: 4 (timm: total stride 32), 2 (no max-pool) or 1 (total stride 8).
    extra = dict(stem_stride=4) if name == "resnet" else {}
    return ml_collections.ConfigDict(dict(common._backbone_common(name, variant), **extra,
                                          **{f: optional_field(types[f]) for f in fields}))


def get_config(arg=None):
    arg = common.parse_arg(arg, model="resnet50", epochs=0.0, batch=4096, data="imagenet2012",
                           quickstart=False, gather_visible=True)
    c = common.base_config()
    # gather_visible: ConvNeXt blocks run their MLP on visible positions only (same result).
    c.objective = dict(name="spark", mask_ratio=0.6, decoder_width=768, densify_norm="bn",
                       gather_visible=arg.gather_visible)
    # The reference's no-decay keys (pretrain/main.py get_param_groups); its mask tokens and
    # ConvNeXt's gamma are 1-D and undecayed anyway.
    c.optimizer.no_decay = ("cls_token", "pos_embed", "mask_token", "gamma")
    if arg.quickstart:
        return _quickstart(c)
    if arg.model not in MODELS:
        raise ValueError(f"config argument model={arg.model!r}; allowed: {list(MODELS)}.")
    backbone, variant, drop_path, norm, b2, epochs = MODELS[arg.model]
    c.model = convnet_model_config(backbone, variant)
    c.model.drop_path_rate = drop_path
    c.objective.densify_norm = norm
    c.batch_size = arg.batch
    c.num_epochs = arg.epochs or epochs
    c.warmup_epochs = 40.0
    c.optimizer.update(name="lamb", base_lr=2e-4, lr_batch_divisor=256, b1=0.9, b2=b2,
                       eps=1e-6, weight_decay=0.04, weight_decay_end=0.2, grad_clip_norm=5.0,
                       min_lr=0.001 * 2e-4 * arg.batch / 256, warmup_start_factor=0.005)
    c.data.update(name=arg.data, split="train", eval_split="validation", image_size=224,
                  channels=3, crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3),
                  interpolation="bicubic", flip=True)
    c.log_every_steps = 100
    c.checkpoint.update(every_steps=2000, keep=3)
    c.evaluators.reconstruction.update(every_steps=5000, num_images=8)
    return c


def _quickstart(c):
    """A tiny ResNet (one bottleneck per stage) of total stride 8 on digits resized to 32 px.

    The stem without its stride and max-pool (model.stem_stride=1) makes the backbone's
    deepest map stride 8, so the mask grid is 4 x 4 cells of 8 px (7 px of the 28 px digit
    each), 6 kept and 10 masked at 0.6 - the cell geometry with which the SimMIM ViT quickstart
    learns (docs/objectives/simmim.md). With the default stride 32 the grid at 32 px would be 1 x 1.
    """
    c.model = convnet_model_config("resnet", "50")
    c.model.update(depths=(1, 1, 1, 1), stem_width=16, widths=(8, 16, 32, 64))
    c.model.stem_stride = 1
    c.objective.update(decoder_width=64, densify_norm="bn")
    c.data.update(name="mnist5k", split="train", eval_split="test", image_size=32, channels=1,
                  crop_scale=(0.67, 1.0), interpolation="bilinear", flip=False,
                  mean=(0.1307,), std=(0.3081,), shuffle_buffer=5000)
    c.batch_size = 32
    c.num_epochs = 8.0  # 1,120 steps of 32 (4,500 training digits): 4 min 54 s on 2 CPU cores
    c.warmup_epochs = 1.0
    c.optimizer.update(name="adamw", base_lr=1.6e-2, lr_batch_divisor=256, b1=0.9, b2=0.95,
                       eps=1e-6, weight_decay=0.04, grad_clip_norm=5.0)  # lr 2e-3
    c.log_every_steps = 70
    c.checkpoint.update(every_steps=560, keep=2)
    c.evaluators.reconstruction.update(every_steps=560, num_images=8)
    c.evaluators.update(common.quickstart_probes(every_steps=560))
    return c
