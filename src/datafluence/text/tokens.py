"""Tokenisation and sparse term matrices for the text-similarity baselines.

Tokenisation is deliberately plain and dependency-free, so scores never depend on a
tokenizer version: a text is lowercased (`str.lower`) and split into the maximal runs of
Unicode word characters (the regex `\\w+`: letters, digits and underscore); everything else
(punctuation, whitespace) separates tokens. "Don't stop!" -> ["don", "t", "stop"].
Word n-grams join n consecutive tokens with one space.

A `TermMatrix` holds a vocabulary fitted on one corpus (the training documents) and turns
any list of texts into a scipy.sparse CSR count matrix over it; terms outside the vocabulary
are dropped (they carry no information about the corpus).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

TOKEN_PATTERN = re.compile(r"\w+")

NGram = int | tuple[int, int]


def tokenize(text: str) -> list[str]:
    """Lowercased runs of word characters (`\\w+`)."""
    if not isinstance(text, str):
        raise TypeError(f"texts must be strings, got {type(text).__name__}: {text!r}")
    return TOKEN_PATTERN.findall(text.lower())


def ngram_range(ngram: NGram) -> tuple[int, int]:
    """`n` or `(n_min, n_max)` -> a checked (n_min, n_max)."""
    lo, hi = (ngram, ngram) if isinstance(ngram, int) else tuple(ngram)
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 1 or hi < lo:
        raise ValueError(
            f"ngram must be n >= 1 or (n_min, n_max) with 1 <= n_min <= n_max, got {ngram!r}"
        )
    return lo, hi


def terms(text: str, ngram: NGram = 1) -> list[str]:
    """The word n-grams of a text, for every n in the range, in text order."""
    lo, hi = ngram_range(ngram)
    tokens = tokenize(text)
    if (lo, hi) == (1, 1):
        return tokens
    out: list[str] = []
    for n in range(lo, hi + 1):
        out.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return out


class TermMatrix:
    """A vocabulary fitted on a corpus and the count matrices of texts over it."""

    def __init__(self, ngram: NGram = 1) -> None:
        self.ngram = ngram_range(ngram)
        self.vocabulary: dict[str, int] = {}

    def fit(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Build the vocabulary from `texts` (first-seen order); return their counts."""
        vocab: dict[str, int] = {}
        for text in texts:
            for term in terms(text, self.ngram):
                if term not in vocab:
                    vocab[term] = len(vocab)
        self.vocabulary = vocab
        return self.transform(texts)

    def transform(self, texts: Iterable[str]) -> sp.csr_matrix:
        """Counts [n_texts, n_terms] (CSR, float64); unknown terms are dropped."""
        vocab = self.vocabulary
        indptr: list[int] = [0]
        indices: list[int] = []
        data: list[int] = []
        for text in texts:
            counts = Counter(t for t in terms(text, self.ngram) if t in vocab)
            indices.extend(vocab[t] for t in counts)
            data.extend(counts.values())
            indptr.append(len(indices))
        matrix = sp.csr_matrix(
            (
                np.asarray(data, dtype=np.float64),
                np.asarray(indices, dtype=np.int64),
                np.asarray(indptr, dtype=np.int64),
            ),
            shape=(len(indptr) - 1, len(vocab)),
        )
        matrix.sort_indices()
        return matrix
