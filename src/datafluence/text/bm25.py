"""BM25 with binary term presence, the lexical baseline of Grosse et al. (2023, appendix).

For a query q and a training document d (C documents, avgdl their mean length):

    score(d, q) = Σ_{t ∈ q, t ∈ d} IDF(t) · f·(k1 + 1) / (f + k1·(1 − b + b·|d|/avgdl))

with f = 1 (binary presence: a term counts once however often it occurs), each distinct
query term counted once, k1 = 1.5, IDF(t) = log((C − n_t + 0.5)/(n_t + 0.5) + 1) where n_t
is the number of documents holding t (always > 0), and |d| the number of terms (tokens, or
n-grams for n > 1) of d. The length normalisation b is not fixed by the paper; we use the
usual b = 0.75 (b = 0 turns it off). Document statistics (IDF, avgdl) come from the training
documents only; query terms absent from them score nothing.

Everything is sparse: one weight per (document, term) pair, W [C, V], so all scores are one
sparse product W · Qᵀ with the binary query matrix Q [M, V].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from datafluence.text.tokens import NGram, TermMatrix


class BM25:
    """fit(documents) once, then score(queries) -> [n_documents, n_queries]."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, ngram: NGram = 1) -> None:
        if k1 < 0:
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not 0 <= b <= 1:
            raise ValueError(f"b must lie in [0, 1], got {b}")
        self.k1, self.b = float(k1), float(b)
        self.terms = TermMatrix(ngram)
        self.weights: sp.csr_matrix | None = None
        self.idf: np.ndarray | None = None
        self.lengths: np.ndarray | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "k1": self.k1,
            "b": self.b,
            "ngram": list(self.terms.ngram),
            "tf": "binary",
            "tokenizer": r"lowercase \w+",
        }

    def fit(self, documents: Sequence[str]) -> BM25:
        if len(documents) == 0:
            raise ValueError("BM25 needs at least one document")
        counts = self.terms.fit(documents)
        presence = counts.copy()
        presence.data[:] = 1.0
        n_docs = presence.shape[0]
        df = np.asarray(presence.sum(axis=0)).ravel()
        self.idf = np.log((n_docs - df + 0.5) / (df + 0.5) + 1.0)
        self.lengths = np.asarray(counts.sum(axis=1)).ravel()  # every training term is known
        avgdl = float(self.lengths.mean()) or 1.0
        norm = self.k1 * (1.0 - self.b + self.b * self.lengths / avgdl)  # [C]
        per_doc = (self.k1 + 1.0) / (1.0 + norm)  # f = 1 for every present term
        weights = sp.diags(per_doc) @ presence @ sp.diags(self.idf)
        self.weights = sp.csr_matrix(weights)
        return self

    def score(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 scores [n_documents, n_queries] (float64, dense)."""
        if self.weights is None:
            raise RuntimeError("call fit(documents) before score(queries)")
        return np.asarray((self.weights @ self.query_vectors(queries).T).toarray())

    def query_vectors(self, queries: Sequence[str]) -> sp.csr_matrix:
        """Binary query term matrix [n_queries, n_terms]: scores = weights @ its transpose."""
        q = self.terms.transform(queries)
        q.data[:] = 1.0  # distinct query terms, each once
        return q

    def top_k(self, queries: Sequence[str], k: int) -> np.ndarray:
        """Indices [n_queries, min(k, n_documents)] of the best documents, best first."""
        return top_k(self.score(queries), k)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest scores per column of [n_docs, n_queries], best first; ties go
    to the lower document index (a stable sort), so results are deterministic."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(int(k), scores.shape[0])
    return np.argsort(-scores.T, axis=1, kind="stable")[:, :k].astype(np.int64)


def bm25_scores(
    documents: Sequence[str],
    queries: Sequence[str],
    k1: float = 1.5,
    b: float = 0.75,
    ngram: NGram = 1,
) -> np.ndarray:
    """BM25 scores [n_documents, n_queries]."""
    return BM25(k1, b, ngram).fit(documents).score(queries)


def bm25_candidates(
    train_texts: Sequence[str],
    query_texts: Sequence[str],
    k: int = 10000,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    ngram: NGram = 1,
) -> np.ndarray:
    """The top-k training documents per query by BM25: int64 [n_query, min(k, n_train)].

    Best first; ties (including documents sharing no term with the query, all at 0) go to
    the lower training index, so when fewer than k documents match, the list is filled with
    non-matching ones in corpus order.
    """
    return BM25(k1, b, ngram).fit(train_texts).top_k(query_texts, k)
