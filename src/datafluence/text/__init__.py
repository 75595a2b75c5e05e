"""Lexical text machinery: tokenisation, sparse term matrices, BM25 and TF-IDF.

Used by the text-similarity baselines (`datafluence.methods.tfidf`) and as a BM25
pre-filter that narrows each query's training candidates before a costlier method runs.
"""

from datafluence.text.bm25 import BM25, bm25_candidates, bm25_scores, top_k
from datafluence.text.tfidf import TfidfIndex, tfidf_cosine
from datafluence.text.tokens import TOKEN_PATTERN, TermMatrix, ngram_range, terms, tokenize

__all__ = [
    "BM25",
    "TOKEN_PATTERN",
    "TermMatrix",
    "TfidfIndex",
    "bm25_candidates",
    "bm25_scores",
    "ngram_range",
    "terms",
    "tfidf_cosine",
    "tokenize",
    "top_k",
]
