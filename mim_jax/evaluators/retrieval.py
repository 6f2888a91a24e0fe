"""Image-text retrieval of BEiT-3's Multiway encoder: recall@k after a contrastive fine-tune.

The protocol of unilm's BEiT-3 retrieval fine-tuning (BEiT3ForRetrieval in
beit3/modeling_finetune.py, ClipLoss in beit3/utils.py), in plain JAX / optax:
  * an image is encoded alone; its CLS token goes through `vision_head` (Linear D -> D, no
    bias) and is L2-normalised. A text is encoded alone; its first token (bos) goes through
    `language_head` the same way. Both heads start from a normal of std 0.02 cut at +-1 std.
  * a learned logit scale, initialised to log(1 / 0.07), multiplies the cosine similarities
    as exp(scale); unilm never clamps it (CLIP clamps it to log(100)): `max_logit_scale`
    turns CLIP's rule on, unset it is unilm's.
  * the loss is the symmetric InfoNCE of CLIP over the batch: the image's own caption is the
    only positive, every other caption of the batch a negative, and the same for texts.
  * AdamW with linear warmup and cosine decay trains the encoder and the heads; no weight
    decay on biases, 1-D tensors, tokens, the vision position table or the logit scale
    (unilm's list; the text tables are decayed).
Retrieval ranks every caption of the evaluation set for every image (and every image for every
caption) by cosine similarity; recall@k is the share of queries with a right answer in the top
k, a right answer being one of the same group (`retrieval_set`).

Where this differs from unilm: no layer-wise lr decay (0.65 for base) or drop path (0.2) unless
the encoder carries one, and one device: the loss sees the local batch only (unilm gathers the
features of every GPU). Every process computes the same result on its own.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mim_jax import data, optim
from mim_jax.data import config as data_config
from mim_jax.data import text as text_data
from mim_jax.data.text import config as text_config
from mim_jax.data.text import quickstart
from mim_jax.models import initializers

# CLIP's initial temperature 0.07, the value unilm's BEiT3ForRetrieval starts from.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
# unilm's no-weight-decay list for BEiT-3 fine-tuning (beit3/modeling_utils.py), in this
# encoder's names: tokens and the vision position table (torchscale's embed_positions.A).
NO_DECAY = optim.DEFAULT_NO_DECAY + ("vision_pos_embed", "logit_scale")
EVAL_BATCH = 256  # images or texts embedded at a time


# ------------------------------------------------------------------ the evaluation set ---


class RetrievalSet(NamedTuple):
    """Images and captions of one split; caption j answers image i when their groups match."""
    images: np.ndarray  # uint8 [N, H, W, C], the deterministic eval transform
    text_ids: np.ndarray  # int32 [M, T]
    text_padding: np.ndarray  # bool [M, T], True at padding
    image_group: np.ndarray  # int64 [N]
    text_group: np.ndarray  # int64 [M]


def split_configs(text_cfg, data_cfg, split: str):
    """(text config, data config) that read the image-text pairs of `split`.

    A TFDS split is text.pair_split; a JSONL index is a split of its own, so for
    text.pairs='jsonl' `split` names the index file(s), comma-separated (unilm ships
    coco_retrieval.train.jsonl, coco_retrieval.test.jsonl, ...)."""
    text_cfg = text_cfg.copy_and_resolve_references()
    if text_cfg.pairs == text_config.JSONL:
        text_cfg.pair_index = split
    else:
        text_cfg.pair_split = split
    text_data.validate_text_config(text_cfg)
    return text_cfg, text_config.pair_data_config(text_cfg, data_cfg)


def _mnist5k_captions(cfg, split: str, max_images: Optional[int]):
    """Every image of the split, and the captions of each digit they show, grouped by digit.

    The synthetic captions say which digit is shown and nothing else, so every caption of a
    digit describes every image of it equally well: the group is the label, and each caption
    is listed once (listing it for each of its 50 images would fill an image's top 5 with one
    caption's copies and make R@5 the same as R@1)."""
    from mim_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)

    images, labels = [], []
    # Process 0 of 1: every process reads the whole split (recall needs all of it).
    for batch in pipeline.eval_batches(cfg, split, global_batch_size=EVAL_BATCH,
                                       max_examples=max_images, process_index=0,
                                       process_count=1):
        images.append(batch["image"][batch["valid"]])
        labels.append(batch["label"][batch["valid"]])
    labels = np.concatenate(labels)
    digits = np.unique(labels)
    captions = [c for d in digits for c in quickstart.digit_captions(d)]
    text_group = np.repeat(digits, len(quickstart.CAPTION_TEMPLATES))
    return np.concatenate(images), captions, labels, text_group


def _tfds_captions(cfg, caption_key: str, split: str, max_images: Optional[int]):
    """The split's images in file order, each with all its captions (COCO has about 5);
    an image's captions are its group."""
    from mim_jax.data import image_ops  # pylint: disable=g-import-not-at-top  (TensorFlow)
    from mim_jax.data.text import pairs, tfds_text  # pylint: disable=g-import-not-at-top

    source = pairs.coco_style_pairs(cfg, caption_key)  # prepares the data, checks the key
    spec = image_ops.ImageSpec.from_config(cfg)
    ds = source.builder.as_dataset(split=split, shuffle_files=False)
    if max_images:
        ds = ds.take(max_images)

    def example(ex):
        # TFDS has decoded the image; what follows decoding in image_ops.eval_image.
        image = image_ops.to_channels(ex[cfg.image_key], spec.channels)
        image = image_ops.resize(image_ops.center_square_crop(image), spec.image_size,
                                 spec.interpolation)
        return image_ops.to_uint8(image), tfds_text.feature(ex, caption_key)

    images, captions, groups = [], [], []
    for i, (image, texts) in enumerate(ds.map(example).as_numpy_iterator()):
        images.append(image)
        captions += [t.decode("utf-8", errors="replace") for t in texts]
        groups += [i] * len(texts)
    return _stack(images, cfg), captions, np.arange(len(images)), np.asarray(groups, np.int64)


def _jsonl_captions(text_cfg, cfg, max_images: Optional[int]):
    """The index's images in order of first appearance, each with the captions of its lines
    (unilm's index has one line per caption); an image's captions are its group."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    from mim_jax.data import image_ops  # pylint: disable=g-import-not-at-top  (TensorFlow)
    from mim_jax.data.text import pairs  # pylint: disable=g-import-not-at-top

    paths, captions = pairs.read_index(text_config.split_list(text_cfg.pair_index),
                                       text_cfg.pair_root or None)
    first: Dict[str, int] = {}
    groups = np.asarray([first.setdefault(p, len(first)) for p in paths], np.int64)
    kept = list(first)[:max_images] if max_images else list(first)
    if max_images:
        captions = [c for c, g in zip(captions, groups) if g < max_images]
        groups = groups[groups < max_images]
    spec = image_ops.ImageSpec.from_config(cfg)
    images = [image_ops.to_uint8(image_ops.eval_image(epath.Path(p).read_bytes(), spec)).numpy()
              for p in kept]
    return _stack(images, cfg), captions, np.arange(len(images)), groups


def _stack(images: List[np.ndarray], cfg) -> np.ndarray:
    if not images:
        raise ValueError(f"{data_config.describe_source(cfg)} holds no images to retrieve.")
    return np.stack(images)


def retrieval_set(text_cfg, data_cfg, tokenizer, split: str,
                  max_images: Optional[int] = None) -> RetrievalSet:
    """The images and captions of `split` of text.pairs, images through the deterministic
    eval transform (center square crop, resize; no augmentation), captions tokenized to
    text.max_len. `max_images` keeps the first images and their captions.

    Groups: 'mnist5k' the digit (any caption of the digit is right), TFDS caption datasets
    (e.g. 'coco_captions', text.caption_key) and JSONL indexes the image (its own captions are
    right)."""
    text_cfg, cfg = split_configs(text_cfg, data_cfg, split)
    if text_cfg.pairs == text_config.MNIST5K_PAIRS:
        images, captions, image_group, text_group = _mnist5k_captions(cfg, split, max_images)
    elif text_cfg.pairs == text_config.JSONL:
        images, captions, image_group, text_group = _jsonl_captions(text_cfg, cfg, max_images)
    else:
        images, captions, image_group, text_group = _tfds_captions(
            cfg, text_cfg.caption_key, split, max_images)
    ids, padding = tokenizer.encode_batch(captions, text_cfg.max_len)
    return RetrievalSet(images, ids, padding, np.asarray(image_group, np.int64),
                        np.asarray(text_group, np.int64))


# ------------------------------------------------------------------------------ recall ---


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _hit_rates(queries, keys, query_group, key_group, ks: Sequence[int],
               chunk: int = 1024) -> Dict[int, float]:
    """{k: share of queries with a key of their group among their k most similar keys}.

    Queries go a chunk at a time, so a COCO-sized similarity matrix (5k x 25k) is never
    whole; the top max(ks) keys come from argpartition, then are sorted by similarity."""
    kmax = min(max(ks), len(keys))
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ keys.T
        top = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), 1,
                                                 kind="stable"), 1)
        right = key_group[top] == query_group[start:start + chunk, None]
        for k in ks:
            hits[k] += int(right[:, :k].any(axis=1).sum())
    return {k: hits[k] / len(queries) for k in ks}


def recall_at_k(image_emb, text_emb, image_group, text_group,
                ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Recall@k in percent, by cosine similarity, both ways: 'i2t_rK' (an image finds a
    caption of its group among its top K captions), 't2i_rK' (a caption finds an image of its
    group among its top K images)."""
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                     for k in ks):
        raise ValueError(f"ks={ks!r} must be positive integers.")
    image_emb, text_emb = _l2_normalize(image_emb), _l2_normalize(text_emb)
    image_group, text_group = np.asarray(image_group), np.asarray(text_group)
    if len(image_emb) != len(image_group) or len(text_emb) != len(text_group):
        raise ValueError(f"{len(image_emb)} image and {len(text_emb)} text embeddings for "
                         f"{len(image_group)} image and {len(text_group)} text groups.")
    i2t = _hit_rates(image_emb, text_emb, image_group, text_group, ks)
    t2i = _hit_rates(text_emb, image_emb, text_group, image_group, ks)
    out = {f"i2t_r{k}": 100.0 * i2t[k] for k in ks}
    out.update({f"t2i_r{k}": 100.0 * t2i[k] for k in ks})
    return out


# ------------------------------------------------------------------------------- model ---


def image_features(encoder, images, train: bool = False):
    """The CLS token of an image encoded alone (the image's summary in BEiT-3)."""
    return encoder(images, train=train)["encoder_out"][:, 0]


def text_features(encoder, text_ids, text_padding, train: bool = False):
    """The first token (bos) of a text encoded alone: BEiT-3's text summary."""
    return encoder(None, text_ids, text_padding_mask=text_padding,
                   train=train)["encoder_out"][:, 0]


def _unit(x):
    """x / |x| along the last axis (torch's F.normalize: the norm floored at 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class RetrievalModel(nn.Module):
    """BEiT3ForRetrieval: the encoder with a vision and a language head and a logit scale.

    Parameters: 'encoder' (the Multiway encoder's), 'vision_head', 'language_head' (kernels
    [D, D]) and 'logit_scale' (a scalar, the log of the similarity multiplier)."""
    encoder: nn.Module

    def setup(self):
        width = self.encoder.config.width
        head = lambda name: nn.Dense(width, use_bias=False, name=name,
                                     kernel_init=initializers.beit_trunc_normal())
        self.vision_head, self.language_head = head("vision_head"), head("language_head")
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT),
                                      ())

    def encode_images(self, images, train: bool = False):
        """Normalised images [B, H, W, C] -> unit vectors [B, D]."""
        return _unit(self.vision_head(image_features(self.encoder, images, train)))

    def encode_texts(self, text_ids, text_padding, train: bool = False):
        """Token ids [B, T] and padding [B, T] -> unit vectors [B, D]."""
        return _unit(self.language_head(text_features(self.encoder, text_ids, text_padding,
                                                      train)))

    def __call__(self, images, text_ids, text_padding, train: bool = False):
        """-> (image vectors [B, D], text vectors [B, D], logit scale (log))."""
        return (self.encode_images(images, train), self.encode_texts(text_ids, text_padding, train),
                self.logit_scale)

    def init_heads(self, x):
        """Touches the heads and the logit scale only: `init` with this method leaves the
        encoder's parameters out (they come pretrained)."""
        return self.vision_head(x), self.language_head(x), self.logit_scale


def init_params(model: RetrievalModel, encoder_params, key) -> dict:
    """The pretrained encoder's parameters with freshly drawn heads and logit scale."""
    width = model.encoder.config.width
    heads = model.init(key, jnp.zeros((1, width)), method=RetrievalModel.init_heads)["params"]
    return {**heads, "encoder": encoder_params}


def clip_loss(image_emb, text_emb, logit_scale):
    """unilm's ClipLoss on one device: logits exp(logit_scale) * image . text, cross-entropy
    towards the diagonal row-wise (image -> text) and column-wise (text -> image), averaged.
    Other captions of the same group in the batch count as negatives, as in unilm: the pairs
    still teach the groups apart, and the loss stays the reference's."""
    logits = jnp.exp(logit_scale) * image_emb @ text_emb.T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return (i2t + t2i) / 2


# --------------------------------------------------------------------------- fine-tune ---


def make_optimizer(params, *, steps: int, learning_rate: float, weight_decay: float,
                   warmup_steps: int) -> optax.GradientTransformation:
    """AdamW (betas 0.9 / 0.999, unilm's defaults), linear warmup then cosine to 0, decay
    masked as unilm's list says (NO_DECAY)."""
    schedule = optim.make_schedule(learning_rate, steps, warmup_steps)
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                       mask=optim.decay_mask(params, NO_DECAY))


def make_train_step(model: RetrievalModel, tx, data_cfg,
                    max_logit_scale: Optional[float] = None) -> Callable:
    """jitted (params, opt_state, batch, key) -> (params, opt_state, loss) on a pair batch
    {'image' uint8, 'text_ids', 'text_padding'}. With `max_logit_scale` the scale is clamped
    to log(max_logit_scale) after each update (CLIP's rule; unilm has none)."""
    def loss_fn(params, batch, key):
        images = data.normalize_images(batch["image"], data_cfg)
        # An encoder built with drop path draws its masks from the 'drop_path' stream.
        image_emb, text_emb, scale = model.apply({"params": params}, images, batch["text_ids"],
                                                 batch["text_padding"], train=True,
                                                 rngs={"drop_path": key})
        return clip_loss(image_emb, text_emb, scale)

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if max_logit_scale is not None:
            params = {**params, "logit_scale": jnp.minimum(params["logit_scale"],
                                                           math.log(max_logit_scale))}
        return params, opt_state, loss
    return step


def _check_vocabulary(encoder, tokenizer) -> None:
    if tokenizer.vocab_size > encoder.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the encoder's text "
                         f"embedding only {encoder.config.vocab_size} rows.")


def contrastive_finetune(encoder, encoder_params, data_cfg, text_cfg, tokenizer, *, steps: int,
                         batch_size: int, learning_rate: float, weight_decay: float, seed: int,
                         split: str = "train", warmup_steps: Optional[int] = None,
                         max_logit_scale: Optional[float] = None,
                         losses: Optional[list] = None) -> dict:
    """Trains the encoder and fresh heads on the image-caption pairs of `split` for `steps`
    steps; returns RetrievalModel's parameters.

    Batches come from the pair stream (mim_jax.data.text.create_pair_iterator): images
    augmented as `data_cfg` says, each image with one of its captions drawn per epoch (for
    mnist5k one of its digit's templates), deterministic in `seed`. `warmup_steps` defaults
    to a tenth of the steps. `losses`, a list, receives each step's loss."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    _check_vocabulary(encoder, tokenizer)
    text_cfg, _ = split_configs(text_cfg, data_cfg, split)
    model = RetrievalModel(encoder)
    key = jax.random.PRNGKey(seed)
    params = init_params(model, encoder_params, jax.random.fold_in(key, 0))
    warmup = steps // 10 if warmup_steps is None else warmup_steps
    tx = make_optimizer(params, steps=steps, learning_rate=learning_rate,
                        weight_decay=weight_decay, warmup_steps=warmup)
    opt_state = tx.init(params)
    step_fn = make_train_step(model, tx, data_cfg, max_logit_scale)
    batches = text_data.create_pair_iterator(text_cfg, data_cfg, tokenizer,
                                             global_batch_size=batch_size, seed=seed,
                                             process_index=0, process_count=1)
    for i in range(steps):
        params, opt_state, loss = step_fn(params, opt_state, next(batches),
                                          jax.random.fold_in(key, i + 1))
        if losses is not None:
            losses.append(float(loss))
    return params


# ---------------------------------------------------------------------------- scoring ---


def _batched(fn: Callable, arrays: Tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
    """fn over `arrays` in batches of `batch_size` (the last one padded, so one compile)."""
    n = len(arrays[0])
    out = []
    for start in range(0, n, batch_size):
        part = [a[start:start + batch_size] for a in arrays]
        rows = len(part[0])
        part = [np.concatenate([p, np.repeat(p[-1:], batch_size - rows, 0)]) for p in part]
        out.append(np.asarray(fn(*part))[:rows])
    return np.concatenate(out)


def embed(encoder, params, data_cfg, test: RetrievalSet, *, raw: bool = False,
          batch_size: int = EVAL_BATCH) -> Tuple[np.ndarray, np.ndarray]:
    """(image vectors [N, D], text vectors [M, D]) of a retrieval set.

    `params` are RetrievalModel's (the heads' unit vectors) or, with `raw`, the encoder's
    alone (its CLS and first-token features as they are: the zero-shot baseline)."""
    if raw:
        run = lambda method, *args: encoder.apply({"params": params}, *args, method=method)
        images_fn, texts_fn = image_features, text_features
    else:
        model = RetrievalModel(encoder)
        run = lambda method, *args: model.apply({"params": params}, *args, method=method)
        images_fn, texts_fn = RetrievalModel.encode_images, RetrievalModel.encode_texts
    image_emb = _batched(jax.jit(lambda x: run(images_fn, data.normalize_images(x, data_cfg))),
                         (test.images,), batch_size)
    text_emb = _batched(jax.jit(lambda ids, pad: run(texts_fn, ids, pad)),
                        (test.text_ids, test.text_padding), batch_size)
    return image_emb, text_emb


def retrieval_scores(encoder, encoder_params, data_cfg, text_cfg, tokenizer, *, steps: int,
                     batch_size: int, learning_rate: float, seed: int, test_split: str,
                     weight_decay: float = 0.05, split: str = "train",
                     max_test_images: Optional[int] = None, zero_shot: bool = True,
                     **finetune_kwargs) -> Dict[str, float]:
    """Recall@1 / @5 both ways on `test_split` after `contrastive_finetune` on `split`; with
    `zero_shot`, also 'zero_shot/...' keys: the same recall from the pretrained encoder's raw
    CLS / first-token features, before any fine-tuning (a baseline, not a BEiT-3 protocol)."""
    _check_vocabulary(encoder, tokenizer)
    test = retrieval_set(text_cfg, data_cfg, tokenizer, test_split, max_test_images)
    scores = {}
    if zero_shot:
        raw = recall_at_k(*embed(encoder, encoder_params, data_cfg, test, raw=True),
                          test.image_group, test.text_group)
        scores.update({f"zero_shot/{k}": v for k, v in raw.items()})
    params = contrastive_finetune(encoder, encoder_params, data_cfg, text_cfg, tokenizer,
                                  steps=steps, batch_size=batch_size,
                                  learning_rate=learning_rate, weight_decay=weight_decay,
                                  seed=seed, split=split, **finetune_kwargs)
    scores.update(recall_at_k(*embed(encoder, params, data_cfg, test),
                              test.image_group, test.text_group))
    return scores
