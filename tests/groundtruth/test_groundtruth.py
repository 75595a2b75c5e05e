"""Retraining ground truths: leave-one-out and subset retraining against ridge regression's
closed form, resumable runs, the default trainer and the regression task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datafluence.groundtruth import (
    SubsetRetraining,
    Trainer,
    init_model,
    leave_one_out,
    random_subsets,
    subset_retraining,
)
from datafluence.methods.influence import InfluenceFunction
from datafluence.metrics.attribution import lds, loo_correlation
from datafluence.tasks import ClassificationTask, RegressionTask

L2 = 0.05


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ridge_data(n: int = 24, d: int = 3, seed: int = 0):
    task = RegressionTask()
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(n + 5, d, generator=gen, dtype=torch.float64)
    y = x @ w + 0.5 + 0.3 * torch.randn(n + 5, generator=gen, dtype=torch.float64)
    train = task.examples(x[:n], y[:n], [f"t{i}" for i in range(n)])
    queries = task.examples(x[n:], y[n:], [f"q{i}" for i in range(5)])
    return task, train, queries


def factory() -> nn.Module:
    return nn.Linear(3, 1).double()


def ridge_measure(x: np.ndarray, y: np.ndarray, xq: np.ndarray, yq: np.ndarray) -> np.ndarray:
    """−½ (prediction − target)² of the queries after exactly minimising
    mean_k ½ (wᵀx̃_k − y_k)² + (L2/2)‖w‖², x̃ = [x, 1] (the bias is penalised too)."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    w = np.linalg.solve(xa.T @ xa + len(x) * L2 * np.eye(xa.shape[1]), xa.T @ y)
    pred = np.hstack([xq, np.ones((len(xq), 1))]) @ w
    return -0.5 * (pred - yq) ** 2


def arrays(examples):
    return examples.tensors["x"].numpy(), examples.tensors["y"].numpy()[:, 0]


def exact_trainer(task) -> Trainer:
    return Trainer(task, "lbfgs", l2=L2, tol=1e-13)


def test_leave_one_out_matches_ridge_regression_in_closed_form():
    task, train, queries = ridge_data()
    x, y = arrays(train)
    xq, yq = arrays(queries)
    rows = [0, 5, 17, 23]
    loo = leave_one_out(
        task, factory, train, queries, exact_trainer(task), rows=rows, seeds=(0, 1), progress=False
    )
    full = ridge_measure(x, y, xq, yq)
    expected = np.stack(
        [full - ridge_measure(np.delete(x, i, 0), np.delete(y, i), xq, yq) for i in rows]
    )
    assert loo.train_ids == ("t0", "t5", "t17", "t23") and loo.method == "loo"
    np.testing.assert_allclose(loo.values, expected, rtol=1e-4, atol=1e-7)
    assert loo.parts["per_seed"].shape == (2, 4, 5)
    assert np.abs(expected).max() > 1e-3  # the effects are not trivially zero


def test_influence_predicts_leave_one_out_on_ridge_regression():
    """End to end: the exact influence function (Hessian = GN for a linear model with squared
    error, damping = the L2 strength) ranks ridge LOO effects almost perfectly."""
    task, train, queries = ridge_data(n=40)
    model = exact_trainer(task)(factory, train, 0)
    scores = InfluenceFunction(task, "explicit", damping=L2, progress=False).score(
        model, train, queries
    )
    loo = leave_one_out(task, factory, train, queries, exact_trainer(task), progress=False)
    result = loo_correlation(scores, loo)
    assert result["pearson"] > 0.95
    # one copy of an example changes the measurements by ≈ score / N
    ratio = np.median(np.abs(loo.values) / (np.abs(scores.values) / len(train) + 1e-12))
    assert 0.7 < ratio < 1.4


def test_subset_retraining_matches_closed_form_and_gives_a_high_lds():
    task, train, queries = ridge_data(n=30)
    x, y = arrays(train)
    xq, yq = arrays(queries)
    result = subset_retraining(
        task,
        factory,
        train,
        queries,
        exact_trainer(task),
        n_subsets=12,
        alpha=0.5,
        progress=False,
    )
    assert result.masks.shape == (12, 30) and (result.masks.sum(1) == 15).all()
    expected = np.stack([ridge_measure(x[m], y[m], xq, yq) for m in result.masks])
    np.testing.assert_allclose(result.measurements, expected, rtol=1e-4, atol=1e-7)
    model = exact_trainer(task)(factory, train, 0)
    scores = InfluenceFunction(task, "explicit", damping=L2, progress=False).score(
        model, train, queries
    )
    assert lds(scores, result)["lds"] > 0.7


def test_runs_resume_per_retraining(tmp_path):
    task, train, queries = ridge_data(n=10)
    calls = []
    inner = exact_trainer(task)

    def counting(model_factory, subset, seed):
        calls.append((len(subset), seed))
        return inner(model_factory, subset, seed)

    counting.settings = inner.settings  # identifies the trainer in the saved settings
    first = leave_one_out(
        task,
        factory,
        train,
        queries,
        counting,
        rows=[1, 2],
        seeds=(0, 3),
        run=tmp_path,
        progress=False,
    )
    assert len(calls) == 2 + 4  # two full models, then 2 rows x 2 seeds
    parts = sorted((tmp_path / "partitions").glob("loo-*/rows_*.npy"))
    assert len(parts) == 4
    parts[2].unlink()
    calls.clear()
    again = leave_one_out(
        task,
        factory,
        train,
        queries,
        counting,
        rows=[1, 2],
        seeds=(0, 3),
        run=tmp_path,
        progress=False,
    )
    assert calls == [(9, 0)]  # only the lost retraining: row 2, seed 0
    np.testing.assert_allclose(again.values, first.values, rtol=1e-6)

    calls.clear()
    subsets = subset_retraining(
        task,
        factory,
        train,
        queries,
        counting,
        n_subsets=3,
        seeds=(0, 1),
        run=tmp_path,
        progress=False,
    )
    assert len(calls) == 6
    calls.clear()
    subset_retraining(
        task,
        factory,
        train,
        queries,
        counting,
        n_subsets=3,
        seeds=(0, 1),
        run=tmp_path,
        progress=False,
    )
    assert calls == []
    loaded = SubsetRetraining.load(tmp_path)
    np.testing.assert_array_equal(loaded.masks, subsets.masks)
    np.testing.assert_allclose(loaded.measurements, subsets.measurements)
    assert loaded.train_ids == train.ids and loaded.seeds == (0, 1)
    assert loaded.per_seed.shape == (2, 3, 5)


def test_subset_retraining_round_trips_through_save_and_load(tmp_path):
    masks = random_subsets(6, 4, 0.5, seed=3)
    result = SubsetRetraining(
        masks, np.arange(8.0).reshape(4, 2), tuple("abcdef"), ("q0", "q1"), 0.5, (0,)
    )
    result.save(tmp_path / "gt")
    loaded = SubsetRetraining.load(tmp_path / "gt")
    np.testing.assert_array_equal(loaded.masks, masks)
    assert loaded.per_seed is None and loaded.query_ids == ("q0", "q1")
    with pytest.raises(FileNotFoundError):
        SubsetRetraining.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="measurements must be"):
        SubsetRetraining(masks, np.zeros((3, 2)), tuple("abcdef"), ("q0", "q1"), 0.5, (0,))


def test_random_subsets_have_exact_sizes_and_are_reproducible():
    a = random_subsets(20, 30, 0.3, seed=1)
    assert a.dtype == bool and a.shape == (30, 20) and (a.sum(1) == 6).all()
    np.testing.assert_array_equal(a, random_subsets(20, 30, 0.3, seed=1))
    assert not np.array_equal(a, random_subsets(20, 30, 0.3, seed=2))
    assert len({row.tobytes() for row in a}) > 25
    with pytest.raises(ValueError, match="alpha"):
        random_subsets(20, 5, 1.0)
    with pytest.raises(ValueError, match="keeps 0"):
        random_subsets(4, 5, 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        random_subsets(20, 1, 0.5)


def test_trainer_is_seeded_and_leaves_the_global_generator_alone():
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen)
    train = task.examples(x, torch.randint(0, 3, (40,), generator=gen))

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    trainer = Trainer(task, "adam", epochs=3, lr=1e-2, batch_size=16)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = trainer(make, train, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = trainer(make, train, 1)
    c = trainer(make, train, 2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)
    assert not torch.equal(init_model(make, 1)[0].weight, a[0].weight)  # it trained
    loss = task.loss(a, train.tensors).mean()
    assert loss < task.loss(init_model(make, 1), train.tensors).mean()
    sgd = Trainer(task, "sgd", epochs=2, lr=0.1)(make, train, 0)
    assert not sgd.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"epochs": 0}, "at least 1"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"l2": -0.1}, "l2"),
    ],
)
def test_trainer_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(ClassificationTask(), **kwargs)


def test_ground_truths_refuse_bad_arguments():
    task, train, queries = ridge_data(n=6)
    with pytest.raises(ValueError, match="distinct"):
        leave_one_out(task, factory, train, queries, seeds=(1, 1), progress=False)
    with pytest.raises(ValueError, match="outside"):
        leave_one_out(task, factory, train, queries, rows=[6], progress=False)
    with pytest.raises(ValueError, match="empty"):
        leave_one_out(task, factory, train, queries, seeds=(), progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        leave_one_out(task, lambda: "model", train, queries, rows=[0], progress=False)


def test_regression_task_checks_and_curvature():
    """Squared error: GN = Hessian for a linear model, and sampled targets give the GN
    in expectation (K-FAC with fisher='sample' equals the exact one on average)."""
    task = RegressionTask()
    ex = task.examples(torch.randn(5, 2), [1.0, 2.0, 3.0, 4.0, 5.0])
    assert ex.tensors["y"].shape == (5, 1)
    with pytest.raises(ValueError, match="neg_loss"):
        RegressionTask("log_prob")
    with pytest.raises(ValueError, match="NaN"):
        task.examples(torch.randn(2, 2), [float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"\[batch, k\]"):
        task.outputs(nn.Linear(2, 3), ex.tensors)
    model = nn.Linear(2, 1)
    np.testing.assert_allclose(
        task.measure(model, ex.tensors).detach().numpy(),
        (-0.5 * (model(ex.tensors["x"]) - ex.tensors["y"]) ** 2)[:, 0].detach().numpy(),
    )
    _, train, queries = ridge_data(n=15)
    lin = factory()
    gn = InfluenceFunction(task, "explicit", damping=0.1, progress=False)
    hess = InfluenceFunction(task, "explicit", damping=0.1, matrix="hessian", progress=False)
    np.testing.assert_allclose(
        gn.score(lin, train, queries).values, hess.score(lin, train, queries).values, rtol=1e-6
    )
    outputs = torch.zeros(20000, 2, dtype=torch.float64)
    drawn = task.sample_labels(outputs, {"y": outputs.clone()}, torch.Generator().manual_seed(0))
    cov = np.cov(drawn["y"].numpy().T)
    np.testing.assert_allclose(cov, np.eye(2), atol=0.05)
