"""Text-similarity baselines (TF-IDF / n-gram cosine, BM25) and the BM25 pre-filter.

`TextSimilarity` scores every training text against every query text, no model involved:
positive = lexically similar (the baseline's stand-in for "supports"). `prefiltered` runs
any other method only on each query's top-k BM25 candidates (Grosse et al. 2023 pre-filter
their 10,000 candidates per query this way) and marks every other pair NaN: "not
computed", never a score of 0 that would rank above negative scores.

Texts come from `Examples.items` (what `CausalLMTask.examples` keeps): a text as is, a
(prompt, completion) pair joined with one space. Pass `train_texts` / `query_texts` to
score examples without raw items (e.g. classification inputs with captions). Tokenisation:
lowercase, `\\w+` runs (see `datafluence.text.tokens`). With `run`, both save their work as
it finishes (TextSimilarity: row partitions; prefiltered: the inner method's own), so an
interrupted run resumes.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from datafluence import store
from datafluence.methods.base import SELF_COLUMN, Method, Run
from datafluence.scores import Scores
from datafluence.tasks import CausalLMTask, Examples, Task
from datafluence.text.bm25 import BM25, bm25_candidates
from datafluence.text.tfidf import TfidfIndex
from datafluence.text.tokens import NGram, ngram_range

KINDS = ("tfidf", "ngram", "bm25")

Texts = Examples | Sequence[str]


def item_text(item: Any) -> str:
    """A raw item as text: a string as is, (prompt, completion) joined with a space."""
    if isinstance(item, str):
        return item
    if isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(p, str) for p in item):
        return f"{item[0]} {item[1]}"
    raise ValueError(
        f"cannot read text from item {item!r}; items must be texts or (prompt, completion) pairs"
    )


def texts_of(
    examples: Texts,
    texts: Sequence[str] | None = None,
    role: str = "examples",
    argument: str = "texts",
) -> tuple[list[str], tuple[str, ...]]:
    """(texts, ids) of a set of examples, a plain list of texts, or explicit `texts`."""
    if isinstance(examples, Examples):
        ids = examples.ids
        if texts is None:
            if examples.items is None:
                raise ValueError(
                    f"the {role} keep no raw texts (Examples.items is None); build them with "
                    f"CausalLMTask.examples(texts) or pass {argument}=[...]"
                )
            texts = [item_text(i) for i in examples.items]
    else:
        if isinstance(examples, str):
            raise TypeError(f"give the {role} as a list of texts, not one string")
        texts = list(examples) if texts is None else texts
        ids = tuple(str(i) for i in range(len(texts)))
    texts = list(texts)
    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} {role} texts given for {len(ids)} examples")
    if not texts:
        raise ValueError(f"the {role} set is empty")
    return [item_text(t) for t in texts], ids


class TextSimilarity(Method):
    """Lexical similarity of training and query texts.

    kind: "tfidf" (TF-IDF cosine, smoothed IDF), "ngram" (cosine of raw n-gram counts) or
    "bm25" (binary-presence BM25, k1 and b below; not symmetric, not bounded). `ngram`: n
    or (n_min, n_max) word n-grams. The model is not used (pass None). `chunk_size`: training
    rows scored at a time (the dense result of a chunk is chunk_size x n_query).
    """

    name = "text_similarity"
    uses_model = False

    def __init__(
        self,
        kind: str = "tfidf",
        ngram: NGram = 1,
        *,
        k1: float = 1.5,
        b: float = 0.75,
        sublinear_tf: bool = False,
        chunk_size: int = 1024,
        progress: bool = True,
    ) -> None:
        super().__init__(None, chunk_size=chunk_size, progress=progress)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        self.kind = kind
        self.ngram = ngram_range(ngram)
        self.k1, self.b, self.sublinear_tf = k1, b, sublinear_tf
        self._index().settings()  # checks k1 / b now

    @classmethod
    def supports(cls, task: Task | None) -> bool:
        return task is None or isinstance(task, CausalLMTask)

    def _index(self) -> BM25 | TfidfIndex:
        if self.kind == "bm25":
            return BM25(self.k1, self.b, self.ngram)
        return TfidfIndex(self.ngram, idf=self.kind == "tfidf", sublinear_tf=self.sublinear_tf)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, **self._index().settings()}

    def _matrices(self, docs: list[str], asked: list[str]) -> tuple[Any, Any]:
        """(training rows, query columns as CSC): statistics (IDF, avgdl) from `docs`."""
        index = self._index().fit(docs)
        if isinstance(index, BM25):
            rows, cols = index.weights, index.query_vectors(asked)
        else:
            rows, cols = index.vectors, index.vectorize(asked)
        assert rows is not None
        return rows, cols.T.tocsc()

    def score(
        self,
        model: Any,
        train: Texts,
        queries: Texts,
        *,
        train_texts: Sequence[str] | None = None,
        query_texts: Sequence[str] | None = None,
        run: Run = None,
    ) -> Scores:
        """Scores [n_train, n_query]; statistics (IDF, avgdl) come from the training texts.

        With `run`, rows are saved as they finish and a re-run computes only the missing ones.
        """
        call = self.begin(None, run)
        docs, train_ids = texts_of(train, train_texts, "training examples", "train_texts")
        asked, query_ids = texts_of(queries, query_texts, "query examples", "query_texts")
        rows, cols = self._matrices(docs, asked)

        def compute(lo: int, hi: int) -> np.ndarray:
            return np.asarray((rows[lo:hi] @ cols).toarray())

        # the texts are the data (examples' tensors play no part here)
        key = {"train_texts": store.fingerprint(docs), "query_texts": store.fingerprint(asked)}
        values = call.table(len(docs), len(asked), compute, key=key)
        return call.finish(values, train_ids, query_ids, method=self.kind)

    def self_score(
        self,
        model: Any,
        train: Texts,
        *,
        train_texts: Sequence[str] | None = None,
        run: Run = None,
    ) -> Scores:
        """Each training text against itself, with the statistics of the whole training set
        (so it equals the diagonal of `score(None, train, train)`): Scores [n_train, 1]."""
        call = self.begin(None, run)
        docs, train_ids = texts_of(train, train_texts, "training examples", "train_texts")
        rows, cols = self._matrices(docs, docs)

        def compute(lo: int, hi: int) -> np.ndarray:
            block = rows[lo:hi].multiply(cols[:, lo:hi].T.tocsr())
            return np.asarray(block.sum(axis=1))

        key = {"train_texts": store.fingerprint(docs), "what": "self_score"}
        values = call.table(len(docs), 1, compute, key=key)
        return call.finish(values, train_ids, (SELF_COLUMN,), method=self.kind)


def prefiltered(
    method: Any,
    model: Any,
    train: Examples,
    queries: Examples,
    k: int = 10000,
    *,
    train_texts: Sequence[str] | None = None,
    query_texts: Sequence[str] | None = None,
    k1: float = 1.5,
    b: float = 0.75,
    ngram: NGram = 1,
    query_batch: int = 1,
    run: Run = None,
    **score_options: Any,
) -> Scores:
    """Run `method` only on each query's top-k BM25 training candidates.

    Queries are taken `query_batch` at a time (default one); each group is scored by
    `method.score(model, train[union of its candidates], group, **score_options)` and only
    each query's own candidates are kept. Every other entry is NaN ("not computed");
    `Scores.top` ranks NaN last, and `np.nan_to_num` / `np.nanargmax` handle the rest.
    A method that needs fitting (InfluenceFunction, TRAK) should be fitted on the full
    training set first: otherwise it fits on the first group's candidates.
    parts["candidate"] holds 1.0 where a score was computed, 0.0 elsewhere.
    `run` is handed to every inner `method.score`, whose partitions are keyed by its own
    candidates and queries: an interrupted run resumes, finished groups are loaded.
    """
    start = time.perf_counter()
    if query_batch < 1:
        raise ValueError(f"query_batch must be at least 1, got {query_batch}")
    run = store.as_run(run)
    if run is not None:
        if "run" not in inspect.signature(method.score).parameters:
            raise TypeError(
                f"{type(method).__name__}.score takes no run directory, so it cannot resume; "
                "call prefiltered without run="
            )
        score_options = {**score_options, "run": run}
    docs, train_ids = texts_of(train, train_texts, "training examples", "train_texts")
    asked, query_ids = texts_of(queries, query_texts, "query examples", "query_texts")
    candidates = bm25_candidates(docs, asked, k, k1=k1, b=b, ngram=ngram)
    values = np.full((len(train_ids), len(query_ids)), np.nan, dtype=np.float32)
    mask = np.zeros_like(values)
    inner: Scores | None = None
    for lo in range(0, len(query_ids), query_batch):
        cols = list(range(lo, min(lo + query_batch, len(query_ids))))
        rows = np.unique(candidates[cols])
        sub = _subset(train, rows)
        inner = method.score(model, sub, _subset(queries, np.asarray(cols)), **score_options)
        for c, j in enumerate(cols):
            mine = candidates[j]
            where = np.searchsorted(rows, mine)
            values[mine, j] = inner.values[where, c]
            mask[mine, j] = 1.0
    assert inner is not None
    settings = {
        "prefilter": {
            "kind": "bm25",
            "k": int(k),
            "k1": k1,
            "b": b,
            "ngram": list(ngram_range(ngram)),
        },
        "query_batch": query_batch,
        "inner": inner.settings,
    }
    return Scores(
        values,
        train_ids,
        query_ids,
        method=f"{inner.method}+bm25_prefilter",
        settings=settings,
        parts={"candidate": mask},
        timings={"seconds": round(time.perf_counter() - start, 3)},
    )


def _subset(examples: Any, index: np.ndarray) -> Any:
    if isinstance(examples, Examples):
        return examples[index.tolist()]
    return [examples[int(i)] for i in index]
