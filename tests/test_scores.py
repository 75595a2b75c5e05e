"""The Scores container: validation, top-k, pandas view, save/load."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from datafluence import store
from datafluence.scores import Scores, as_array

VALUES = np.array(
    [
        [0.5, -1.0, 2.0],
        [0.5, 3.0, -2.0],
        [-0.1, 3.0, 0.0],
        [0.7, -5.0, 1.0],
    ],
    dtype=np.float32,
)
TRAIN = ("a", "b", "c", "d")
QUERIES = ("q0", "q1", "q2")


def make(**kwargs) -> Scores:
    fields = dict(values=VALUES, train_ids=TRAIN, query_ids=QUERIES, method="test")
    fields.update(kwargs)
    return Scores(**fields)


# --- validation --------------------------------------------------------------------------


def test_values_and_ids_are_normalised():
    s = make(values=VALUES.astype(np.float64).tolist(), train_ids=[1, 2, 3, 4])
    assert s.values.dtype == np.float32
    assert s.train_ids == ("1", "2", "3", "4")
    assert s.shape == (4, 3)
    assert np.array_equal(as_array(s), VALUES.astype(np.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(values=np.zeros(4)), r"must be 2-D .* got shape \(4,\)"),
        (dict(values=np.zeros((4, 3, 1))), r"must be 2-D"),
        (dict(train_ids=TRAIN[:3]), r"shape \(4, 3\) but there are 3 train ids and 3 query"),
        (dict(query_ids=QUERIES + ("q3",)), r"4 train ids and 4 query ids"),
        (dict(parts={"layer": np.zeros((2, 3, 4))}), r"part 'layer' has shape \(2, 3, 4\)"),
        (dict(parts={"layer": np.zeros(3)}), r"last two axes must be \(4, 3\)"),
    ],
)
def test_invalid_scores_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_parts_with_leading_axes_are_accepted():
    s = make(parts={"layer": np.zeros((2, 4, 3)), "plain": np.ones((4, 3))})
    assert s.parts["layer"].shape == (2, 4, 3)


# --- top-k -------------------------------------------------------------------------------


def test_top_all_queries_best_first():
    top = make().top(2)
    assert list(top.columns) == ["query", "rank", "train", "score"]
    assert top["query"].tolist() == ["q0", "q0", "q1", "q1", "q2", "q2"]
    assert top["rank"].tolist() == [1, 2, 1, 2, 1, 2]
    # q0: d 0.7, then a/b tie at 0.5 -> the earlier row first
    # q1: b/c tie at 3.0 -> b first; q2: a 2.0, d 1.0
    assert top["train"].tolist() == ["d", "a", "b", "c", "a", "d"]
    assert top["score"].tolist() == pytest.approx([0.7, 0.5, 3.0, 3.0, 2.0, 1.0])


def test_top_ties_keep_row_order():
    s = Scores(np.zeros((5, 1)), list("vwxyz"), ["q"], method="t")
    assert s.top(5)["train"].tolist() == list("vwxyz")


def test_top_one_query_by_id_and_position():
    s = make()
    by_id = s.top(3, query="q2")
    by_pos = s.top(3, query=2)
    by_neg = s.top(3, query=-1)
    for frame in (by_pos, by_neg):
        pd.testing.assert_frame_equal(by_id, frame)
    assert by_id["train"].tolist() == ["a", "d", "c"]
    assert by_id["score"].tolist() == pytest.approx([2.0, 1.0, 0.0])
    assert set(by_id["query"]) == {"q2"}
    assert np.array_equal(s.column("q1"), VALUES[:, 1])
    assert np.array_equal(s.column(np.int64(0)), VALUES[:, 0])


def test_top_k_larger_than_rows_and_invalid_k():
    s = make()
    assert len(s.top(100, query="q0")) == 4
    with pytest.raises(ValueError, match="k must be at least 1"):
        s.top(0)


def test_unknown_query_is_a_clear_error():
    s = make()
    with pytest.raises(KeyError, match=r"no query with id 'nope'; ids look like: q0, q1, q2"):
        s.top(3, query="nope")
    with pytest.raises(KeyError, match="no query with id '1'"):
        s.column("1")  # a string is an id, never a position
    with pytest.raises(IndexError, match="query position 3 out of range"):
        s.top(3, query=3)
    with pytest.raises(IndexError, match="out of range"):
        s.column(-4)
    many = Scores(np.zeros((1, 7)), ["a"], [f"x{i}" for i in range(7)], method="t")
    with pytest.raises(KeyError, match=r"x0, x1, x2, x3, x4, \.\.\."):
        many.column("y")


# --- pandas ------------------------------------------------------------------------------


def test_to_pandas_index_and_columns():
    frame = make().to_pandas()
    assert list(frame.index) == list(TRAIN)
    assert list(frame.columns) == list(QUERIES)
    assert frame.loc["b", "q1"] == pytest.approx(3.0)
    assert frame.loc["d", "q1"] == pytest.approx(-5.0)
    assert np.array_equal(frame.to_numpy(), VALUES)


# --- save / load -------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    parts = {
        "layer": np.arange(24, dtype=np.float32).reshape(2, 4, 3),
        "bias": np.full((4, 3), 0.25, dtype=np.float64),
    }
    settings = {"recipe": {"lr": 0.001, "betas": (0.9, 0.999)}, "n": np.int64(3)}
    s = make(method="empirical", settings=settings, parts=parts)
    assert s.save(tmp_path / "run") == tmp_path / "run"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "meta.json",
        "parts.bias.npy",
        "parts.layer.npy",
        "scores.npy",
    ]
    loaded = Scores.load(tmp_path / "run")
    assert np.array_equal(loaded.values, VALUES) and loaded.values.dtype == np.float32
    assert loaded.train_ids == TRAIN and loaded.query_ids == QUERIES
    assert loaded.method == "empirical"
    assert loaded.settings == {"recipe": {"lr": 0.001, "betas": [0.9, 0.999]}, "n": 3}
    assert sorted(loaded.parts) == ["bias", "layer"]
    for name, part in parts.items():
        assert np.array_equal(loaded.parts[name], part)
        assert loaded.parts[name].dtype == part.dtype
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["scores"]["shape"] == [4, 3]


def test_save_keeps_run_settings(tmp_path):
    run = store.RunDir(tmp_path).open({"experiment": "x", "lr": 0.1})
    make(settings={"mine": 1}).save(tmp_path)
    meta = run.meta()
    assert meta["settings"] == {"experiment": "x", "lr": 0.1}  # the run's, untouched
    assert meta["scores"]["settings"] == {"mine": 1}
    store.RunDir(tmp_path).open({"experiment": "x", "lr": 0.1})  # still reopens
    assert Scores.load(tmp_path).settings == {"mine": 1}


def test_save_overwrites_previous_scores(tmp_path):
    make().save(tmp_path)
    make(values=VALUES * 2).save(tmp_path)
    assert np.array_equal(Scores.load(tmp_path).values, VALUES * 2)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_without_scores_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no scores .*finished run directory"):
        Scores.load(tmp_path)
    store.RunDir(tmp_path).open({"a": 1})  # meta.json but no scores.npy (unfinished run)
    with pytest.raises(FileNotFoundError, match="holds no scores"):
        Scores.load(tmp_path)
    np.save(tmp_path / "scores.npy", VALUES)  # a matrix, but meta.json does not describe it
    with pytest.raises(FileNotFoundError, match="describes no scores"):
        Scores.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no scores"):
        Scores.load(tmp_path / "does-not-exist")


def test_mmap_load(tmp_path):
    make(parts={"layer": np.ones((2, 4, 3), dtype=np.float32)}).save(tmp_path)
    loaded = Scores.load(tmp_path, mmap=True)
    assert np.array_equal(loaded.values, VALUES)
    assert not loaded.values.flags.writeable  # read-only view of the file, not a copy
    assert isinstance(loaded.values, np.memmap) or isinstance(loaded.values.base, np.memmap)
    assert isinstance(loaded.parts["layer"], np.memmap)
    assert loaded.top(1, "q1")["train"].tolist() == ["b"]
    eager = Scores.load(tmp_path)
    assert eager.values.flags.writeable and not isinstance(eager.values.base, np.memmap)


def test_bottom_lists_the_strongest_opponents_and_nan_ranks_last():
    values = np.array([[0.5], [-2.0], [np.nan], [-1.0], [3.0]])
    s = Scores(values, list("abcde"), ["q"], method="t")
    assert s.bottom(3)["train"].tolist() == ["b", "d", "a"]
    assert s.bottom(3)["score"].tolist() == pytest.approx([-2.0, -1.0, 0.5])
    pd.testing.assert_frame_equal(s.bottom(2, query="q"), s.top(2, query=0, ascending=True))
    assert s.top(5)["train"].tolist() == ["e", "a", "d", "b", "c"]  # NaN last both ways
    assert s.bottom(5)["train"].tolist()[-1] == "c"
