"""Tests of BEiT-3 image-text retrieval (mim_jax.evaluators.retrieval)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import mim_jax.data as data
from mim_jax import optim
from mim_jax.data import text
from mim_jax.data.text import quickstart
from mim_jax.data.text.tokenizer import TextTokenizer, train_sentencepiece
from mim_jax.evaluators import retrieval
from mim_jax.models import multiway

MAX_LEN = 12  # the longest digit caption is 8 words, plus bos and eos


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A word-level model of the 50 digit captions: one piece per word, no <unk>."""
    captions = [c for d in range(10) for c in quickstart.digit_captions(d)]
    path = str(tmp_path_factory.mktemp("spm") / "digits")
    return TextTokenizer(train_sentencepiece(captions, 50, path, model_type="word"))


@pytest.fixture(scope="module")
def encoder(tok):
    arch = multiway.preset("base", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=7,
                           image_size=28, channels=1, vocab_size=tok.vocab_size,
                           max_text_positions=MAX_LEN + multiway.POSITION_OFFSET)
    enc = multiway.MultiwayEncoder(arch)
    params = jax.jit(enc.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                               jnp.zeros((1, 4), jnp.int32))["params"]
    # A random encoder's CLS and bos outputs are almost only their N(0, 1) position rows, the
    # same for every input; scaled down, the content reaches them, as after pretraining.
    params = {**params, "vision_pos_embed": params["vision_pos_embed"] * 0.02,
              "text_pos_embed": params["text_pos_embed"] * 0.02}
    return enc, params


def _cfgs(tfds_dir, **text_overrides):
    text_cfg = text.default_text_config()
    text_cfg.update(max_len=MAX_LEN, **text_overrides)
    data_cfg = data.default_data_config()
    data_cfg.update(data_dir=tfds_dir, image_size=28, channels=1, mean=(0.5,), std=(0.5,),
                    crop_scale=None, flip=False, shuffle_buffer=512)
    return text_cfg, data_cfg


# -------------------------------------------------------------------------- recall@k ---


def test_recall_of_perfect_and_reversed_embeddings():
    n = 8
    eye = np.eye(n, dtype=np.float32)
    groups = np.arange(n)
    perfect = retrieval.recall_at_k(eye * 3.0, eye, groups, groups)  # cosine: scale-free
    assert perfect == {"i2t_r1": 100.0, "i2t_r5": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0}
    # Each image's own caption points away from it (cosine -1): ranked last, every other at 0.
    reversed_ = retrieval.recall_at_k(eye, -eye, groups, groups)
    assert reversed_ == {"i2t_r1": 0.0, "i2t_r5": 0.0, "t2i_r1": 0.0, "t2i_r5": 0.0}
    with pytest.raises(ValueError, match="8 image and 8 text embeddings for 7 image"):
        retrieval.recall_at_k(eye, eye, groups[:7], groups)
    with pytest.raises(ValueError, match=r"ks=\(0, 5\) must be positive integers"):
        retrieval.recall_at_k(eye, eye, groups, groups, ks=(0, 5))


def test_recall_counts_any_caption_of_the_group():
    images = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
    texts = np.array([[1, 0.1], [0.1, 1], [0.9, 0.45]], np.float32)
    image_group, text_group = np.array([0, 0, 1, 1]), np.array([0, 1, 1])
    got = retrieval.recall_at_k(images, texts, image_group, text_group, ks=(1, 2, 3))
    # Worked by hand: image 1's nearest caption (2) is of group 1, its second (0) of its own;
    # image 3 (group 1) is nearest to caption 1 although their cosine is negative. Caption 2
    # (group 1) ranks images 1, 0 (group 0) before image 2.
    expected = {"i2t_r1": 75.0, "i2t_r2": 100.0, "i2t_r3": 100.0,
                "t2i_r1": 200 / 3, "t2i_r2": 200 / 3, "t2i_r3": 100.0}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_recall_matches_a_full_sort_over_many_queries():
    # More images than one chunk of the implementation (1024), ties impossible.
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(1100, 16)), rng.normal(size=(300, 16))
    image_group, text_group = rng.integers(0, 60, 1100), rng.integers(0, 60, 300)
    got = retrieval.recall_at_k(images, texts, image_group, text_group, ks=(1, 5, 10))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit(images) @ unit(texts).T
    for k in (1, 5, 10):
        i2t = [image_group[i] in text_group[np.argsort(-sims[i])[:k]] for i in range(1100)]
        t2i = [text_group[j] in image_group[np.argsort(-sims[:, j])[:k]] for j in range(300)]
        assert got[f"i2t_r{k}"] == pytest.approx(100 * np.mean(i2t))
        assert got[f"t2i_r{k}"] == pytest.approx(100 * np.mean(t2i))
    assert 0 < got["i2t_r1"] < got["i2t_r5"] < got["i2t_r10"] < 100


# ------------------------------------------------------------------ loss and model ---


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_clip_loss_matches_numpy():
    rng = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    images, texts = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(6, 8)))
    scale = math.log(1 / 0.07)
    logits = np.exp(scale) * images @ texts.T
    expected = -(np.trace(_log_softmax(logits, 1)) + np.trace(_log_softmax(logits, 0))) / 12
    got = retrieval.clip_loss(jnp.asarray(images), jnp.asarray(texts), jnp.float32(scale))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Texts equal to their images: near 0 at a large scale, log(6) at scale exp(-inf) = 0.
    assert float(retrieval.clip_loss(images, images, jnp.float32(6.0))) < 0.05
    assert float(retrieval.clip_loss(images, images, jnp.float32(-30.0))) == \
        pytest.approx(math.log(6), rel=1e-4)


def test_heads_and_logit_scale_init_and_weight_decay(encoder):
    enc, enc_params = encoder
    model = retrieval.RetrievalModel(enc)
    params = retrieval.init_params(model, enc_params, jax.random.PRNGKey(3))
    assert params["encoder"] is enc_params  # pretrained weights untouched
    assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07), rel=1e-7)
    for head in ("vision_head", "language_head"):
        assert list(params[head]) == ["kernel"] and params[head]["kernel"].shape == (32, 32)
        kernel = np.asarray(params[head]["kernel"])
        assert np.abs(kernel).max() <= 0.02 and 0.005 < kernel.std() < 0.015  # cut at 1 std
    mask = optim.decay_mask(params, retrieval.NO_DECAY)
    assert mask["vision_head"]["kernel"] and mask["language_head"]["kernel"]
    assert mask["encoder"]["text_embed"]  # unilm decays the text tables
    assert not mask["logit_scale"] and not mask["encoder"]["vision_pos_embed"]
    assert not mask["encoder"]["cls_token"]


def test_train_step_loss_and_logit_scale_clamp(encoder, tok):
    enc, enc_params = encoder
    model = retrieval.RetrievalModel(enc)
    params = retrieval.init_params(model, enc_params, jax.random.PRNGKey(3))
    rng = np.random.default_rng(2)
    ids, padding = tok.encode_batch([quickstart.digit_captions(d)[0] for d in range(4)], MAX_LEN)
    batch = {"image": rng.integers(0, 256, (4, 28, 28, 1), dtype=np.uint8), "text_ids": ids,
             "text_padding": padding}
    _, data_cfg = _cfgs(None)
    images = data.normalize_images(batch["image"], data_cfg)
    image_emb, text_emb, scale = jax.jit(model.apply)({"params": params}, images, ids, padding)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-5)
    expected = float(retrieval.clip_loss(image_emb, text_emb, scale))

    tx = retrieval.make_optimizer(params, steps=10, learning_rate=1e-2, weight_decay=0.05,
                                  warmup_steps=0)
    max_scale = 20.0  # above 1 / 0.07 = 14.3
    step = retrieval.make_train_step(model, tx, data_cfg, max_logit_scale=max_scale)
    new, _, loss = step(params, tx.init(params), batch, jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(expected, rel=1e-5)  # the loss before the update
    # Learned, and not decayed: Adam's first step moves it by the lr exactly (0.0113 with the
    # weight decay of 0.05 x 2.66 on top).
    moved = float(new["logit_scale"]) - math.log(1 / 0.07)
    assert abs(moved) == pytest.approx(1e-2, rel=1e-3)
    # Beyond log(max_logit_scale), it is clamped back after the update.
    high = {**params, "logit_scale": jnp.float32(math.log(max_scale) + 1.0)}
    new, _, _ = step(high, tx.init(high), batch, jax.random.PRNGKey(0))
    assert float(new["logit_scale"]) == pytest.approx(math.log(max_scale), rel=1e-6)


# --------------------------------------------------------------------- the data ---


def test_mnist5k_set_groups_by_digit(tfds_dir, tok):
    text_cfg, data_cfg = _cfgs(tfds_dir)
    full = retrieval.retrieval_set(text_cfg, data_cfg, tok, "test")
    assert full.images.shape == (500, 28, 28, 1) and full.images.dtype == np.uint8
    assert full.text_ids.shape == full.text_padding.shape == (50, MAX_LEN)
    assert full.text_ids.dtype == np.int32 and full.text_padding.dtype == bool
    np.testing.assert_array_equal(np.bincount(full.image_group), [50] * 10)
    np.testing.assert_array_equal(full.text_group, np.repeat(np.arange(10), 5))
    for j in (0, 17, 49):
        assert tok.decode(full.text_ids[j]) in quickstart.digit_captions(full.text_group[j])
    # The eval path: the same pixels and labels as data.eval_batches, in its order.
    first = next(data.eval_batches(data_cfg, "test", global_batch_size=16))
    np.testing.assert_array_equal(full.images[:16], first["image"])
    np.testing.assert_array_equal(full.image_group[:16], first["label"])
    few = retrieval.retrieval_set(text_cfg, data_cfg, tok, "test", max_images=3)
    np.testing.assert_array_equal(few.images, full.images[:3])
    # Only the captions of the digits shown (the test split opens 0, 1, 2, ...).
    np.testing.assert_array_equal(few.text_group, np.repeat(np.unique(few.image_group), 5))
    assert len(few.text_ids) == 5 * len(np.unique(few.image_group)) < 50


def _png(path, level):
    Image.fromarray(np.full((10, 14, 3), level, np.uint8)).save(path)


def test_jsonl_set_groups_by_image(tmp_path, tok):
    for name, level in (("a", 40), ("b", 120), ("c", 200)):
        _png(tmp_path / f"{name}.png", level)
    lines = [("a.png", "a handwritten digit one"), ("b.png", "a handwritten 2"),
             ("a.png", "a handwritten 1"), ("c.png", [10, 11]), ("c.png", "a handwritten 3")]
    index = tmp_path / "test.jsonl"
    index.write_text("".join(json.dumps({"image_path": p, ("text" if isinstance(t, str) else
                                                           "text_segment"): t}) + "\n"
                             for p, t in lines))
    text_cfg, data_cfg = _cfgs(None, pairs="jsonl", pair_index=str(index))
    data_cfg.update(channels=3, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    got = retrieval.retrieval_set(text_cfg, data_cfg, tok, str(index))
    assert got.images.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(got.images[:, 4, 4, 0], [40, 120, 200])  # first-seen order
    np.testing.assert_array_equal(got.image_group, [0, 1, 2])
    np.testing.assert_array_equal(got.text_group, [0, 1, 0, 2, 2])
    np.testing.assert_array_equal(got.text_ids[3], tok.encode([10, 11], MAX_LEN)[0])
    assert tok.decode(got.text_ids[2]) == "a handwritten 1"
    two = retrieval.retrieval_set(text_cfg, data_cfg, tok, str(index), max_images=2)
    assert len(two.images) == 2 and two.text_group.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"text.pair_index='test': text.pairs='jsonl' needs"):
        retrieval.retrieval_set(text_cfg, data_cfg, tok, "test")


@pytest.fixture(scope="module")
def captions_tfds(tmp_path_factory):
    """A TFDS dataset of 3 constant images with 1, 2 and 3 captions."""
    import tensorflow_datasets as tfds

    class RetrievalCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(10, 14, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                texts = [quickstart.digit_captions(i)[k] for k in range(i + 1)]
                yield i, {"image": np.full((10, 14, 3), 50 * (i + 1), np.uint8),
                          "captions": {"text": texts}}

    data_dir = str(tmp_path_factory.mktemp("captions_tfds"))
    RetrievalCaptions(data_dir=data_dir).download_and_prepare()
    return "retrieval_captions", data_dir


def test_tfds_caption_set_groups_by_image(captions_tfds, tok):
    name, data_dir = captions_tfds
    text_cfg, data_cfg = _cfgs(data_dir, pairs=name)
    data_cfg.update(channels=3, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    got = retrieval.retrieval_set(text_cfg, data_cfg, tok, "test")
    np.testing.assert_array_equal(got.image_group, [0, 1, 2])
    # In the files' order (TFDS shuffled the examples when it wrote them); example i has the
    # grey level 50 (i + 1) and i + 1 captions.
    examples = got.images[:, 3, 3, 1] // 50 - 1
    assert sorted(examples) == [0, 1, 2]
    for group, example in enumerate(examples):
        captions = [tok.decode(ids) for ids in got.text_ids[got.text_group == group]]
        assert captions == quickstart.digit_captions(example)[:example + 1]
    assert len(got.text_group) == 6
    two = retrieval.retrieval_set(text_cfg, data_cfg, tok, "test", max_images=2)
    assert len(two.text_ids) == examples[0] + examples[1] + 2
    text_cfg.caption_key = "captions/caption"
    with pytest.raises(ValueError, match="text.caption_key='captions/caption' is not a feature"):
        retrieval.retrieval_set(text_cfg, data_cfg, tok, "test")


# -------------------------------------------------------------------- fine-tuning ---


def test_finetune_beats_the_untrained_encoder(tfds_dir, tok, encoder):
    enc, enc_params = encoder
    text_cfg, data_cfg = _cfgs(tfds_dir)
    scores = retrieval.retrieval_scores(enc, enc_params, data_cfg, text_cfg, tok, steps=400,
                                        batch_size=32, learning_rate=1e-3, seed=0,
                                        test_split="test", max_test_images=200)
    # 10 digits: an encoder that knows nothing finds the right one 10% of the time at R@1.
    for key in ("i2t_r1", "t2i_r1"):
        assert scores[f"zero_shot/{key}"] < 20, scores
        assert scores[key] > scores[f"zero_shot/{key}"] + 20, scores
    assert scores["t2i_r5"] > 60, scores


def test_vocabulary_larger_than_the_encoder_is_refused(tfds_dir, tok, encoder):
    enc, enc_params = encoder
    small = multiway.MultiwayEncoder(multiway.preset(
        "base", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=7, image_size=28,
        channels=1, vocab_size=tok.vocab_size - 1))
    text_cfg, data_cfg = _cfgs(tfds_dir)
    with pytest.raises(ValueError, match=f"the tokenizer has {tok.vocab_size} ids but the "
                                         f"encoder's text embedding only {tok.vocab_size - 1}"):
        retrieval.contrastive_finetune(small, enc_params, data_cfg, text_cfg, tok, steps=1,
                                       batch_size=4, learning_rate=1e-3, weight_decay=0.0,
                                       seed=0)
