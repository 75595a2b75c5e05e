"""TRAK, representation similarity and the text baselines in a run directory: an interrupted
run resumes to exactly the uninterrupted result, computing only the missing partitions (and,
for TRAK, never the training features again); other settings, weights or data never reuse
what is saved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datafluence.methods.base import Call
from datafluence.methods.representation_similarity import RepresentationSimilarity
from datafluence.methods.tfidf import TextSimilarity, prefiltered
from datafluence.methods.trak import TRAK
from datafluence.store import RunDir
from datafluence.tasks import ClassificationTask, Examples


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def data(n: int, seed: int, prefix: str) -> Examples:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return ClassificationTask().examples(x, y, [f"{prefix}{i}" for i in range(n)])


class Chunks:
    """Wraps the methods' one row loop (`Call.table`) to record the rows each computed chunk
    starts at, and to raise KeyboardInterrupt (Ctrl-C) on chunk number `stop_at`."""

    def __init__(self, monkeypatch) -> None:
        self.starts: list[int] = []
        self.stop_at: int | None = None
        original = Call.table

        def wrapped(call, n_rows, width, compute, **kwargs):
            def counted(lo: int, hi: int):
                self.starts.append(lo)
                if self.stop_at is not None and len(self.starts) == self.stop_at:
                    raise KeyboardInterrupt
                return compute(lo, hi)

            return original(call, n_rows, width, counted, **kwargs)

        monkeypatch.setattr(Call, "table", wrapped)

    def interrupted(self, call) -> None:
        """Run `call`, Ctrl-C during its second chunk; only the first one is saved."""
        self.starts.clear()
        self.stop_at = 2
        with pytest.raises(KeyboardInterrupt, match="1/3 partitions"):
            call()
        self.stop_at = None
        self.starts.clear()


def saved(tmp_path, prefix: str) -> list:
    return sorted((tmp_path / "partitions").glob(f"{prefix}-*"))


# --- TRAK ----------------------------------------------------------------------------------


def test_trak_resumes_without_recomputing_rows_or_training_features(tmp_path, monkeypatch):
    model = mlp(0)
    states = [mlp(1).state_dict(), mlp(2).state_dict()]
    task = ClassificationTask()
    train, queries = data(7, 0, "t"), data(3, 1, "q")

    def make(**options) -> TRAK:
        settings = {"projection_dim": 8, "damping": 0.1, "seed": 3, **options}
        return TRAK(task, states, chunk_size=3, **settings)

    reference = make().score(model, train, queries)
    chunks = Chunks(monkeypatch)
    featured: list[int] = []  # sizes of the sets whose features are computed
    original = TRAK._features

    def counted(self, model, examples, m):
        featured.append(len(examples))
        return original(self, model, examples, m)

    monkeypatch.setattr(TRAK, "_features", counted)
    chunks.interrupted(lambda: make().score(model, train, queries, run=tmp_path))
    assert featured.count(7) == 2  # both checkpoints' training features, now saved
    assert len(saved(tmp_path, "trak_features")) == 2

    featured.clear()
    resumed = make().score(model, train, queries, run=RunDir(tmp_path))  # a fresh process
    assert chunks.starts == [3, 6]  # rows 0-2 were loaded
    assert featured == [3, 3]  # the queries' features at each checkpoint, nothing else
    np.testing.assert_array_equal(resumed.values, reference.values)
    assert resumed.settings["damping_used"] == reference.settings["damping_used"]

    # Another damping: other rows (the kernel changes), the same training features.
    expected = make(damping=0.5).score(model, train, queries).values
    featured.clear()
    chunks.starts.clear()
    other = make(damping=0.5).score(model, train, queries, run=tmp_path)
    np.testing.assert_array_equal(other.values, expected)
    assert not np.allclose(other.values, reference.values)
    assert chunks.starts == [0, 3, 6] and 7 not in featured
    assert len(saved(tmp_path, "trak")) == 2
    # Another projection seed: new features and rows.
    expected = make(seed=4).score(model, train, queries).values
    featured.clear()
    seeded = make(seed=4).score(model, train, queries, run=tmp_path)
    np.testing.assert_array_equal(seeded.values, expected)
    assert featured.count(7) == 2 and len(saved(tmp_path, "trak_features")) == 4
    # Other weights under the same settings: nothing reused either.
    moved = [mlp(5).state_dict(), states[1]]
    again = TRAK(task, moved, projection_dim=8, damping=0.1, seed=3, chunk_size=3).score(
        model, train, queries, run=tmp_path
    )
    fresh = TRAK(task, moved, projection_dim=8, damping=0.1, seed=3, chunk_size=3).score(
        model, train, queries
    )
    np.testing.assert_array_equal(again.values, fresh.values)
    RunDir(tmp_path).drop_partitions()  # the feature cache goes with the partitions
    assert not (tmp_path / "partitions").exists()


def test_trak_features_of_other_data_with_the_same_ids_are_not_reused(tmp_path):
    model = mlp(0)
    task = ClassificationTask()
    a, queries = data(5, 0, "t"), data(2, 1, "q")
    b = task.examples(a.tensors["x"] + 1.0, a.tensors["y"], a.ids)
    TRAK(task, None, projection_dim=6, damping=0.1, chunk_size=2).score(
        model, a, queries, run=tmp_path
    )
    on_b = TRAK(task, None, projection_dim=6, damping=0.1, chunk_size=2).score(
        model, b, queries, run=tmp_path
    )
    fresh = TRAK(task, None, projection_dim=6, damping=0.1, chunk_size=2).score(model, b, queries)
    np.testing.assert_array_equal(on_b.values, fresh.values)


def test_trak_in_chunks_equals_the_whole_kernel_product():
    """Chunking only splits the rows: the same numbers as one product over the fitted set."""
    model = mlp(0)
    task = ClassificationTask()
    train, queries = data(7, 0, "t"), data(3, 1, "q")
    one = TRAK(task, None, projection_dim=None, damping=0.1, chunk_size=100)
    many = TRAK(task, None, projection_dim=None, damping=0.1, chunk_size=2)
    np.testing.assert_allclose(
        many.score(model, train, queries).values,
        one.score(model, train, queries).values,
        rtol=1e-6,
    )


# --- representation similarity -------------------------------------------------------------


def test_repsim_resumes_and_keys_its_rows(tmp_path, monkeypatch):
    model = mlp(0)
    task = ClassificationTask()
    train, queries = data(8, 0, "t"), data(3, 1, "q")
    reference = RepresentationSimilarity(task, "1", chunk_size=3).score(model, train, queries)
    with torch.no_grad():
        h, g = torch.tanh(model[0](train.tensors["x"])), torch.tanh(model[0](queries.tensors["x"]))
    exact = (nn.functional.normalize(h, dim=1) @ nn.functional.normalize(g, dim=1).T).numpy()
    np.testing.assert_allclose(reference.values, exact, rtol=1e-6)
    chunks = Chunks(monkeypatch)
    method = RepresentationSimilarity(task, "1", chunk_size=3)
    chunks.interrupted(lambda: method.score(model, train, queries, run=tmp_path))
    resumed = method.score(model, train, queries, run=tmp_path)
    assert chunks.starts == [3, 6]
    np.testing.assert_array_equal(resumed.values, reference.values)
    assert resumed.settings["dim"] == 5
    chunks.starts.clear()
    dot = RepresentationSimilarity(task, "1", kind="dot", chunk_size=3)
    np.testing.assert_array_equal(
        dot.score(model, train, queries, run=tmp_path).values,
        dot.score(model, train, queries).values,
    )
    assert chunks.starts[:3] == [0, 3, 6]  # the cosine rows were not taken for dot products
    other = mlp(1)
    np.testing.assert_array_equal(
        method.score(other, train, queries, run=tmp_path).values,
        method.score(other, train, queries).values,
    )
    assert len(saved(tmp_path, "representation_similarity")) == 3


# --- text similarity and the BM25 pre-filter -----------------------------------------------


DOCS = ["red fox", "blue sea", "red hen", "green hill", "fox den", "sea shell", "red sea"]
ASKED = ["red fox", "sea", "hill"]


def test_text_similarity_resumes_and_keys_by_the_texts(tmp_path, monkeypatch):
    reference = TextSimilarity("bm25", chunk_size=3).score(None, DOCS, ASKED)
    chunks = Chunks(monkeypatch)
    method = TextSimilarity("bm25", chunk_size=3)
    chunks.interrupted(lambda: method.score(None, DOCS, ASKED, run=tmp_path))
    resumed = method.score(None, DOCS, ASKED, run=tmp_path)
    assert chunks.starts == [3, 6]
    np.testing.assert_array_equal(resumed.values, reference.values)
    # rows in chunks are the rows of the whole product
    np.testing.assert_allclose(
        reference.values, TextSimilarity("bm25", chunk_size=100).score(None, DOCS, ASKED).values
    )
    # the same ids ("0".."6") with other texts; another kind; other BM25 constants
    changed = ["red fox den", *DOCS[1:]]
    for other, docs in [
        (method, changed),
        (TextSimilarity("tfidf", chunk_size=3), DOCS),
        (TextSimilarity("bm25", k1=0.5, chunk_size=3), DOCS),
    ]:
        np.testing.assert_array_equal(
            other.score(None, docs, ASKED, run=tmp_path).values,
            other.score(None, docs, ASKED).values,
        )
    assert len(saved(tmp_path, "text_similarity")) == 4  # 3 BM25 runs, 1 TF-IDF
    with pytest.raises(ValueError, match="chunk_size"):
        TextSimilarity(chunk_size=0)


def test_prefilter_hands_the_run_to_the_inner_method(tmp_path, monkeypatch):
    inner = TextSimilarity("tfidf", chunk_size=1)
    reference = prefiltered(inner, None, DOCS, ASKED, k=3)
    chunks = Chunks(monkeypatch)
    chunks.stop_at = 5  # query 0's three rows, then Ctrl-C during query 1's second
    with pytest.raises(KeyboardInterrupt, match="1/3 partitions"):
        prefiltered(inner, None, DOCS, ASKED, k=3, run=tmp_path)
    chunks.stop_at = None
    chunks.starts.clear()
    resumed = prefiltered(inner, None, DOCS, ASKED, k=3, run=tmp_path)
    assert len(chunks.starts) == 2 + 3  # query 1's last two rows, query 2's three
    np.testing.assert_array_equal(resumed.values, reference.values)
    np.testing.assert_array_equal(resumed.parts["candidate"], reference.parts["candidate"])

    class NoRun:
        def score(self, model, train, queries):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="takes no run"):
        prefiltered(NoRun(), None, DOCS, ASKED, k=3, run=tmp_path)
