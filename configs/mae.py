"""MAE pretraining (He et al., 2022).

ImageNet-1K recipe of the paper (ViT-B/16 by default; L/16 and H/14 by argument):
  python -m mim_jax.main --config configs/mae.py:variant=B/16,epochs=800 --workdir runs/mae_b16 \
      --config.data.data_dir=$TFDS_DATA_DIR
  python -m mim_jax.main --config configs/mae.py:variant=L/16,epochs=1600 --workdir runs/mae_l16

Quickstart on the bundled 5,000 MNIST digits (offline, a few minutes on a laptop CPU):
  python -m mim_jax.main --config configs/mae.py:quickstart --workdir runs/mae_quickstart

Arguments (comma separated): variant=B/16, epochs=800, batch=4096, data=imagenet2012, quickstart.
"""
from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="B/16", epochs=800.0, batch=4096, data="imagenet2012",
                           quickstart=False)
    c = common.base_config()
    c.objective = dict(name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder_width=512,
                       decoder_depth=8, decoder_heads=16, decoder_mlp_ratio=4.0)
    # The reference decays every tensor of 2 or more dimensions, its cls and mask tokens too
    # (main_pretrain.py: timm's add_weight_decay without a skip list).
    c.optimizer.no_decay = ()
    if arg.quickstart:
        return _quickstart(c)

    # Paper recipe: AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 x bs/256, 40 warmup epochs,
    # RandomResizedCrop(0.2-1, bicubic) + flip at 224 px, mask 0.75, norm-pix, 8x512 decoder.
    c.model.variant = arg.variant
    c.batch_size = arg.batch
    c.num_epochs = arg.epochs
    c.warmup_epochs = 40.0
    c.optimizer.update(base_lr=1.5e-4, lr_batch_divisor=256, b1=0.9, b2=0.95, weight_decay=0.05)
    c.data.update(name=arg.data, split="train", eval_split="validation", image_size=224,
                  channels=3, crop_scale=(0.2, 1.0), interpolation="bicubic", flip=True)
    c.log_every_steps = 100
    c.checkpoint.update(every_steps=2000, keep=3)
    c.evaluators.reconstruction.update(every_steps=5000, num_images=8)
    return c


def _quickstart(c):
    """A small ViT on 28 px digits: visibly learns in a few minutes on 2 CPU cores."""
    c.model.update(variant="Ti/4", width=128, depth=4, num_heads=4, mlp_dim=512)
    # A narrow decoder, as in the paper's design: it runs on all 49 tokens and dominates cost.
    c.objective.update(norm_pix_loss=False, decoder_width=64, decoder_depth=2, decoder_heads=4)
    c.data.update(name="mnist5k", split="train", eval_split="test", image_size=28, channels=1,
                  crop_scale=(0.6, 1.0), interpolation="bilinear", flip=False,
                  mean=(0.1307,), std=(0.3081,), shuffle_buffer=5000)
    # What leaving the mean-image plateau takes: it is a number of updates (~600-800 at this
    # lr), not of images, so small batches at a high lr; by ~1,000 steps strokes appear.
    c.batch_size = 64
    c.num_epochs = 18.0  # 1,260 steps
    c.warmup_epochs = 1.0
    c.optimizer.update(base_lr=8e-3, lr_batch_divisor=256, weight_decay=0.05)  # lr 2e-3
    c.log_every_steps = 70
    c.checkpoint.update(every_steps=420, keep=2)
    c.evaluators.reconstruction.update(every_steps=420, num_images=8)
    c.evaluators.update(common.quickstart_probes(every_steps=420))
    return c
