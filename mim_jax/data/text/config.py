"""The `text` config block: tokenizer, text corpus and image-text pairs; cheap validation."""

from __future__ import annotations

import os

import ml_collections

from mim_jax.data import config as data_config

QUICKSTART = "quickstart"  # spm_model: the quickstart's model, built on first use
SHAKESPEARE = "shakespeare"  # corpus: the offline quickstart corpus (text/quickstart.py)
FILES = "files"  # corpus: plain-text files
MNIST5K_PAIRS = "mnist5k"  # pairs: the bundled digits with synthetic captions
JSONL = "jsonl"  # pairs: images listed with their captions in JSONL index files


def default_text_config() -> ml_collections.ConfigDict:
    """The text section of a BEiT-3 config, with documented defaults."""
    optional = data_config.optional_field
    c = ml_collections.ConfigDict()
    # SentencePiece model read with XLM-R's ids (BEiT-3's beit3.spm), or 'quickstart'.
    c.spm_model = QUICKSTART
    c.max_len = 64  # tokens per text, bos and eos included (T of text_ids)
    # Text-only stream: 'shakespeare', 'files' or a TFDS dataset name (e.g. 'lm1b').
    c.corpus = SHAKESPEARE
    c.files = optional(str)  # corpus='files': comma-separated paths or globs
    c.text_key = "text"  # TFDS corpus: the feature holding the text
    c.split = "train"  # TFDS corpus: its split
    c.data_dir = optional(str)  # TFDS corpus: None -> the TFDS default
    c.shuffle_buffer = 10_000  # TFDS corpus: texts shuffled at a time
    # Image-text stream: 'mnist5k', 'jsonl' or a TFDS dataset name (e.g. 'coco_captions'). The
    # images are read and augmented as the data section says (its data_dir, image_size, ...).
    c.pairs = MNIST5K_PAIRS
    c.pair_index = optional(str)  # pairs='jsonl': comma-separated index files
    c.pair_root = optional(str)  # pairs='jsonl': image paths' root (default: index's folder)
    c.pair_split = "train"  # TFDS pairs: the split
    c.caption_key = "captions/text"  # TFDS pairs: the feature holding an image's captions
    return c


def split_list(value) -> list:
    """'a, b' -> ['a', 'b']; a list or tuple as it is."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def _is_tfds_name(name: str) -> bool:
    return data_config._is_registered_tfds_builder(name)  # pylint: disable=protected-access


def validate_text_config(cfg) -> None:
    """Raises ValueError naming the offending text.* field; cheap (no data is read)."""
    spm_model = cfg.get("spm_model")
    if spm_model != QUICKSTART and not (isinstance(spm_model, str) and os.path.isfile(spm_model)):
        raise ValueError(f"text.spm_model={spm_model!r} must be a SentencePiece model file "
                         f"(.spm / .model) or {QUICKSTART!r}.")
    max_len = cfg.get("max_len")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"text.max_len={max_len!r} must be an integer >= 2 (bos and eos).")
    corpus = cfg.get("corpus")
    if corpus == FILES:
        if not split_list(cfg.get("files")):
            raise ValueError(f"text.files={cfg.get('files')!r}: text.corpus='{FILES}' needs "
                             "comma-separated text files or globs.")
    elif corpus != SHAKESPEARE and not (isinstance(corpus, str) and corpus
                                        and _is_tfds_name(corpus)):
        raise ValueError(f"text.corpus={corpus!r} must be '{SHAKESPEARE}', '{FILES}' or a "
                         "registered TFDS dataset name.")
    pairs = cfg.get("pairs")
    if pairs == JSONL:
        index = split_list(cfg.get("pair_index"))
        missing = [f for f in index if not os.path.isfile(f)]
        if not index or missing:
            raise ValueError(f"text.pair_index={cfg.get('pair_index')!r}: text.pairs='{JSONL}' "
                             f"needs comma-separated JSONL index files"
                             f"{'; missing: ' + ', '.join(missing) if missing else ''}.")
        root = cfg.get("pair_root")
        if root and not os.path.isdir(root):
            raise ValueError(f"text.pair_root={root!r} is not a directory.")
    elif pairs != MNIST5K_PAIRS and not (isinstance(pairs, str) and pairs and _is_tfds_name(pairs)):
        raise ValueError(f"text.pairs={pairs!r} must be '{MNIST5K_PAIRS}', '{JSONL}' or a "
                         "registered TFDS dataset name.")
    if cfg.get("shuffle_buffer", 1) < 1:
        raise ValueError(f"text.shuffle_buffer={cfg.shuffle_buffer} must be >= 1.")


def pair_data_config(text_cfg, data_cfg) -> ml_collections.ConfigDict:
    """The data section that reads the pairs' images: `data_cfg`'s image settings on the
    pairs' dataset."""
    cfg = data_cfg.copy_and_resolve_references()
    if text_cfg.pairs == JSONL:
        index = split_list(text_cfg.pair_index)
        # Names the images' folder in the image pipeline's messages.
        cfg.name, cfg.folder = data_config.FOLDER, text_cfg.pair_root or os.path.dirname(
            os.path.abspath(index[0]))
    else:
        cfg.name, cfg.split = text_cfg.pairs, text_cfg.pair_split
    return cfg
