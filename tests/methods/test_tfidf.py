"""Text baselines: tokenisation, BM25 against a direct per-document computation, rankings
known by construction, TF-IDF cosine by hand, and the BM25 pre-filter around real methods."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from datafluence.methods.influence import InfluenceFunction
from datafluence.methods.tfidf import TextSimilarity, item_text, prefiltered, texts_of
from datafluence.tasks import ClassificationTask, Examples
from datafluence.text import BM25, bm25_candidates, bm25_scores, terms, tfidf_cosine, tokenize


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DOCS = [
    "The cat sat on the mat.",
    "A dog chased the cat; the cat ran.",
    "Quantum chromodynamics describes quarks and gluons.",
    "Dogs and cats are pets, and pets need care.",
    "the the the the the the the the",
    "",
]


def test_tokenize_and_ngrams():
    assert tokenize("Don't STOP, café-bar 42!") == ["don", "t", "stop", "café", "bar", "42"]
    assert terms("a b c", 2) == ["a b", "b c"]
    assert terms("a b c", (1, 2)) == ["a", "b", "c", "a b", "b c"]
    assert terms("a", 2) == []
    with pytest.raises(ValueError, match="ngram"):
        terms("a b", (2, 1))
    with pytest.raises(TypeError, match="strings"):
        tokenize(3)  # type: ignore[arg-type]


def direct_bm25(docs, query, k1=1.5, b=0.75, ngram=1):
    """The formula, one document at a time, straight from the definition."""
    doc_terms = [terms(d, ngram) for d in docs]
    avgdl = sum(len(t) for t in doc_terms) / len(docs)
    c = len(docs)
    out = []
    for d in doc_terms:
        total = 0.0
        for t in set(terms(query, ngram)):
            if t not in d:
                continue
            n = sum(t in other for other in doc_terms)
            idf = math.log((c - n + 0.5) / (n + 0.5) + 1)
            f = 1.0
            total += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("k1,b,ngram", [(1.5, 0.75, 1), (1.5, 0.0, 1), (0.9, 1.0, (1, 2))])
def test_bm25_matches_the_formula_document_by_document(k1, b, ngram):
    queries = ["the cat", "cat cat dogs and pets", "quarks gluons unknownword", "the cat sat"]
    got = bm25_scores(DOCS, queries, k1=k1, b=b, ngram=ngram)
    assert got.shape == (len(DOCS), len(queries))
    for j, q in enumerate(queries):
        np.testing.assert_allclose(got[:, j], direct_bm25(DOCS, q, k1, b, ngram), rtol=1e-12)


def test_bm25_presence_is_binary_and_length_normalised():
    index = BM25().fit(["apple", "apple apple apple", "apple pear plum fig kiwi lime"])
    s = index.score(["apple"])[:, 0]
    assert s[0] > s[1] > s[2] > 0  # same presence, longer documents score less
    flat = BM25(b=0.0).fit(["apple", "apple apple apple", "apple pear plum"]).score(["apple"])
    np.testing.assert_allclose(flat[:, 0], flat[0, 0])  # b = 0: repetition changes nothing


def test_candidates_are_the_top_k_best_first_with_stable_ties():
    train = [
        "rivers flow to the sea",
        "the red fox jumps",
        "a red fox",
        "mountains are tall",
        "red hen",
        "fox",
    ]
    cand = bm25_candidates(train, ["red fox", "tall mountains", "zebra"], k=3)
    assert cand.shape == (3, 3) and cand.dtype == np.int64
    scores = bm25_scores(train, ["red fox"])[:, 0]
    # both terms, the shorter document first; then "fox" alone beats "red hen" (same IDF)
    assert list(cand[0]) == [2, 1, 5]
    assert list(cand[0]) == sorted(cand[0], key=lambda i: (-scores[i], i))
    assert cand[1, 0] == 3
    assert list(cand[2]) == [0, 1, 2]  # nothing matches: corpus order
    assert bm25_candidates(train, ["fox"], k=100).shape == (1, 6)  # k clamps to the corpus
    with pytest.raises(ValueError, match="k must be"):
        bm25_candidates(train, ["fox"], k=0)


def test_tfidf_cosine_by_hand():
    docs = ["a b b", "b c", "c c d"]
    got = tfidf_cosine(docs, ["b d", "zzz"])
    df = {"a": 1, "b": 2, "c": 2, "d": 1}
    idf = {t: math.log(4 / (1 + n)) + 1 for t, n in df.items()}

    def vec(text):
        v = np.array([text.split().count(t) * idf[t] for t in "abcd"])
        return v / np.linalg.norm(v) if v.any() else v

    want = np.array([[vec(d) @ vec("b d"), 0.0] for d in docs])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    counts = tfidf_cosine(docs, ["b b c"], idf=False)[:, 0]
    raw = [np.array([d.split().count(t) for t in "abcd"], dtype=float) for d in docs]
    q = np.array([0, 2, 1, 0], dtype=float)
    want = [r @ q / np.linalg.norm(r) / np.linalg.norm(q) for r in raw]
    np.testing.assert_allclose(counts, want, rtol=1e-12)


def text_examples(texts, prefix):
    """Examples that keep raw items (as CausalLMTask.examples does), no tokenizer needed."""
    n = len(texts)
    return Examples({"x": torch.zeros(n, 1)}, tuple(f"{prefix}{i}" for i in range(n)), tuple(texts))


def test_text_similarity_method_reads_items_and_pairs():
    train = text_examples(["the cat sat", ("where is the dog", "in the garden"), "quarks"], "t")
    queries = text_examples([("where", "is the cat"), "gluons and quarks"], "q")
    assert item_text(("where", "is the cat")) == "where is the cat"
    for kind in ("tfidf", "ngram", "bm25"):
        scores = TextSimilarity(kind).score(None, train, queries)
        assert scores.shape == (3, 2) and scores.train_ids == ("t0", "t1", "t2")
        assert scores.values[2, 1] > 0 and scores.values[2, 0] == 0
        assert scores.method == kind and scores.settings["kind"] == kind
    bm25 = TextSimilarity("bm25").score(None, train, queries).values
    docs, _ = texts_of(train)
    np.testing.assert_allclose(bm25, bm25_scores(docs, texts_of(queries)[0]), rtol=1e-6)
    plain = TextSimilarity("tfidf", ngram=(1, 2)).score(None, ["a b", "b a"], ["a b"])
    assert plain.values[0, 0] > plain.values[1, 0]  # the bigram "a b" breaks the tie
    with pytest.raises(ValueError, match="train_texts"):
        TextSimilarity().score(
            None, ClassificationTask().examples(torch.zeros(2, 1), [0, 1]), ["a"]
        )


class RowColumn:
    """A stand-in method: score = 1000 x (global training position + 1) + query position."""

    def __init__(self, train_ids):
        self.where = {i: n for n, i in enumerate(train_ids)}
        self.calls = []

    def score(self, model, train, queries):
        from datafluence.scores import Scores

        self.calls.append((train.ids, queries.ids))
        rows = np.array([self.where[i] for i in train.ids], dtype=float)
        cols = np.array([int(i[1:]) for i in queries.ids], dtype=float)
        values = 1000 * (rows[:, None] + 1) + cols[None, :]
        return Scores(values, train.ids, queries.ids, method="rowcol")


def test_prefilter_keeps_candidates_and_marks_the_rest_nan():
    texts = ["red fox", "blue sea", "red hen", "green hill", "fox den", "sea shell"]
    train = text_examples(texts, "t")
    queries = text_examples(["red fox", "sea", "hill"], "q")
    method = RowColumn(train.ids)
    scores = prefiltered(method, None, train, queries, k=2)
    cand = bm25_candidates(texts, ["red fox", "sea", "hill"], k=2)
    for j in range(3):
        keep = np.zeros(6, dtype=bool)
        keep[cand[j]] = True
        np.testing.assert_array_equal(scores.values[keep, j], 1000 * (np.flatnonzero(keep) + 1) + j)
        assert np.isnan(scores.values[~keep, j]).all()
        np.testing.assert_array_equal(scores.parts["candidate"][:, j], keep.astype(np.float32))
    assert len(method.calls) == 3 and all(len(t) == 2 for t, _ in method.calls)
    assert scores.method == "rowcol+bm25_prefilter" and scores.settings["prefilter"]["k"] == 2
    assert scores.top(1, query="q1")["train"].iloc[0] in {"t1", "t5"}
    grouped = prefiltered(RowColumn(train.ids), None, train, queries, k=2, query_batch=2)
    np.testing.assert_array_equal(np.isnan(grouped.values), np.isnan(scores.values))
    np.testing.assert_array_equal(np.nan_to_num(grouped.values), np.nan_to_num(scores.values))


def test_prefilter_around_influence_functions_equals_the_full_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(0)
    train = task.examples(torch.randn(8, 3, generator=gen, dtype=torch.float64), [0, 1] * 4)
    queries = task.examples(
        torch.randn(2, 3, generator=gen, dtype=torch.float64), [1, 0], ["a", "b"]
    )
    captions = ["small red", "big blue", "red big", "tiny", "red", "blue", "green", "red blue"]
    method = InfluenceFunction(task, "ekfac", damping=0.1, progress=False).fit(model, train)
    full = method.score(model, train, queries)
    scores = prefiltered(
        method, model, train, queries, k=3, train_texts=captions, query_texts=["red", "blue"]
    )
    known = ~np.isnan(scores.values)
    assert known.sum(0).tolist() == [3, 3]
    np.testing.assert_allclose(scores.values[known], full.values[known], rtol=1e-5)
    assert scores.settings["inner"]["curvature"]["name"] == "ekfac"
