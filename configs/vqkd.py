"""VQ-KD tokenizer training (BEiT v2, Peng et al. 2022): the visual tokenizer whose codes BEiT v2
predicts, trained by distilling a frozen teacher's patch features.

The teacher is the encoder of any mim_jax pretraining run (its --workdir). Official recipe
(vqkd_encoder_base_decoder_1x768x12: ViT-B/16 encoder, 1-block decoder, 8192 codes of dim 32) on
ImageNet-1K, here with a mim_jax ViT-B/16 teacher at 224 px:
  python -m mim_jax.main --config configs/vqkd.py --workdir runs/vqkd_b16 \
      --config.objective.teacher.checkpoint=runs/mae_b16 --config.data.data_dir=$TFDS_DATA_DIR
  python -m mim_jax.main --config configs/vqkd.py:decoder_depth=3 --workdir runs/vqkd_b16_3x \
      --config.objective.teacher.checkpoint=runs/mae_b16

Quickstart on the bundled 5,000 MNIST digits, distilling the MAE quickstart's encoder (about two
minutes on 2 CPU cores after the MAE quickstart; BEiT v2's quickstart then trains on its codes):
  python -m mim_jax.main --config configs/mae.py:quickstart --workdir runs/mae_quickstart
  python -m mim_jax.main --config configs/vqkd.py:quickstart --workdir runs/vqkd_quickstart \
      --config.objective.teacher.checkpoint=runs/mae_quickstart

Arguments (comma separated): epochs=100, batch=512, decoder_depth=1, data=imagenet2012,
quickstart. The tokenizer's sizes live in objective.tokenizer, the block BEiT v2 reads
(tokenizer_config below); config.model is not used.

Deliberate differences from the reference (unilm/beit2 run_vqkd_training.py): the learning
rate warms up from 0 (reference: from 1e-6); the teacher is a mim_jax encoder (reference: CLIP
or DINO ViT-B/16); see mim_jax/objectives/vqkd.py for the quantiser.
"""
import ml_collections

from configs import common
from mim_jax.data.config import optional_field


def tokenizer_config(quickstart: bool = False, checkpoint=None) -> ml_collections.ConfigDict:
    """The objective.tokenizer block: the official base model, or the quickstart's tiny one
    (for 28 px single-channel digits: patch 4, a 7 x 7 grid, 256 codes)."""
    c = ml_collections.ConfigDict(dict(
        name="vqkd", checkpoint=optional_field(str, checkpoint), image_size=optional_field(int),
        patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
        decoder_width=768, decoder_depth=1, decoder_heads=12, decoder_mlp_dim=3072,
        n_codes=8192, code_dim=32, teacher_dim=optional_field(int),
        # The reference maps [0, 1] images to [-1, 1] ('default' process_type).
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    if quickstart:
        c.update(patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256,
                 decoder_width=64, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=256,
                 n_codes=256, code_dim=32, mean=(0.1307,), std=(0.3081,))
    return c


def get_config(arg=None):
    arg = common.parse_arg(arg, epochs=100.0, batch=512, decoder_depth=1, data="imagenet2012",
                           quickstart=False)
    c = common.base_config()
    del c.model  # the tokenizer's sizes are in objective.tokenizer
    c.objective = ml_collections.ConfigDict(dict(
        name="vqkd", tokenizer=tokenizer_config(arg.quickstart),
        # A mim_jax run's workdir, a Hugging Face / timm ViT folder, or a ViT weights file
        # (an official MAE .pth) with its variant (e.g. 'B/16'); input size and mean / std
        # unless the folder's or the data's.
        teacher=dict(checkpoint=optional_field(str), step=optional_field(int),
                     variant=optional_field(str), image_size=optional_field(int),
                     mean=optional_field(tuple), std=optional_field(tuple)),
        # The reference's quantiser: commitment beta 1, EMA decay 0.99, k-means init of 10
        # cosine Lloyd iterations on the first batch, no dead-code restart.
        beta=1.0, decay=0.99, kmeans_init=True, kmeans_iters=10, dead_code_threshold=0.0))
    # No pixel outputs: the reconstruction evaluator does not apply.
    c.evaluators = ml_collections.ConfigDict()
    if arg.quickstart:
        return _quickstart(c)

    # Reference recipe (TOKENIZER.md): 8 GPUs x 64 = 512 images, AdamW (0.9, 0.99), wd 1e-4,
    # lr 5e-5 x bs/128 with min lr 1e-5, 100 epochs with 10 of warmup, RandomResizedCrop(0.08-1,
    # bicubic) + flip, no colour jitter, no gradient clipping.
    c.objective.tokenizer.decoder_depth = arg.decoder_depth
    c.batch_size = arg.batch
    c.num_epochs = arg.epochs
    c.warmup_epochs = 10.0
    c.optimizer.update(base_lr=5e-5, lr_batch_divisor=128, b1=0.9, b2=0.99, eps=1e-8,
                       weight_decay=1e-4, min_lr=1e-5)
    c.data.update(name=arg.data, split="train", eval_split="validation", image_size=224,
                  channels=3, crop_scale=(0.08, 1.0), interpolation="bicubic", flip=True)
    c.log_every_steps = 100
    c.checkpoint.update(every_steps=2000, keep=3)
    return c


def _quickstart(c):
    """A tiny tokenizer over the MAE quickstart's 7 x 7 token grid (its data settings)."""
    c.data.update(name="mnist5k", split="train", eval_split="test", image_size=28, channels=1,
                  crop_scale=(0.6, 1.0), interpolation="bilinear", flip=False,
                  mean=(0.1307,), std=(0.3081,), shuffle_buffer=5000)
    # A small codebook on small data collapses without restarts: codes whose EMA count falls
    # below one token per step take fresh features (the reference has none).
    c.objective.dead_code_threshold = 1.0
    # Most of a step is the teacher's forward pass, so small batches: 700 steps of 32.
    c.batch_size = 32
    c.num_epochs = 5.0  # 140 steps per epoch
    c.warmup_epochs = 0.5
    c.optimizer.update(base_lr=4e-3, lr_batch_divisor=128, b1=0.9, b2=0.99,
                       weight_decay=1e-4, min_lr=1e-5)  # lr 1e-3
    c.log_every_steps = 70
    c.checkpoint.update(every_steps=350, keep=2)
    return c
