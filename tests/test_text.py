"""Tests of BEiT-3's text side (mim_jax.data.text): tokenizer, text and image-text streams."""

import io
import json
import os

import numpy as np
from PIL import Image
import pytest

import mim_jax.data as data
from mim_jax.data import text
from mim_jax.data.text import quickstart
from mim_jax.data.text import streams
from mim_jax.data.text.tokenizer import TextTokenizer, train_sentencepiece

# Texts whose every character the test model knows, so decoding gives them back exactly.
NUM_TEXTS = 40
TEXTS = [f"line {i} of the tiny corpus" for i in range(NUM_TEXTS)]
STRINGS = ["Who's there?", "Nay, answer me: stand, and unfold yourself.",
           "  two  spaces,\ta tab and\na newline ", "Ünïcödé ｆｕｌｌｗｉｄｔｈ ✓ zqx",
           "a handwritten digit seven", ""]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    corpus = list(quickstart.shakespeare_corpus()[:3000]) + TEXTS * 5
    return train_sentencepiece(corpus, 400, str(tmp_path_factory.mktemp("spm") / "tiny"))


@pytest.fixture(scope="module")
def tok(spm_file):
    return TextTokenizer(spm_file)


def _spm(path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=path)


# ------------------------------------------------------------ tokenizer ---


def test_tokenizer_has_xlmr_layout(tok, spm_file):
    sp = _spm(spm_file)
    assert tok.vocab_size == sp.get_piece_size() + 2 == 402
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 401)
    pieces = sp.encode("Who's there, Horatio?")
    np.testing.assert_array_equal(tok.tokenize("Who's there, Horatio?"), np.add(pieces, 1))
    # The model's own <unk> (piece 0) becomes id 3; an unseen character is unknown.
    assert 0 in sp.encode("✓") and 3 in tok.tokenize("✓").tolist()
    assert tok.decode(tok.encode(TEXTS[7], 16)[0]) == TEXTS[7]


def test_encode_adds_bos_eos_pads_and_truncates(tok):
    pieces = tok.tokenize("Nay, answer me")
    n = len(pieces)
    ids, padding = tok.encode("Nay, answer me", n + 5)
    assert ids.dtype == np.int32 and padding.dtype == bool
    np.testing.assert_array_equal(ids, [0, *pieces, 2, 1, 1, 1])
    np.testing.assert_array_equal(padding, [False] * (n + 2) + [True] * 3)
    ids, padding = tok.encode("Nay, answer me", 4)  # bos, two pieces, eos
    np.testing.assert_array_equal(ids, [0, *pieces[:2], 2])
    assert not padding.any()
    # Pre-tokenized ids (unilm's text_segment) are packed the same way.
    np.testing.assert_array_equal(tok.encode([7, 8, 9], 6)[0], [0, 7, 8, 9, 2, 1])
    batch_ids, batch_padding = tok.encode_batch(["Nay, answer me", [7, 8, 9], ""], 6)
    for row, item in enumerate(["Nay, answer me", [7, 8, 9], ""]):
        ids, padding = tok.encode(item, 6)
        np.testing.assert_array_equal(batch_ids[row], ids)
        np.testing.assert_array_equal(batch_padding[row], padding)
    with pytest.raises(ValueError, match="max_len=1 must be >= 2"):
        tok.encode("x", 1)


def test_matches_transformers_xlm_roberta_tokenizer(tok, spm_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    # BEiT-3 builds XLMRobertaTokenizer("beit3.spm"); transformers 5 reads the file by its
    # standard name in a folder.
    (tmp_path / "sentencepiece.bpe.model").write_bytes(open(spm_file, "rb").read())
    reference = transformers.XLMRobertaTokenizer.from_pretrained(str(tmp_path))
    assert len(reference) == tok.vocab_size and reference.mask_token_id == tok.mask_id
    assert (reference.bos_token_id, reference.pad_token_id, reference.eos_token_id,
            reference.unk_token_id) == (0, 1, 2, 3)
    for s in STRINGS + TEXTS[:3]:
        expected = reference(s)["input_ids"]
        ids, padding = tok.encode(s, 64)
        assert ids[~padding].tolist() == expected, s


def test_refuses_a_model_with_other_special_ids(tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "other"), vocab_size=30,
        unk_id=3, bos_id=0, eos_id=2, pad_id=1, minloglevel=2)
    with pytest.raises(ValueError, match=r"has <unk>, <s>, </s> at ids \(3, 0, 2\)"):
        TextTokenizer(str(tmp_path / "other.model"))


def test_training_is_reproducible(tmp_path):
    corpus = quickstart.shakespeare_corpus()[:500]
    a = train_sentencepiece(corpus, 100, str(tmp_path / "a"), max_sentences=300)
    b = train_sentencepiece(corpus, 100, str(tmp_path / "b"), max_sentences=300)
    # The files differ only in the model_prefix they record: compare the pieces and scores.
    pieces = [[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
              for sp in (_spm(a), _spm(b))]
    assert pieces[0] == pieces[1]
    with pytest.raises(ValueError, match="vocab_size=2 must be an integer >= 8"):
        train_sentencepiece(TEXTS, 2, str(tmp_path / "c"))


# ---------------------------------------------------------- text stream ---


def _texts_of(batches, tok):
    return [tok.decode(ids) for b in batches for ids in b["text_ids"]]


def _stream(tok, source, n, **kwargs):
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1,
              **kwargs}
    stream = streams.TextStream(source, tok, 16, **kwargs)
    return [next(stream) for _ in range(n)], stream


def test_text_stream_batches_are_deterministic_and_cover_an_epoch(tok):
    source = streams.InMemoryTexts(TEXTS)
    batches, stream = _stream(tok, source, 10)
    assert stream.steps_per_epoch == 10 and stream.step == 10
    assert batches[0]["text_ids"].shape == (4, 16) and batches[0]["text_ids"].dtype == np.int32
    assert batches[0]["text_padding"].dtype == bool
    assert sorted(_texts_of(batches, tok)) == sorted(TEXTS)  # one epoch: every text once
    again, _ = _stream(tok, source, 10)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
    other, _ = _stream(tok, source, 10, seed=1)
    assert _texts_of(other, tok) != _texts_of(batches, tok)


def test_text_stream_resumes_exactly_across_epochs(tok):
    source = streams.InMemoryTexts(TEXTS)
    fresh, _ = _stream(tok, source, 23)  # 2.3 epochs
    for start in (7, 10, 19):
        resumed, _ = _stream(tok, source, 23 - start, start_step=start)
        for a, b in zip(fresh[start:], resumed):
            np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
            np.testing.assert_array_equal(a["text_padding"], b["text_padding"])


def test_text_stream_shards_are_disjoint(tok):
    source = streams.InMemoryTexts(TEXTS)
    seen = []
    for process in range(2):
        batches, stream = _stream(tok, source, 10, global_batch_size=4, process_index=process,
                                  process_count=2)
        assert stream.steps_per_epoch == 10 and stream.local_batch_size == 2
        seen.append(_texts_of(batches, tok))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(TEXTS)
    with pytest.raises(ValueError, match="text batch size 3 must be a positive multiple"):
        _stream(tok, source, 1, global_batch_size=3, process_count=2)
    with pytest.raises(ValueError, match="text batch size 64 is larger than texts with 40"):
        _stream(tok, source, 1, global_batch_size=64)


def test_text_files_skip_blank_lines(tok, tmp_path):
    (tmp_path / "a.txt").write_bytes("line 0 of the tiny corpus\n\n   \nline 1 of the tiny "
                                     "corpus\r\n".encode())
    (tmp_path / "b.txt").write_text("".join(t + "\n\n" for t in TEXTS[2:]) + "no newline")
    source = streams.TextFiles(streams.expand_files([str(tmp_path / "*.txt")]))
    assert source.num_examples == NUM_TEXTS + 1
    assert source.get([0, 1, 2, NUM_TEXTS]) == [TEXTS[0], TEXTS[1], TEXTS[2], "no newline"]
    with pytest.raises(ValueError, match=r"text.files: '.*nothing\*' matches no file"):
        streams.expand_files([str(tmp_path / "nothing*")])
    cfg = text.default_text_config()
    cfg.update(corpus="files", files=f"{tmp_path}/a.txt, {tmp_path}/b.txt", max_len=16)
    it = text.create_text_iterator(cfg, tok, global_batch_size=41, seed=0, process_index=0,
                                   process_count=1)
    assert sorted(_texts_of([next(it)], tok)) == sorted(TEXTS + ["no newline"])


def test_text_config_errors_name_the_field(tmp_path):
    cfg = text.default_text_config()
    text.validate_text_config(cfg)
    for field, value, message in [
            ("spm_model", "missing.spm", "text.spm_model='missing.spm' must be"),
            ("max_len", 1, "text.max_len=1 must be an integer >= 2"),
            ("corpus", "files", "text.files=None: text.corpus='files' needs"),
            ("corpus", "no_such_corpus", "text.corpus='no_such_corpus' must be"),
            ("pairs", "jsonl", "text.pair_index=None: text.pairs='jsonl' needs"),
            ("pairs", "no_such_pairs", "text.pairs='no_such_pairs' must be")]:
        bad = text.default_text_config()
        bad[field] = value
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            text.validate_text_config(bad)


# ---------------------------------------------------- quickstart data ---


def test_quickstart_corpus_and_synthetic_captions():
    corpus = quickstart.shakespeare_corpus()
    assert len(corpus) == 38942 and len(quickstart.shakespeare_files()) == 42
    assert all(c and "\n" not in c for c in corpus[:2000])
    assert quickstart.digit_captions(7)[0] == "a handwritten digit seven"
    assert "a handwritten 3" in quickstart.digit_captions(3)
    captions = [quickstart.digit_captions(d) for d in range(10)]
    assert all(len(c) == len(quickstart.CAPTION_TEMPLATES) for c in captions)
    assert len({c for cs in captions for c in cs}) == 10 * len(quickstart.CAPTION_TEMPLATES)
    with pytest.raises(ValueError, match="label=10 must be a digit 0-9"):
        quickstart.digit_captions(10)


def test_quickstart_corpus_file_reads_as_the_corpus(tmp_path):
    path = quickstart.write_corpus(str(tmp_path))
    source = streams.TextFiles([path])
    assert source.num_examples == len(quickstart.shakespeare_corpus())
    assert source.get([0, 1000]) == [quickstart.shakespeare_corpus()[i] for i in (0, 1000)]


# ------------------------------------------------------------ pairs ---

NUM_PAIRS = 12


def _level(i):
    return 10 + 20 * i  # a constant image's grey level names its pair


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    """NUM_PAIRS constant PNGs in images/ and an index: "text" lines and unilm lines."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    lines = []
    for i in range(NUM_PAIRS):
        Image.fromarray(np.full((12, 10, 3), _level(i), np.uint8)).save(
            root / "images" / f"{i}.png")
        if i % 3:
            lines.append({"image_path": f"images/{i}.png", "text": TEXTS[i]})
        else:  # unilm's format: ids of the text without bos / eos
            lines.append({"image_path": f"images/{i}.png", "text_segment": [10 + i, 11 + i],
                          "image_id": i})
    (root / "index.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _pair_cfgs(folder, **text_overrides):
    text_cfg = text.default_text_config()
    text_cfg.update(pairs="jsonl", pair_index=str(folder / "index.jsonl"), max_len=12,
                    **text_overrides)
    data_cfg = data.default_data_config()
    data_cfg.update(image_size=8, channels=3, crop_scale=None, flip=False)
    return text_cfg, data_cfg


def _pair_batches(tok, folder, n, **kwargs):
    text_cfg, data_cfg = _pair_cfgs(folder)
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1,
              **kwargs}
    it = text.create_pair_iterator(text_cfg, data_cfg, tok, **kwargs)
    return [next(it) for _ in range(n)], it


def _pair_ids(batches):
    return [int(round((v - 10) / 20)) for b in batches for v in b["image"][:, 0, 0, 0]]


def test_pair_index_reads_text_and_unilm_lines(pair_folder, tmp_path):
    from mim_jax.data.text import pairs

    paths, captions = pairs.read_index([str(pair_folder / "index.jsonl")])
    assert paths[4] == os.path.join(str(pair_folder), "images/4.png")
    assert captions[4] == TEXTS[4] and captions[3] == [13, 14]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_path": "a.png", "text": "fine"}\n\n{"image_path": "b.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: needs a caption in 'text' or "
                                         r"'text_segment'"):
        pairs.read_index([str(bad)])
    bad.write_text('{"text": "no image"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: needs 'image_path'"):
        pairs.read_index([str(bad)])


def test_pair_stream_keeps_images_with_their_captions(tok, pair_folder):
    batches, it = _pair_batches(tok, pair_folder, 6)  # two epochs of 3 steps
    assert it.steps_per_epoch == 3 and it.step == 6
    b = batches[0]
    assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.uint8
    assert b["text_ids"].shape == b["text_padding"].shape == (4, 12)
    for batch in batches:
        for i, ids, padding in zip(_pair_ids([batch]), batch["text_ids"], batch["text_padding"]):
            expected = (tok.encode([10 + i, 11 + i], 12) if i % 3 == 0
                        else tok.encode(TEXTS[i], 12))
            np.testing.assert_array_equal(ids, expected[0])
            np.testing.assert_array_equal(padding, expected[1])
    assert sorted(_pair_ids(batches[:3])) == list(range(NUM_PAIRS))
    assert _pair_ids(batches[:3]) != _pair_ids(batches[3:])  # each epoch its own order


def test_pair_stream_is_deterministic_resumable_and_sharded(tok, pair_folder):
    fresh, _ = _pair_batches(tok, pair_folder, 5)
    resumed, _ = _pair_batches(tok, pair_folder, 1, start_step=4)
    for key in ("image", "text_ids", "text_padding"):
        np.testing.assert_array_equal(fresh[4][key], resumed[0][key])
    other, _ = _pair_batches(tok, pair_folder, 3, seed=1)
    assert _pair_ids(other) != _pair_ids(fresh[:3])
    shards = [_pair_ids(_pair_batches(tok, pair_folder, 3, process_index=p, process_count=2)[0])
              for p in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(NUM_PAIRS))


# ------------------------------------------------------------ TFDS ---

NUM_TFDS = 8


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A TFDS dataset built in memory: constant images with a label, captions and a text."""
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(12, 10, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=10),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "text": tfds.features.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(NUM_TFDS):
                yield i, {"image": np.full((12, 10, 3), _level(i), np.uint8), "label": i,
                          "captions": {"text": _candidates(i)}, "text": TEXTS[i]}

    data_dir = str(tmp_path_factory.mktemp("tiny_tfds"))
    TinyCaptions(data_dir=data_dir).download_and_prepare()
    return "tiny_captions", data_dir


def _candidates(i):
    return [TEXTS[i + NUM_TFDS * k] for k in range(1 + i % 3)]  # 1 to 3 captions


def _tfds_pair_batches(tok, tiny_tfds, n, **kwargs):
    name, data_dir = tiny_tfds
    text_cfg = text.default_text_config()
    text_cfg.update(pairs=name, max_len=12)
    data_cfg = data.default_data_config()
    data_cfg.update(data_dir=data_dir, image_size=8, crop_scale=None, flip=False)
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1,
              **kwargs}
    it = text.create_pair_iterator(text_cfg, data_cfg, tok, **kwargs)
    return [next(it) for _ in range(n)]


def test_tfds_pairs_draw_one_of_each_images_captions(tok, tiny_tfds):
    batches = _tfds_pair_batches(tok, tiny_tfds, 8)  # four epochs
    drawn = {}
    for b in batches:
        for i, caption in zip(_pair_ids([b]), _texts_of([b], tok)):
            assert caption in _candidates(i)
            drawn.setdefault(i, set()).add(caption)
    assert len(drawn[5]) > 1  # three candidates, redrawn every epoch
    resumed = _tfds_pair_batches(tok, tiny_tfds, 2, start_step=6)
    for a, b in zip(batches[6:], resumed):
        for key in ("image", "text_ids", "text_padding"):
            np.testing.assert_array_equal(a[key], b[key])
    shards = [_pair_ids(_tfds_pair_batches(tok, tiny_tfds, 2, process_index=p,
                                           process_count=2)) for p in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(NUM_TFDS))


def test_mnist5k_pairs_caption_each_image_by_its_label(tok, tiny_tfds):
    from mim_jax.data.text import pairs

    name, data_dir = tiny_tfds
    cfg = data.default_data_config()
    cfg.update(name=name, data_dir=data_dir)
    source = pairs.mnist5k_pairs(cfg)
    records = list(source.epoch_records("train", 0, 1, shuffle_seed=3, shuffle_buffer=16)
                   .as_numpy_iterator())
    assert len(records) == NUM_TFDS
    for record in records:
        level = np.asarray(Image.open(io.BytesIO(record["ref"])))[0, 0, 0]
        i = (int(level) - 10) // 20
        assert record["text"].decode() in quickstart.digit_captions(i)


def test_tfds_text_stream(tok, tiny_tfds):
    name, data_dir = tiny_tfds
    cfg = text.default_text_config()
    cfg.update(corpus=name, data_dir=data_dir, max_len=16)

    def batches(n, **kwargs):
        kwargs = {"global_batch_size": 2, "seed": 0, "process_index": 0, "process_count": 1,
                  **kwargs}
        it = text.create_text_iterator(cfg, tok, **kwargs)
        return [next(it) for _ in range(n)]

    fresh = batches(6)  # 1.5 epochs
    assert sorted(_texts_of(fresh[:4], tok)) == sorted(TEXTS[:NUM_TFDS])
    for a, b in zip(fresh[3:], batches(3, start_step=3)):
        np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
    shards = [_texts_of(batches(4, process_index=p, process_count=2), tok) for p in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(TEXTS[:NUM_TFDS])
    cfg.text_key = "caption"
    with pytest.raises(ValueError, match="text.text_key='caption' is not a feature of TFDS "
                                         "dataset 'tiny_captions'"):
        batches(1)


def test_quickstart_spm_is_built_once_and_knows_the_caption_words(tmp_path):
    cfg = text.default_text_config()
    tok = text.load_tokenizer(cfg, str(tmp_path))  # spm_model='quickstart'
    path = os.path.join(str(tmp_path), "quickstart_1000.model")
    assert tok.model_file == path and tok.vocab_size == 1002
    for digit, word in enumerate(quickstart.DIGIT_WORDS):
        assert len(tok.tokenize(" " + word)) == 1, word  # one piece per digit word
        assert tok.decode(tok.tokenize(quickstart.digit_captions(digit)[0])) == \
            quickstart.digit_captions(digit)[0]
    built = os.stat(path).st_mtime_ns
    assert text.load_tokenizer(cfg, str(tmp_path)).vocab_size == 1002
    assert os.stat(path).st_mtime_ns == built  # found, not trained again


def test_ids_from_another_vocabulary_are_refused(tok):
    with pytest.raises(ValueError, match=r"token ids 5..402 are outside this tokenizer's "
                                         r"vocabulary 0..401"):
        tok.encode([5, 402], 8)



def _mixed_cfgs(tiny_tfds, tmp_path):
    name, data_dir = tiny_tfds
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(t + "\n" for t in TEXTS))
    text_cfg = text.default_text_config()
    text_cfg.update(pairs=name, corpus="files", files=str(corpus), max_len=12)
    data_cfg = data.default_data_config()
    data_cfg.update(name=name, data_dir=data_dir, image_size=8, crop_scale=None, flip=False)
    return text_cfg, data_cfg


def _mixed_batches(tok, tiny_tfds, tmp_path, n, sizes, **kwargs):
    kwargs = {"seed": 0, "process_index": 0, "process_count": 1, **kwargs}
    it = text.create_mixed_iterator(*_mixed_cfgs(tiny_tfds, tmp_path), tok, sizes, **kwargs)
    return [next(it) for _ in range(n)], it


def test_mixed_stream_merges_the_streams_and_resumes_exactly(tok, tiny_tfds, tmp_path):
    sizes = {"image": 2, "text": 4, "pair": 2}
    fresh, it = _mixed_batches(tok, tiny_tfds, tmp_path, 6, sizes)
    assert sorted(fresh[0]) == ["image", "pair_image", "pair_text_ids", "pair_text_padding",
                                "text_ids", "text_padding"]
    assert fresh[0]["image"].shape == fresh[0]["pair_image"].shape == (2, 8, 8, 3)
    assert fresh[0]["text_ids"].shape == (4, 12) and fresh[0]["pair_text_ids"].shape == (2, 12)
    assert it.steps_per_epoch == NUM_TFDS // 2  # an epoch is the image stream's
    # Images and pairs read the same dataset, each in its own order (its own seed).
    images = [_pair_ids([b]) for b in fresh[:4]]
    pair_images = [_pair_ids([{"image": b["pair_image"]}]) for b in fresh[:4]]
    assert images != pair_images
    assert sorted(sum(images, [])) == sorted(sum(pair_images, [])) == list(range(NUM_TFDS))
    # Each part is what its own iterator gives.
    text_cfg, _ = _mixed_cfgs(tiny_tfds, tmp_path)
    alone = text.create_text_iterator(text_cfg, tok, global_batch_size=4, seed=0,
                                      process_index=0, process_count=1)
    for batch in fresh:
        np.testing.assert_array_equal(next(alone)["text_ids"], batch["text_ids"])
    resumed, _ = _mixed_batches(tok, tiny_tfds, tmp_path, 2, sizes, start_step=4)
    for a, b in zip(fresh[4:], resumed):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # A stream of size 0 is left out; the epoch is then the next stream's.
    texts_only, it = _mixed_batches(tok, tiny_tfds, tmp_path, 1, {"image": 0, "text": 4})
    assert sorted(texts_only[0]) == ["text_ids", "text_padding"]
    assert it.steps_per_epoch == NUM_TEXTS // 4
