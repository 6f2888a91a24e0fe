"""Supervised fine-tuning of a pretrained encoder (MAE / BEiT / SimMIM / SparK / BEiT-3 recipes).

ImageNet-1K, the papers' recipes (AdamW, layer-wise lr decay, warmup + cosine, RandAugment
m9-mstd0.5, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, drop path,
global average pool + LayerNorm, head init std 2e-5):
  MAE ViT-B/16 (100 epochs, batch 1024, base lr 5e-4 x bs/256, layer decay 0.65, drop path 0.1):
    python -m mim_jax.main --config configs/finetune.py:model=vit_b,pretrained=runs/mae_b16 \
        --workdir runs/mae_b16_ft
  MAE ViT-L/16 (50 epochs, base lr 1e-3, layer decay 0.75, drop path 0.2):
    python -m mim_jax.main --config configs/finetune.py:model=vit_l,pretrained=runs/mae_l16 \
        --workdir runs/mae_l16_ft
  SimMIM Swin-B at 224 px, window 7 (100 epochs, batch 2048, base lr 1.25e-3 x bs/512, layer
  decay 0.9, 20 warmup epochs; the window-6 pretraining tables are resized to window 7):
    python -m mim_jax.main --config configs/finetune.py:model=swin_b,pretrained=runs/simmim_swinb \
        --workdir runs/simmim_swinb_ft
  An official MAE checkpoint works too: pretrained=/path/to/mae_pretrain_vit_base.pth
  SparK ResNet-50 / ConvNeXt-S (SparK's table: LAMB + BCE for ResNets, AdamW for ConvNeXts,
  layer decay 0.7 / 0.8 over SparK's layer groups, EMA 0.9999; see _spark_recipe):
    python -m mim_jax.main --config configs/finetune.py:model=resnet50,pretrained=runs/spark_r50 \
        --workdir runs/spark_r50_ft
  BEiT-3 base (unilm's BEiT3ForImageClassification on images alone: 50 epochs, batch 1024,
  lr 7e-4 not scaled with the batch, layer decay 0.65, drop path 0.15; large: lr 2e-4, layer
  decay 0.8, drop path 0.25; the text vocabulary is the released one, model.vocab_size):
    python -m mim_jax.main --config configs/finetune.py:model=beit3_b,pretrained=runs/beit3_base \
        --workdir runs/beit3_base_ft

Quickstart on the bundled digits: the architecture is read from the pretraining run's
config.json (`pretrained=WORKDIR`); without `pretrained` the same encoder trains from scratch
(`model=vit` is the MAE quickstart ViT, `model=swin` the SimMIM quickstart Swin, `model=resnet`
the SparK quickstart ResNet, `model=convnext` a tiny ConvNeXt on the SparK quickstart's data,
`model=multiway` the BEiT-3 quickstart's Multiway encoder). A SparK run's ResNet starts from
its pretrained weights and BatchNorm statistics, a BEiT-3 run's Multiway encoder from its
weights, text embedding included (model.vocab_size is the run's text vocabulary):
  python -m mim_jax.main --config configs/finetune.py:quickstart,pretrained=runs/mae_quickstart \
      --workdir runs/mae_quickstart_ft
  python -m mim_jax.main --config configs/finetune.py:quickstart,pretrained=runs/beit3_quickstart \
      --workdir runs/beit3_quickstart_ft

Arguments: model=vit_b|vit_l|swin_b|resnet50|resnet101|resnet152|resnet200|convnext_s|
convnext_b|convnext_l|beit3_b|beit3_l (quickstart: vit|swin|resnet|convnext|multiway),
pretrained=PATH, epochs, batch, data=imagenet2012, quickstart.
"""
import ml_collections
from etils import epath

from configs import beit3 as beit3_config
from configs import common
from configs import mae as mae_config
from configs import simmim as simmim_config
from configs import spark as spark_config


def finetune_block(**overrides) -> ml_collections.ConfigDict:
    block = dict(mode="finetune", pretrained="", pretrained_step=0, num_classes=0, pool="gap",
                 head_init_std=2e-5, loss="softmax_ce", label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                 mixup_prob=1.0, mixup_switch_prob=0.5, random_erasing=0.25, ema_decay=0.0)
    block.update(overrides)
    return ml_collections.ConfigDict(block)


def classification_evaluator(every_epochs: float = 1.0, batch_size: int = 256) -> dict:
    return dict(classification=dict(type="classification", every_epochs=every_epochs,
                                     every_steps=1, split="", batch_size=batch_size,
                                     max_examples=0))


def model_of_run(workdir: str):
    """The model and data blocks of a mim_jax pretraining run (its config.json), or of the
    run a folder was exported from (its mim_jax_export.json); (None, None) for other
    weights, whose sizes config.model has to name. A BEiT-3 run's model block gets its
    text vocabulary size (model.vocab_size), which its encoder's parameters depend on."""
    from mim_jax import pretrained
    from mim_jax.convert import sources
    if sources.is_weights(workdir):
        record = sources.read_export_record(workdir)
        if not record:
            return None, None
        return (ml_collections.ConfigDict(record.get("model") or {}),
                ml_collections.ConfigDict(record.get("data") or {}))
    run = pretrained.read_run_config(pretrained.resolve_checkpoint(workdir)[0])
    model = run.model
    if model.get("name") == "multiway" and model.get("vocab_size") is None:
        # The text embedding is part of the encoder: its rows are the run's text vocabulary.
        from mim_jax.objectives import beit3
        text = (run.get("objective") or {}).get("text") or {}
        model.vocab_size = text.get("vocab_size") or beit3.TextConfig.vocab_size
    return model, run.data


def get_config(arg=None):
    arg = common.parse_arg(arg, model="vit_b", pretrained="", epochs=0.0, batch=0,
                           data="imagenet2012", quickstart=False)
    c = common.base_config()
    c.finetune = finetune_block(pretrained=arg.pretrained)
    c.evaluators = ml_collections.ConfigDict(classification_evaluator())
    c.optimizer.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.05, min_lr=1e-6,
                       layer_decay=0.65)
    if arg.quickstart:
        return _quickstart(c, arg)
    c.data.update(name=arg.data, split="train", eval_split="validation", image_size=224,
                  channels=3, crop_scale=(0.08, 1.0), interpolation="bicubic", flip=True,
                  randaugment="rand-m9-mstd0.5-inc1")
    if arg.model in ("vit_b", "vit_l"):
        large = arg.model == "vit_l"
        c.model = common.vit_model_config("L/16" if large else "B/16")
        c.model.drop_path_rate = 0.2 if large else 0.1
        c.num_epochs = arg.epochs or (50.0 if large else 100.0)
        c.batch_size = arg.batch or 1024
        c.warmup_epochs = 5.0
        c.optimizer.update(base_lr=1e-3 if large else 5e-4, lr_batch_divisor=256,
                           layer_decay=0.75 if large else 0.65)
    elif arg.model == "swin_b":
        c.model = common.swin_model_config("B", window_size=7)
        c.model.drop_path_rate = 0.1
        c.num_epochs = arg.epochs or 100.0
        c.batch_size = arg.batch or 2048
        c.warmup_epochs = 20.0
        c.optimizer.update(base_lr=1.25e-3, lr_batch_divisor=512, layer_decay=0.9,
                           min_lr=2.5e-7 * c.batch_size / 512, grad_clip_norm=5.0)
        c.data.interpolation = "bicubic"
    elif arg.model in SPARK_RECIPES:
        _spark_recipe(c, arg)
    elif arg.model in ("beit3_b", "beit3_l"):
        _beit3_recipe(c, arg)
    else:
        raise ValueError(f"config argument model={arg.model!r}; allowed: "
                         f"{['vit_b', 'vit_l', 'swin_b', *SPARK_RECIPES, 'beit3_b', 'beit3_l']} "
                         "(quickstart: 'vit', 'swin', 'resnet', 'convnext', 'multiway').")
    c.log_every_steps = 100
    c.checkpoint.update(every_steps=2000, keep=2)
    return c


# SparK's ImageNet fine-tuning table (downstream_imagenet/arg.py of keyu-tian/SparK):
# name -> (batch, epochs, warmup epochs, optimizer, base lr x bs/256, layer decay, weight
#          decay, mixup alpha, drop path)
SPARK_RECIPES = {
    "resnet50": (2048, 300, 5, "lamb", 2e-3, 0.7, 0.02, 0.1, 0.05),
    "resnet101": (2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0.2),
    "resnet152": (2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0.2),
    "resnet200": (2048, 300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0.2),
    "convnext_s": (4096, 400, 20, "adamw", 2e-4, 0.7, 0.01, 0.8, 0.3),
    "convnext_b": (4096, 400, 20, "adamw", 1e-4, 0.7, 0.01, 0.8, 0.4),
    "convnext_l": (4096, 200, 10, "adamw", 1e-4, 0.7, 0.02, 0.8, 0.5),
}


def _spark_recipe(c, arg):
    """SparK's fine-tuning of its ResNets (LAMB without bias correction, trust ratio on every
    tensor, binary cross-entropy on mixup targets) and ConvNeXts (AdamW, soft-target CE).

    Both: layer-wise lr decay over SparK's layer groups (optim.layer_ids), warmup from 0.005 x
    the peak, cosine to 0.001 x the peak, no gradient clipping, mixup (alpha from the table) /
    cutmix 1.0 with label smoothing 0.1, random erasing 0.25, EMA 0.9999.
    Deliberate differences: RandAugment m9-mstd0.5 stands in for TrivialAugmentWide, there is
    no repeated augmentation (x3 for ConvNeXts), and evaluation takes the full centre square
    (the reference crops 0.95 of it); the ResNet's head starts from the ConvNeXt's
    trunc-normal 0.02 (torch's default Linear init there: uniform +-0.022).
    """
    batch, epochs, warmup, opt, base_lr, layer_decay, wd, mixup, drop_path = (
        SPARK_RECIPES[arg.model])
    backbone, variant = spark_config.MODELS[arg.model][:2]  # the pretraining run's names
    c.model = spark_config.convnet_model_config(backbone, variant)
    c.model.drop_path_rate = drop_path
    c.batch_size = arg.batch or batch
    c.num_epochs = arg.epochs or float(epochs)
    c.warmup_epochs = float(warmup)
    peak = base_lr * c.batch_size / 256
    c.optimizer.update(name=opt, base_lr=base_lr, lr_batch_divisor=256, layer_decay=layer_decay,
                       weight_decay=wd, min_lr=0.001 * peak, warmup_start_factor=0.005,
                       b1=0.9, b2=0.999, eps=1e-6 if opt == "lamb" else 1e-8,
                       grad_clip_norm=0.0)
    if opt == "lamb":
        c.optimizer.update(bias_correction=False, trust_ratio="all")
    c.finetune.update(mixup=mixup, cutmix=1.0, label_smoothing=0.1, random_erasing=0.25,
                      ema_decay=0.9999, loss="bce" if opt == "lamb" else "softmax_ce",
                      head_init_std=0.02)


def _beit3_recipe(c, arg):
    """unilm's BEiT-3 ImageNet fine-tuning (beit3/get_started/get_started_for_image_
    classification.md): the MAE recipe's augmentation, AdamW (0.9, 0.999), weight decay 0.05
    off the CLS token and vision positions (unilm's skip list), warmup 5 epochs, cosine to
    1e-6; the peak lr is absolute, not scaled with the batch."""
    large = arg.model == "beit3_l"
    c.model = beit3_config.model_config("large" if large else "base",
                                        drop_path_rate=0.25 if large else 0.15)
    c.model.vocab_size = beit3_config.RELEASED_VOCAB_SIZE
    c.num_epochs = arg.epochs or 50.0
    c.batch_size = arg.batch or 1024
    c.warmup_epochs = 5.0
    c.optimizer.update(base_lr=2e-4 if large else 7e-4, lr_batch_divisor=c.batch_size,
                       layer_decay=0.8 if large else 0.65, no_decay=beit3_config.NO_DECAY)


def _quickstart(c, arg):
    """Fine-tune a quickstart encoder on the 4,500 training digits; top-1 on the 500 test."""
    run_model = run_data = None
    model = arg.model
    if arg.pretrained and epath.Path(arg.pretrained).is_dir():  # a run, local or gs://
        run_model, run_data = model_of_run(arg.pretrained)
        model = run_model.get("name", "vit") if run_model is not None else model
    convnet = model in ("resnet", "convnext")
    if model in ("vit", "vit_b"):
        qs = mae_config.get_config("quickstart")
    elif model == "swin":
        qs = simmim_config.get_config("quickstart,model=swin")
    elif convnet:  # the SparK quickstart's data (32 px digits) and its ResNet
        qs = spark_config.get_config("quickstart")
        if model == "convnext":
            qs.model = spark_config.convnet_model_config("convnext", "T")
            qs.model.update(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
    elif model == "multiway":  # the BEiT-3 quickstart's digits and Multiway encoder
        qs = beit3_config.get_config("quickstart")
        qs.model.vocab_size = beit3_config.QUICKSTART_VOCAB_SIZE
        c.optimizer.no_decay = beit3_config.NO_DECAY
    else:
        raise ValueError(f"config argument model={arg.model!r}; quickstart allows 'vit', "
                         "'swin', 'resnet', 'convnext', 'multiway'.")
    c.model, c.data = qs.model, qs.data
    tupled = lambda items: {k: tuple(v) if isinstance(v, list) else v for k, v in items}
    if run_model is not None and (convnet or model == "multiway"):
        # The run's whole model block (variant, depths, widths / dims, stem_stride, the text
        # vocabulary, ...).
        c.model = ml_collections.ConfigDict(tupled(run_model.items()))
    elif run_model is not None:  # the pretraining run's architecture
        c.model.update(tupled((k, v) for k, v in run_model.items()
                              if v is not None and k in c.model))
    if run_model is not None:  # and its input format
        c.data.update(tupled((k, v) for k, v in run_data.items()
                             if k in ("image_size", "channels", "mean", "std")))
        if c.model.get("rel_pos_bias") == "shared":
            # BEiT / SimMIM-ViT fine-tuning: each block starts from a copy of the shared bias.
            c.model.rel_pos_bias = "per_layer"
    c.data.update(crop_scale=(0.6, 1.0), flip=False, randaugment="rand-m9-mstd0.5-inc1")
    c.model.drop_path_rate = 0.1
    # A 4-epoch budget on 4,500 digits: mixup / cutmix (ImageNet's 100-epoch regularisers)
    # would leave the classifier half-trained, so they are off here; the rest is the recipe.
    c.finetune.update(mixup=0.0, cutmix=0.0, random_erasing=0.25)
    c.batch_size = arg.batch or 128
    c.num_epochs = arg.epochs or 4.0
    c.warmup_epochs = 0.5
    c.optimizer.update(base_lr=4e-3, lr_batch_divisor=256, layer_decay=0.75, min_lr=1e-6)
    if convnet:
        # The tiny BatchNorm ResNet needs a 4x larger lr and no RandAugment / random erasing
        # to train in 140 steps (measured on a SparK quickstart run: 54% top-1 with the ViT's
        # settings, 83% with the lr alone, 93% with both).
        c.optimizer.base_lr = 1.6e-2
        c.data.randaugment = None
        c.finetune.random_erasing = 0.0
    c.log_every_steps = 35
    c.checkpoint.update(every_steps=1000, keep=1)
    c.evaluators.classification.update(every_epochs=2.0, batch_size=500)
    return c
