"""SentencePiece text tokenizer with XLM-R's id layout, as BEiT-3 reads `beit3.spm`.

BEiT-3 tokenizes with `transformers.XLMRobertaTokenizer("beit3.spm")`, which lays fairseq's
dictionary over the SentencePiece model:

    id 0 <s> (bos), 1 <pad>, 2 </s> (eos), 3 <unk>,
    then SentencePiece piece k (k >= 3) at id k + 1,
    and <mask> at the last id; vocab_size = pieces + 2.

The SentencePiece model's own <unk> / <s> / </s> (pieces 0, 1, 2) map to ids 3, 0 and 2. A
sentence becomes [bos] + pieces + [eos], truncated to `max_len` (eos kept) and padded with
<pad>; the padding flags are True at padding, the positions attention must ignore.

Only the `sentencepiece` package is used here (no TensorFlow, no transformers).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence, Tuple, Union

import numpy as np

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# The layout above needs these pieces first in the SentencePiece model (its defaults).
_SPM_UNK, _SPM_BOS, _SPM_EOS = 0, 1, 2
_FAIRSEQ_OFFSET = 1

Text = Union[str, Sequence[int]]


def _sentencepiece():
    try:
        import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
        raise ImportError("the text tokenizer needs the sentencepiece package: "
                          "pip install sentencepiece") from None
    return sentencepiece


def train_sentencepiece(
    texts: Union[str, Sequence[str], Iterable[str]],
    vocab_size: int,
    model_prefix: str,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 1_000_000,
    seed: int = 0,
    num_threads: int = 2,
) -> str:
    """Trains a SentencePiece model for TextTokenizer; returns the path `model_prefix.model`.

    `texts`: a text file (one sentence or paragraph per line), a list of files, or an iterable
    of strings. `vocab_size` counts SentencePiece pieces; the tokenizer's vocabulary is two
    larger (<pad> and <mask>). The special pieces keep SentencePiece's default places (<unk> 0,
    <s> 1, </s> 2, no <pad>), which the XLM-R layout assumes. Training samples at most
    `max_sentences` inputs, shuffled with `seed`, so the result is reproducible.
    """
    spm = _sentencepiece()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 8.")
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    source = {}
    if isinstance(texts, (str, os.PathLike)):
        source["input"] = [os.fspath(texts)]
    elif isinstance(texts, (list, tuple)) and texts and all(
            isinstance(t, (str, os.PathLike)) and os.path.isfile(t) for t in texts):
        source["input"] = [os.fspath(t) for t in texts]
    else:
        source["sentence_iterator"] = iter(texts)
    # The trainer's sampling uses a process-wide generator: seeding it makes training repeatable.
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        **source,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        unk_id=_SPM_UNK, bos_id=_SPM_BOS, eos_id=_SPM_EOS, pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,  # training logs only on failure
    )
    return model_prefix + ".model"


class TextTokenizer:
    """A .spm / .model SentencePiece file read with XLM-R's ids (see the module docstring)."""

    bos_id, pad_id, eos_id, unk_id = BOS_ID, PAD_ID, EOS_ID, UNK_ID

    def __init__(self, model_file: str):
        spm = _sentencepiece()
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model {model_file!r} does not exist.")
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self._check_special_pieces()
        pieces = self._sp.get_piece_size()
        # SentencePiece id -> XLM-R id.
        self._to_xlmr = np.arange(pieces, dtype=np.int32) + _FAIRSEQ_OFFSET
        self._to_xlmr[[_SPM_UNK, _SPM_BOS, _SPM_EOS]] = [UNK_ID, BOS_ID, EOS_ID]

    def _check_special_pieces(self):
        sp = self._sp
        found = (sp.unk_id(), sp.bos_id(), sp.eos_id())
        if found != (_SPM_UNK, _SPM_BOS, _SPM_EOS):
            raise ValueError(
                f"SentencePiece model {self.model_file!r} has <unk>, <s>, </s> at ids {found}; "
                f"the XLM-R layout needs them at {(_SPM_UNK, _SPM_BOS, _SPM_EOS)} (SentencePiece's "
                "defaults, as train_sentencepiece makes them).")

    @property
    def vocab_size(self) -> int:
        """Number of ids: the pieces after the first three, 4 specials in front, <mask>."""
        return self._sp.get_piece_size() + 2

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    def tokenize(self, text: str) -> np.ndarray:
        """The pieces of `text` as XLM-R ids, without bos / eos: int32 [n]."""
        return self._to_xlmr[np.asarray(self._sp.encode(text), dtype=np.int64)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of XLM-R ids; special ids (bos, pad, eos, mask) are left out, <unk> kept."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= UNK_ID) & (ids < self.mask_id)]
        return self._sp.decode([_SPM_UNK if i == UNK_ID else int(i) - _FAIRSEQ_OFFSET
                                for i in ids])

    def pack(self, pieces: Sequence[int], max_len: int) -> Tuple[np.ndarray, np.ndarray]:
        """[bos] + pieces + [eos], the pieces cut to max_len - 2, padded with <pad> to `max_len`.

        -> (ids int32 [max_len], padding bool [max_len], True at padding). `pieces` are XLM-R
        ids, e.g. from `tokenize` or the pre-tokenized `text_segment` of an index file."""
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be >= 2 (bos and eos).")
        pieces = np.asarray(pieces, dtype=np.int64).reshape(-1)[:max_len - 2]
        if len(pieces) and not 0 <= pieces.min() <= pieces.max() < self.vocab_size:
            # Ids from another vocabulary (a pre-tokenized index) would be clamped silently.
            raise ValueError(f"token ids {pieces.min()}..{pieces.max()} are outside this "
                             f"tokenizer's vocabulary 0..{self.vocab_size - 1} "
                             f"({self.model_file}).")
        n = len(pieces) + 2
        ids = np.full((max_len,), PAD_ID, np.int32)
        ids[0], ids[1:n - 1], ids[n - 1] = BOS_ID, pieces, EOS_ID
        return ids, np.arange(max_len) >= n

    def encode(self, text: Text, max_len: int) -> Tuple[np.ndarray, np.ndarray]:
        """`text` (a string, or a sequence of XLM-R piece ids) -> (ids int32 [max_len],
        padding bool [max_len]); see `pack`."""
        pieces = self.tokenize(text) if isinstance(text, str) else text
        return self.pack(pieces, max_len)

    def encode_batch(self, texts: Sequence[Text], max_len: int) -> Tuple[np.ndarray, np.ndarray]:
        """Texts -> (ids int32 [len(texts), max_len], padding bool [len(texts), max_len])."""
        strings = [i for i, t in enumerate(texts) if isinstance(t, str)]
        pieces = list(texts)
        # One call for all the strings: SentencePiece encodes a list in C++.
        for i, encoded in zip(strings, self._sp.encode([texts[i] for i in strings])):
            pieces[i] = self._to_xlmr[np.asarray(encoded, dtype=np.int64)]
        ids = np.full((len(texts), max_len), PAD_ID, np.int32)
        padding = np.ones((len(texts), max_len), bool)
        for row, p in enumerate(pieces):
            ids[row], padding[row] = self.pack(p, max_len)
        return ids, padding

