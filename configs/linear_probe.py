"""Linear probing of a frozen pretrained encoder (the MAE recipe).

Frozen encoder -> CLS token after the final norm -> BatchNorm without affine (eps 1e-6) ->
linear head (init std 0.01); LARS (momentum 0.9, trust 0.001), base lr 0.1 x batch/256, no
weight decay, batch 16384, 90 epochs with 10 warmup epochs; RandomResizedCrop + flip only.
  python -m mim_jax.main --config configs/linear_probe.py:model=vit_b,pretrained=runs/mae_b16 \
      --workdir runs/mae_b16_linprobe
  python -m mim_jax.main --config configs/linear_probe.py:model=vit_l,pretrained=runs/mae_l16 \
      --workdir runs/mae_l16_linprobe

For small datasets the cheaper variant fits the head on features extracted once: see the
'linear_probe' evaluator (config.evaluators) and `python -m mim_jax.evaluate`.

Quickstart on the bundled digits (architecture read from the pretraining run):
  python -m mim_jax.main --config configs/linear_probe.py:quickstart,pretrained=runs/mae_quickstart \
      --workdir runs/mae_quickstart_linprobe

Arguments: model=vit_b|vit_l, pretrained=PATH, epochs, batch, data=imagenet2012, quickstart.
"""
from configs import common
from configs import finetune as finetune_config


def get_config(arg=None):
    arg = common.parse_arg(arg, model="vit_b", pretrained="", epochs=0.0, batch=0,
                           data="imagenet2012", quickstart=False)
    if arg.quickstart:
        c = finetune_config.get_config(
            f"quickstart,model={arg.model if arg.model != 'vit_b' else 'vit'},"
            f"pretrained={arg.pretrained},epochs={arg.epochs or 20.0},batch={arg.batch or 256}")
        c.data.update(randaugment=None, crop_scale=(0.6, 1.0))
        c.model.drop_path_rate = 0.0
    else:
        if arg.model not in ("vit_b", "vit_l"):
            raise ValueError(f"config argument model={arg.model!r}; allowed: 'vit_b', 'vit_l'.")
        c = finetune_config.get_config(f"model={arg.model},pretrained={arg.pretrained},"
                                       f"data={arg.data}")
        c.data.update(randaugment=None, crop_scale=(0.08, 1.0), interpolation="bicubic")
        c.model.drop_path_rate = 0.0
        c.batch_size = arg.batch or 16384
        c.num_epochs = arg.epochs or 90.0
        c.warmup_epochs = 10.0
    # MAE probes the CLS token; ConvNets have none and average their last map.
    pool = "gap" if c.model.get("name") in ("resnet", "convnext") else "cls"
    c.finetune.update(mode="linear_probe", pool=pool, head_init_std=0.01, label_smoothing=0.0,
                      mixup=0.0, cutmix=0.0, random_erasing=0.0)
    c.optimizer.update(name="lars", base_lr=0.1, lr_batch_divisor=256, weight_decay=0.0,
                       layer_decay=1.0, min_lr=0.0)
    with c.optimizer.unlocked():
        c.optimizer.momentum = 0.9
    return c
