"""BEiT-3's text side: the tokenizer and the text / image-text streams.

    tokenizer.py   SentencePiece training; TextTokenizer (XLM-R's ids, as BEiT-3 reads beit3.spm)
    streams.py     the text stream; texts in memory or in plain-text files (no TensorFlow)
    tfds_text.py   texts of a TFDS dataset
    pairs.py       the image-text stream (JSONL index + image folder, TFDS, mnist5k)
    quickstart.py  the offline corpus (Shakespeare) and synthetic MNIST captions
    mixed.py       one batch per step from the image, text and pair streams
    config.py      the `text` config block

Batches (numpy, one process's rows): the text stream yields {'text_ids' int32 [B, T],
'text_padding' bool [B, T]}; the pair stream adds 'image' uint8 [B, H, W, C], normalised on
the device like every image batch (mim_jax.data.normalize_images). T = text.max_len; padding
is True at padding. TensorFlow is imported only for TFDS corpora and for pairs.
"""

from __future__ import annotations

from typing import Optional

from mim_jax.data.text import config as config_lib
from mim_jax.data.text.config import default_text_config, validate_text_config
from mim_jax.data.text.tokenizer import TextTokenizer, train_sentencepiece


def load_tokenizer(text_cfg, build_dir: Optional[str] = None) -> TextTokenizer:
    """The tokenizer of text.spm_model; 'quickstart' builds the quickstart model (a few
    seconds, once) into `build_dir`."""
    if text_cfg.spm_model == config_lib.QUICKSTART:
        from mim_jax.data.text import quickstart  # pylint: disable=g-import-not-at-top

        if not build_dir:
            raise ValueError("text.spm_model='quickstart' needs a folder to build the model in.")
        return TextTokenizer(quickstart.build_spm(build_dir))
    return TextTokenizer(text_cfg.spm_model)


def build_dir_of(workdir) -> str:
    """Where a run keeps a tokenizer trained for it (text.spm_model='quickstart', the same
    every time): WORKDIR/text for a local workdir, this host's cache for one in a bucket
    (SentencePiece reads and writes local files only)."""
    import os  # pylint: disable=g-import-not-at-top

    from mim_jax import paths  # pylint: disable=g-import-not-at-top

    if paths.is_local(workdir):
        return os.path.join(os.fspath(workdir), "text")
    return os.path.expanduser("~/.cache/mim_jax/text")


def _text_source(text_cfg):
    from mim_jax.data.text import streams  # pylint: disable=g-import-not-at-top

    if text_cfg.corpus == config_lib.SHAKESPEARE:
        from mim_jax.data.text import quickstart  # pylint: disable=g-import-not-at-top

        return streams.InMemoryTexts(quickstart.shakespeare_corpus(), "the Shakespeare corpus")
    if text_cfg.corpus == config_lib.FILES:
        return streams.TextFiles(streams.expand_files(config_lib.split_list(text_cfg.files)))
    from mim_jax.data.text import tfds_text  # pylint: disable=g-import-not-at-top

    return tfds_text.TfdsTexts(text_cfg.corpus, split=text_cfg.split, text_key=text_cfg.text_key,
                               data_dir=text_cfg.data_dir, shuffle_buffer=text_cfg.shuffle_buffer)


def create_text_iterator(text_cfg, tokenizer: TextTokenizer, *, global_batch_size: int,
                         seed: int, start_step: int = 0, process_index=None, process_count=None):
    """This process's text batches from step `start_step` on (text/streams.py: TextStream)."""
    from mim_jax.data.text import streams  # pylint: disable=g-import-not-at-top

    validate_text_config(text_cfg)
    return streams.TextStream(_text_source(text_cfg), tokenizer, text_cfg.max_len,
                              global_batch_size=global_batch_size, seed=seed,
                              start_step=start_step, process_index=process_index,
                              process_count=process_count)


def create_pair_iterator(text_cfg, data_cfg, tokenizer: TextTokenizer, *,
                         global_batch_size: int, seed: int, start_step: int = 0,
                         process_index=None, process_count=None):
    """This process's image-text batches from step `start_step` on (text/pairs.py:
    PairStream); images are read and augmented as `data_cfg` says."""
    from mim_jax.data.text import pairs  # pylint: disable=g-import-not-at-top  (TensorFlow)

    validate_text_config(text_cfg)
    cfg = config_lib.pair_data_config(text_cfg, data_cfg)
    if text_cfg.pairs == config_lib.JSONL:
        source = pairs.JsonlPairs(config_lib.split_list(text_cfg.pair_index),
                                  text_cfg.pair_root or None)
    elif text_cfg.pairs == config_lib.MNIST5K_PAIRS:
        source = pairs.mnist5k_pairs(cfg)
    else:
        source = pairs.coco_style_pairs(cfg, text_cfg.caption_key)
    return pairs.PairStream(source, cfg, tokenizer, text_cfg.max_len,
                            global_batch_size=global_batch_size, seed=seed,
                            start_step=start_step, process_index=process_index,
                            process_count=process_count)


def create_mixed_iterator(text_cfg, data_cfg, tokenizer: TextTokenizer, sizes, *, seed: int,
                          start_step: int = 0, process_index=None, process_count=None):
    """This process's mixed batches from step `start_step` on (text/mixed.py: MixedStream).
    `sizes`: stream ('image', 'text', 'pair') -> global examples per step; 0 leaves it out."""
    from mim_jax import data  # pylint: disable=g-import-not-at-top
    from mim_jax.data.text import mixed  # pylint: disable=g-import-not-at-top

    common = dict(seed=seed, start_step=start_step, process_index=process_index,
                  process_count=process_count)
    makers = {
        "image": lambda n: data.create_train_iterator(data_cfg, global_batch_size=n, **common),
        "text": lambda n: create_text_iterator(text_cfg, tokenizer, global_batch_size=n,
                                               **common),
        "pair": lambda n: create_pair_iterator(text_cfg, data_cfg, tokenizer,
                                               global_batch_size=n, **common),
    }
    unknown = sorted(set(sizes) - set(makers))
    if unknown:
        raise ValueError(f"stream {unknown[0]!r} is not one of {sorted(makers)}.")
    return mixed.MixedStream({stream: makers[stream](n) for stream, n in sizes.items() if n})


__all__ = [
    "TextTokenizer",
    "build_dir_of",
    "create_mixed_iterator",
    "create_pair_iterator",
    "create_text_iterator",
    "default_text_config",
    "load_tokenizer",
    "train_sentencepiece",
    "validate_text_config",
]
