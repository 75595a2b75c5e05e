"""TF-IDF and plain n-gram cosine similarity between texts (scipy.sparse).

tf = raw count of a term in the text (`sublinear_tf`: 1 + log(count); `binary`: 1), idf(t) =
log((1 + C)/(1 + n_t)) + 1 over the C training documents (n_t of which hold t): the smoothed
IDF of scikit-learn's TfidfVectorizer, so its default cosine is reproduced. With idf=False
every term weighs its tf alone ("n-gram cosine"). Each vector is L2-normalised and the
similarity is their dot product, in [0, 1]; a text with no known term has similarity 0 with
everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from datafluence.text.tokens import NGram, TermMatrix


class TfidfIndex:
    """fit(documents) once, then cosine(queries) -> [n_documents, n_queries]."""

    def __init__(
        self, ngram: NGram = 1, idf: bool = True, sublinear_tf: bool = False, binary: bool = False
    ) -> None:
        self.terms = TermMatrix(ngram)
        self.use_idf, self.sublinear_tf, self.binary = bool(idf), bool(sublinear_tf), bool(binary)
        self.idf: np.ndarray | None = None
        self.vectors: sp.csr_matrix | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "ngram": list(self.terms.ngram),
            "idf": "smooth" if self.use_idf else None,
            "sublinear_tf": self.sublinear_tf,
            "binary": self.binary,
            "tokenizer": r"lowercase \w+",
        }

    def fit(self, documents: Sequence[str]) -> TfidfIndex:
        if len(documents) == 0:
            raise ValueError("TF-IDF needs at least one document")
        counts = self.terms.fit(documents)
        df = np.diff(counts.tocsc().indptr).astype(np.float64)
        n = counts.shape[0]
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0 if self.use_idf else np.ones_like(df)
        self.vectors = self.vectorize_counts(counts)
        return self

    def vectorize(self, texts: Sequence[str]) -> sp.csr_matrix:
        """L2-normalised weighted term vectors [n_texts, n_terms]."""
        if self.idf is None:
            raise RuntimeError("call fit(documents) first")
        return self.vectorize_counts(self.terms.transform(texts))

    def vectorize_counts(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        x = counts.astype(np.float64, copy=True)
        if self.binary:
            x.data[:] = 1.0
        elif self.sublinear_tf:
            x.data = 1.0 + np.log(x.data)
        x = sp.csr_matrix(x @ sp.diags(self.idf))
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return sp.csr_matrix(sp.diags(scale) @ x)

    def cosine(self, queries: Sequence[str]) -> np.ndarray:
        """Cosine similarities [n_documents, n_queries] (float64, dense)."""
        if self.vectors is None:
            raise RuntimeError("call fit(documents) before cosine(queries)")
        return np.asarray((self.vectors @ self.vectorize(queries).T).toarray())


def tfidf_cosine(
    documents: Sequence[str], queries: Sequence[str], ngram: NGram = 1, idf: bool = True
) -> np.ndarray:
    """TF-IDF (or, idf=False, n-gram count) cosine similarities [n_documents, n_queries]."""
    return TfidfIndex(ngram, idf=idf).fit(documents).cosine(queries)
