"""BEiT pretraining (v1: Bao et al. 2022; v2: Peng et al. 2022).

ImageNet-1K recipes of the papers (BEiT-B/16, 224 px, 75 of 196 patches masked blockwise):
  v1, DALL-E dVAE tokens of a 112 px view, 800 epochs (the dVAE encoder's state dict: see
  mim_jax/convert/dall_e.py for the one-line extraction from the official encoder.pkl):
    python -m mim_jax.main --config configs/beit.py \
        --config.objective.tokenizer.checkpoint=dall_e_encoder.pt --workdir runs/beit_b
  v2, VQ-KD tokens (the official vqkd_encoder_base_decoder_3x768x12_clip file), CLS head over
  block 9, 1600 epochs (epochs=300 gives the short schedule: b2 0.98, no drop path):
    python -m mim_jax.main --config configs/beit.py:version=2 \
        --config.objective.tokenizer.checkpoint=vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \
        --workdir runs/beitv2_b

Quickstart on the bundled 5,000 MNIST digits: a VQ-KD tokenizer distilled from the MAE
quickstart's encoder, then BEiT on its tokens (three runs, each through main):
  python -m mim_jax.main --config configs/mae.py:quickstart --workdir runs/mae_quickstart
  python -m mim_jax.main --config configs/vqkd.py:quickstart \
      --config.objective.teacher.checkpoint=runs/mae_quickstart --workdir runs/vqkd_quickstart
  python -m mim_jax.main --config configs/beit.py:quickstart \
      --config.objective.tokenizer.checkpoint=runs/vqkd_quickstart --workdir runs/beit_quickstart

Arguments: version=1|2, variant=B/16|L/16, epochs, batch=2048, data=imagenet2012, quickstart.
Deliberate differences: the learning rate is per-step warmup + half-cycle cosine (as the
reference) but the warmup is 10 epochs for v1 too (its script also has a 10k-step option); v1's
112 px tokenizer view is resized on device from the 224 px crop (the reference resizes the crop
twice on the host); colour jitter (0.4) is applied to the crop after the flip (the reference
jitters the whole image before cropping: the contrast's mean grey differs slightly).
"""
from configs import common
from configs import vqkd as vqkd_config


def get_config(arg=None):
    arg = common.parse_arg(arg, version=1, variant="B/16", epochs=0.0, batch=2048,
                           data="imagenet2012", quickstart=False)
    if arg.version not in (1, 2):
        raise ValueError(f"config argument version={arg.version!r}; allowed: 1, 2.")
    c = common.base_config()
    # The reference's skip list (VisionTransformerForMaskedImageModeling.no_weight_decay): the
    # mask token and the shared relative position table are decayed.
    c.optimizer.no_decay = ("pos_embed", "cls_token")
    if arg.quickstart:
        return _quickstart(c)
    epochs = arg.epochs or (800.0 if arg.version == 1 else 1600.0)
    large = arg.variant.startswith("L/")
    c.model = common.vit_model_config(arg.variant)
    # No absolute positions; one relative position bias shared by all blocks; q/v biases;
    # layer scale 0.1 (B) / 1e-5 (L); truncated-normal init with the depth rescaling.
    c.model.update(pos_embed="none", rel_pos_bias="shared", qkv_bias="qv", init_style="beit",
                   layer_scale_init=1e-5 if large else 0.1,
                   drop_path_rate=0.0 if (arg.version == 2 and epochs < 800) else 0.1)
    c.objective = dict(name="beit", mask=_mask(75, 16, exact=arg.version == 2),
                       cls_head_layers=0, early_layers=9)
    if arg.version == 1:
        c.objective.tokenizer = dall_e_tokenizer()
    else:
        c.objective.tokenizer = vqkd_tokenizer()
        c.objective.update(cls_head_layers=2, early_layers=21 if large else 9)
    # AdamW (0.9, 0.999; v2's 300-epoch run 0.98), wd 0.05, clip 3, lr 1.5e-3 at any batch
    # (absolute, not scaled), 10 warmup epochs, min lr 1e-5.
    c.batch_size = arg.batch
    c.num_epochs = epochs
    c.warmup_epochs = 10.0
    c.optimizer.update(base_lr=1.5e-3, lr_batch_divisor=arg.batch, b1=0.9,
                       b2=0.98 if (arg.version == 2 and epochs < 800) else 0.999,
                       weight_decay=0.05, grad_clip_norm=3.0, min_lr=1e-5)
    c.data.update(name=arg.data, split="train", eval_split="validation", image_size=224,
                  channels=3, crop_scale=(0.08, 1.0) if arg.version == 1 else (0.2, 1.0),
                  crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic", flip=True,
                  color_jitter=0.4)
    c.log_every_steps = 100
    c.checkpoint.update(every_steps=5000, keep=3)
    c.evaluators = {}  # no pixel reconstruction to show; MIM accuracy is logged every step
    return c


def _mask(num_masking_patches: int, min_num_patches: int, exact: bool) -> dict:
    """Blockwise masking (masking.block_mask): blocks of >= min_num_patches, aspect ratio
    log-uniform in [0.3, 1/0.3], until num_masking_patches; exact=True is v2's exact count."""
    return dict(num_masking_patches=num_masking_patches, min_num_patches=min_num_patches,
                max_num_patches=common.optional_field(int), min_aspect=0.3,
                max_aspect=common.optional_field(float), exact=exact)


def dall_e_tokenizer() -> dict:
    """BEiT v1's tokenizer: the DALL-E dVAE encoder (8192 codes) on a 112 px view."""
    return dict(name="dall_e", checkpoint="", input_size=112, n_hid=256, group_count=4,
                n_blk_per_group=2, vocab_size=8192)


def vqkd_tokenizer(quickstart: bool = False):
    """BEiT v2's tokenizer: VQ-KD (ViT-B/16 encoder, 8192 x 32 l2-normalised codebook), or the
    VQ-KD quickstart's. The sizes are spelled out (a mim_jax tokenizer run brings its own, but
    the BEiT run must still rebuild its tokenizer if that run is moved away later)."""
    return vqkd_config.tokenizer_config(quickstart=quickstart, checkpoint="")


def _quickstart(c):
    """The MAE quickstart's ViT (width 128, 4 blocks, patch 4, 28 px: a 7 x 7 grid) with BEiT's
    options, predicting the tokens of the VQ-KD quickstart tokenizer (same grid)."""
    c.model = common.vit_model_config("Ti/4")
    c.model.update(width=128, depth=4, num_heads=4, mlp_dim=512, pos_embed="none",
                   rel_pos_bias="shared", qkv_bias="qv", init_style="beit", layer_scale_init=0.1)
    # 40% of the 49 patches, as 75 of 196; blocks of >= 4 patches (16 of 196 scaled).
    c.objective = dict(name="beit", mask=_mask(20, 4, exact=True), cls_head_layers=0,
                       early_layers=3, tokenizer=vqkd_tokenizer(quickstart=True))
    c.data.update(name="mnist5k", split="train", eval_split="test", image_size=28, channels=1,
                  crop_scale=(0.67, 1.0), interpolation="bilinear", flip=False,
                  mean=(0.1307,), std=(0.3081,), shuffle_buffer=5000)
    c.batch_size = 64
    c.num_epochs = 15.0  # 70 steps per epoch
    c.warmup_epochs = 1.0
    c.optimizer.update(base_lr=1.5e-3, lr_batch_divisor=64, b1=0.9, b2=0.999,
                       weight_decay=0.05, grad_clip_norm=3.0, min_lr=1e-5)
    c.log_every_steps = 70
    c.checkpoint.update(every_steps=350, keep=2)
    c.evaluators = common.quickstart_probes(every_steps=350)
    return c
