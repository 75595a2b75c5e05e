"""Run directories: atomic files, settings checks, and resumable partitions."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from datafluence import store
from datafluence.finetune import BatchedFinetuner
from datafluence.methods import EmpiricalInfluence
from datafluence.store import RunDir, RunMismatchError


def leftovers(folder) -> list[str]:
    """Temporary files (atomic writes, assembling matrices) left in a folder tree."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# --- atomic writes -----------------------------------------------------------------------


def test_atomic_writes_leave_no_temp_files(tmp_path):
    store.atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    store.atomic_save_npy(tmp_path / "b.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    store.atomic_write_bytes(tmp_path / "sub" / "c.bin", b"\x00\x01")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.npy", "c.bin", "sub"]
    assert store.read_json(tmp_path / "a.json") == {"x": [1, 2]}
    assert np.array_equal(np.load(tmp_path / "b.npy"), np.arange(6).reshape(2, 3))
    assert (tmp_path / "sub" / "c.bin").read_bytes() == b"\x00\x01"


def test_failing_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "scores.npy"
    store.atomic_save_npy(path, np.ones(3))
    with pytest.raises(ZeroDivisionError), store.atomic_path(path) as tmp:
        tmp.write_bytes(b"half a file")
        raise ZeroDivisionError("died mid-write")
    assert np.array_equal(np.load(path), np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]

    class Unsaveable:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("cannot convert")

    with pytest.raises(RuntimeError, match="cannot convert"):
        store.atomic_save_npy(path, Unsaveable())
    assert np.array_equal(np.load(path), np.ones(3))
    with pytest.raises(TypeError):
        store.atomic_write_json(tmp_path / "scores.npy", {"bad": object()})
    assert np.array_equal(np.load(path), np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "meta.json"
    store.atomic_write_json(path, {"status": "done"})
    with pytest.raises(KeyboardInterrupt), store.atomic_path(path) as tmp:
        tmp.write_text("{")
        raise KeyboardInterrupt
    assert store.read_json(path) == {"status": "done"}
    assert leftovers(tmp_path) == []


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        store.atomic_write_json(tmp_path / "a.json", {})
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644


# --- RunDir.open -------------------------------------------------------------------------

SETTINGS = {"recipe": {"lr": 0.001, "steps": 1, "betas": (0.9, 0.999)}, "n_per_class": 10}


def test_open_same_settings_reopens(tmp_path):
    run = RunDir(tmp_path / "run").open(SETTINGS, method="empirical")
    meta = run.meta()
    assert meta["settings"]["recipe"]["betas"] == [0.9, 0.999]  # stored as JSON
    assert meta["status"] == "running" and meta["method"] == "empirical"
    assert meta["settings_hash"] == store.fingerprint(meta["settings"])
    store.atomic_write_json(run.path / "keep.json", {"kept": True})
    run.update_meta(status="done")

    again = RunDir(tmp_path / "run").open(json.loads(json.dumps(SETTINGS)))  # tuples == lists
    assert again.meta()["status"] == "done"  # existing meta not rewritten
    assert again.meta()["created"] == meta["created"]
    assert store.read_json(run.path / "keep.json") == {"kept": True}


def test_open_other_settings_is_refused(tmp_path):
    RunDir(tmp_path).open(SETTINGS)
    (tmp_path / "scores.npy").write_bytes(b"old")
    other = {**SETTINGS, "recipe": {**SETTINGS["recipe"], "lr": 0.01}}
    with pytest.raises(RunMismatchError, match=r"--overwrite") as info:
        RunDir(tmp_path).open(other)
    message = str(info.value)
    assert "recipe.lr: 0.001 -> 0.01" in message
    assert "steps" not in message and "n_per_class" not in message  # only what changed
    assert (tmp_path / "scores.npy").read_bytes() == b"old"
    assert RunDir(tmp_path).meta()["settings"]["recipe"]["lr"] == 0.001

    with pytest.raises(RunMismatchError, match=r"seed: \(absent\) -> 3"):
        RunDir(tmp_path).open({**SETTINGS, "seed": 3})


def test_open_with_overwrite_clears_old_files(tmp_path):
    run = RunDir(tmp_path).open(SETTINGS)
    (tmp_path / "scores.npy").write_bytes(b"old")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    run.update_meta(status="done")
    other = {**SETTINGS, "n_per_class": 3}
    RunDir(tmp_path).open(other, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    meta = RunDir(tmp_path).meta()
    assert meta["settings"]["n_per_class"] == 3 and meta["status"] == "running"


def test_open_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        RunDir(tmp_path / "f").open(SETTINGS)


# --- partitioned -------------------------------------------------------------------------


def matrix_rows(start: int, end: int, n_cols: int = 4) -> np.ndarray:
    return np.arange(start * n_cols, end * n_cols, dtype=np.float32).reshape(-1, n_cols) / 7


def test_partitioned_resumes_only_missing_partitions(tmp_path):
    calls: list[tuple[int, int]] = []

    def flaky(start, end):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((start, end))
        return matrix_rows(start, end)

    run = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt, match=r"2/4 partitions .* saved"):
        run.partitioned("m", 10, 4, 3, flaky, progress=False)
    folder = tmp_path / "partitions" / "m"
    assert sorted(p.name for p in folder.glob("rows_*.npy")) == [
        "rows_000000000_000000003.npy",
        "rows_000000003_000000006.npy",
    ]
    assert leftovers(tmp_path) == []

    resumed: list[tuple[int, int]] = []

    def counting(start, end):
        resumed.append((start, end))
        return matrix_rows(start, end)

    # a different part size on resume: the saved layout wins, so the split is the same
    values = run.partitioned("m", 10, 4, 5, counting, progress=False)
    assert resumed == [(6, 9), (9, 10)]
    fresh = RunDir(tmp_path / "fresh").partitioned("m", 10, 4, 3, matrix_rows, progress=False)
    assert values.dtype == np.float32
    assert np.array_equal(values, fresh)
    assert np.array_equal(values, matrix_rows(0, 10))

    again: list[tuple[int, int]] = []
    run.partitioned("m", 10, 4, 3, lambda s, e: again.append((s, e)), progress=False)
    assert again == []  # everything on disk: nothing recomputed


def test_partitioned_other_exceptions_keep_saved_partitions(tmp_path):
    def failing(start, end):
        if start >= 4:
            raise FloatingPointError("boom")
        return matrix_rows(start, end)

    with pytest.raises(FloatingPointError, match="boom"):
        RunDir(tmp_path).partitioned("m", 8, 4, 2, failing, progress=False)
    assert len(list((tmp_path / "partitions" / "m").glob("rows_*.npy"))) == 2


def test_partitioned_dest_writes_npy(tmp_path):
    dest = tmp_path / "out" / "scores.npy"
    dest.parent.mkdir()
    values = RunDir(tmp_path).partitioned("m", 7, 4, 3, matrix_rows, progress=False, dest=dest)
    on_disk = np.load(dest)
    assert on_disk.dtype == np.float32 and on_disk.shape == (7, 4)
    assert np.array_equal(on_disk, matrix_rows(0, 7))
    assert np.array_equal(np.asarray(values), matrix_rows(0, 7))
    assert leftovers(tmp_path) == []


def test_partitioned_dest_interrupted_leaves_no_temp_file(tmp_path):
    def interrupted(start, end):
        if start >= 3:
            raise KeyboardInterrupt
        return matrix_rows(start, end)

    dest = tmp_path / "scores.npy"
    with pytest.raises(KeyboardInterrupt):
        RunDir(tmp_path).partitioned("m", 7, 4, 3, interrupted, progress=False, dest=dest)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_partitioned_checks_shapes(tmp_path):
    run = RunDir(tmp_path)
    run.partitioned("m", 4, 4, 2, matrix_rows, progress=False)
    with pytest.raises(RunMismatchError, match="4x4"):
        run.partitioned("m", 5, 4, 2, matrix_rows, progress=False)
    with pytest.raises(RuntimeError, match="expected"):
        run.partitioned("bad", 4, 4, 2, lambda s, e: np.zeros((e - s, 3)), progress=False)
    with pytest.raises(ValueError, match="nothing to compute"):
        run.partitioned("empty", 0, 4, 2, matrix_rows, progress=False)


def test_drop_partitions(tmp_path):
    run = RunDir(tmp_path)
    run.partitioned("a", 2, 4, 1, matrix_rows, progress=False)
    run.partitioned("b", 2, 4, 1, matrix_rows, progress=False)
    run.drop_partitions("a")
    assert [p.name for p in (tmp_path / "partitions").iterdir()] == ["b"]
    run.drop_partitions()
    assert not (tmp_path / "partitions").exists()


# --- EIF with a run directory ------------------------------------------------------------


def test_eif_interrupted_then_resumed_equals_uninterrupted(
    tmp_path, monkeypatch, make_model, make_examples, task
):
    model = make_model(seed=3)
    train, queries = make_examples(7, seed=4), make_examples(5, seed=5, prefix="q")
    method = EmpiricalInfluence(task, steps=2, lr=0.1, chunk_size=3, progress=False)
    reference = method.score(model, train, queries)

    original = BatchedFinetuner.finetune
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second chunk
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchedFinetuner, "finetune", interrupted)
    run = RunDir(tmp_path)
    with pytest.raises(KeyboardInterrupt, match="1/3 partitions"):
        method.score(model, train, queries, run=run)
    assert len(list(tmp_path.glob("partitions/empirical-*/rows_*.npy"))) == 1

    calls["n"] = -100  # no more interruptions; count the chunks the resumed run computes
    resumed = method.score(model, train, queries, run=run)
    assert calls["n"] == -100 + 2  # chunks 2 and 3 only
    assert np.array_equal(resumed.values, reference.values)
    assert resumed.train_ids == reference.train_ids and resumed.query_ids == reference.query_ids
    assert leftovers(tmp_path) == []


def test_eif_partitions_of_other_settings_are_not_reused(tmp_path, make_model, make_examples, task):
    model = make_model(seed=6)
    train, queries = make_examples(5, seed=7), make_examples(4, seed=8, prefix="q")
    run = RunDir(tmp_path)
    a = EmpiricalInfluence(task, lr=0.01, chunk_size=2, progress=False)
    b = EmpiricalInfluence(task, lr=0.05, chunk_size=2, progress=False)
    first = a.score(model, train, queries, run=run)
    second = b.score(model, train, queries, run=run)
    assert np.array_equal(second.values, b.score(model, train, queries).values)
    assert not np.allclose(first.values, second.values)
    assert len(list((tmp_path / "partitions").iterdir())) == 2
    # other weights: other partitions too
    other_model = make_model(seed=60)
    third = a.score(other_model, train, queries, run=run)
    assert np.array_equal(third.values, a.score(other_model, train, queries).values)
    assert len(list((tmp_path / "partitions").iterdir())) == 3


def test_eif_partitions_of_other_data_with_same_ids_are_not_reused(
    tmp_path, make_model, make_examples, task
):
    model = make_model(seed=9)
    train_a, queries = make_examples(4, seed=10), make_examples(3, seed=11, prefix="q")
    train_b = make_examples(4, seed=12)  # same ids "t0".."t3", other images and labels
    assert train_a.ids == train_b.ids
    method = EmpiricalInfluence(task, lr=0.1, progress=False)
    run = RunDir(tmp_path)
    method.score(model, train_a, queries, run=run)
    from_run = method.score(model, train_b, queries, run=run)
    expected = method.score(model, train_b, queries)
    assert np.array_equal(from_run.values, expected.values)


def test_gradient_method_partitions_of_other_data_with_same_ids_are_not_reused(tmp_path):
    """The same key rule as EIF, for the gradient methods (one shared helper)."""
    from datafluence.methods import GradientSimilarity
    from datafluence.tasks import ClassificationTask

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    task = ClassificationTask()
    ids = [f"t{i}" for i in range(6)]
    a = task.examples(torch.randn(6, 16), torch.randint(0, 3, (6,)), ids)
    b = task.examples(torch.randn(6, 16), torch.randint(0, 3, (6,)), ids)
    q = task.examples(torch.randn(2, 16), torch.randint(0, 3, (2,)), ["q0", "q1"])
    method = GradientSimilarity(task, kind="dot", chunk_size=2, progress=False)
    run = RunDir(tmp_path).open({"x": 1})
    method.score(model, a, q, run=run)
    on_b = method.score(model, b, q, run=run)
    fresh = method.score(model, b, q)
    np.testing.assert_array_equal(on_b.values, fresh.values)


# --- fingerprints ------------------------------------------------------------------------


def _examples(ids=("a", "b", "c"), x=None, **extra):
    from datafluence.tasks import Examples

    x = torch.arange(6, dtype=torch.float32).reshape(3, 2) if x is None else x
    return Examples({"x": x, "y": torch.tensor([0, 1, 0]), **extra}, tuple(ids))


def test_examples_fingerprint_is_stable_and_sees_ids_values_dtypes_and_names():
    base = store.examples_fingerprint(_examples())
    assert base == store.examples_fingerprint(_examples())  # same data, same key
    assert len(base) == 16 and int(base, 16) >= 0
    x = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    others = [
        _examples(ids=("a", "c", "b")),  # same tensors, other ids (or order of ids)
        _examples(x=x + 1e-6),  # other values, same ids
        _examples(x=x.double()),  # same numbers, other dtype
        _examples(x=x.reshape(3, 2, 1)),  # same bytes, other shape
        _examples(z=torch.zeros(3)),  # one more tensor
    ]
    keys = [store.examples_fingerprint(e) for e in others]
    assert base not in keys and len(set(keys)) == len(keys)


def test_examples_fingerprint_ignores_layout_and_device_details():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    strided = _examples(x=x[:, ::2])  # a non-contiguous view
    assert store.examples_fingerprint(strided) == store.examples_fingerprint(
        _examples(x=x[:, ::2].contiguous())
    )
    empty = _examples(x=torch.zeros(3, 0))
    assert store.examples_fingerprint(empty) != store.examples_fingerprint(_examples())
