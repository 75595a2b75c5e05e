"""PBRF: against the explicit damped Gauss-Newton influence (first order in ε), the
stationarity of its objective written out independently, sign and scale conventions,
resumable runs and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datafluence.methods.influence import InfluenceFunction
from datafluence.methods.pbrf import PBRF, _Problem
from datafluence.store import RunDir
from datafluence.tasks import ClassificationTask, Examples, RegressionTask

LAMBDA = 0.05


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data(n: int = 30, seed: int = 0, prefix: str = "t") -> tuple[ClassificationTask, Examples]:
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return task, task.examples(x, y, [f"{prefix}{i}" for i in range(n)])


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).double()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def influence(model, task, train, queries, matrix: str = "gn") -> np.ndarray:
    method = InfluenceFunction(task, "explicit", damping=LAMBDA, matrix=matrix, progress=False)
    return method.score(model, train, queries).values.astype(np.float64)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_matches_explicit_gauss_newton_influence_on_a_linear_softmax_model():
    """For small ε (central difference: error O(ε²)) the PBRF score equals
    ∇m_jᵀ (G + λI)⁻¹ (−∇L_i) with the same λ; the model need not be at an optimum."""
    task, train = data()
    _, queries = data(n=5, seed=2, prefix="q")
    model = linear()
    expected = influence(model, task, train, queries)
    pbrf = PBRF(task, damping=LAMBDA, epsilon=1e-4, symmetric=True, rtol=1e-9, progress=False)
    scores = pbrf.score(model, train, queries)
    assert scores.train_ids == train.ids and scores.query_ids == queries.ids
    assert relative_error(scores.values, expected) < 2e-5
    assert scores.settings["solver"]["not_converged"] == []
    assert (np.abs(expected) > 1e-2).any()


def test_one_sided_error_is_first_order_in_epsilon():
    """Without the central difference the gap to the influence function shrinks like ε."""
    task, train = data()
    _, queries = data(n=5, seed=2, prefix="q")
    model = linear()
    expected = influence(model, task, train, queries)
    rows = [0, 5, 11]
    errors = []
    for eps in (1e-3, 1e-4):
        pbrf = PBRF(task, damping=LAMBDA, epsilon=eps, rtol=1e-10, progress=False)
        errors.append(
            relative_error(pbrf.score(model, train, queries, rows=rows).values, expected[rows])
        )
    assert errors[1] < 5e-3
    assert 6 < errors[0] / errors[1] < 14


def test_a_nonlinear_network_follows_the_gauss_newton_not_the_hessian():
    """The Bregman term's curvature at θ_s is the Gauss-Newton matrix for any network, so
    away from an optimum PBRF agrees with GN influence and not with Hessian influence."""
    task, train = data(n=20)
    _, queries = data(n=4, seed=3, prefix="q")
    model = mlp()
    gn = influence(model, task, train, queries, "gn")
    hessian = influence(model, task, train, queries, "hessian")
    pbrf = PBRF(task, damping=LAMBDA, epsilon=1e-3, symmetric=True, rtol=1e-9, progress=False)
    values = pbrf.score(model, train, queries).values
    assert relative_error(values, gn) < 1e-3
    assert relative_error(values, hessian) > 20 * relative_error(values, gn)


def test_negative_epsilon_removes_and_keeps_the_sign_convention():
    task, train = data()
    _, queries = data(n=5, seed=2, prefix="q")
    model = linear()
    expected = influence(model, task, train, queries)
    rows = [1, 2]
    removed = PBRF(task, damping=LAMBDA, epsilon=-1e-5, rtol=1e-10, progress=False)
    assert (
        relative_error(removed.score(model, train, queries, rows=rows).values, expected[rows])
        < 1e-3
    )


def test_response_is_a_stationary_point_of_the_objective_written_out():
    """θ_ε from `response` zeroes the gradient of (1/N) Σ KL(p_s ‖ p_θ) + ε CE_i + λ/2 ‖θ − θ_s‖²,
    written here with plain torch for a linear softmax model."""
    task, train = data()
    model = linear()
    eps, i = 0.02, 4
    pbrf = PBRF(task, damping=LAMBDA, epsilon=eps, rtol=1e-10, progress=False)
    theta = pbrf.response(model, train, i)
    assert set(theta) == {"weight", "bias"}
    x, y = train.tensors["x"], train.tensors["y"]
    w0, b0 = model.weight.detach(), model.bias.detach()
    w = theta["weight"].clone().requires_grad_(True)
    b = theta["bias"].clone().requires_grad_(True)
    log_ps = torch.log_softmax(x @ w0.T + b0, -1)
    log_p = torch.log_softmax(x @ w.T + b, -1)
    kl = (log_ps.exp() * (log_ps - log_p)).sum(-1).mean()
    ce = nn.functional.cross_entropy((x[i] @ w.T + b)[None], y[i : i + 1])
    prox = ((w - w0) ** 2).sum() + ((b - b0) ** 2).sum()
    grads = torch.autograd.grad(kl + eps * ce + LAMBDA / 2 * prox, [w, b])
    residual = torch.cat([g.reshape(-1) for g in grads]).norm()
    moved = torch.cat([(w - w0).reshape(-1), (b - b0).reshape(-1)]).norm()
    assert moved > 1e-3  # it moved ...
    assert residual < 1e-8 * eps  # ... to where the objective is flat


def test_default_epsilon_is_one_over_n_and_rows_take_positions_or_ids():
    task, train = data()
    _, queries = data(n=3, seed=2, prefix="q")
    model = linear()
    pbrf = PBRF(task, damping=LAMBDA, rtol=1e-9, progress=False)
    assert pbrf.epsilon_for(len(train)) == pytest.approx(1 / 30)
    some = pbrf.score(model, train, queries, rows=[7, "t3"])
    assert some.train_ids == ("t7", "t3")
    assert some.settings["epsilon_used"] == pytest.approx(1 / 30)
    alone = pbrf.score(model, train, queries, rows=np.array([3]))
    np.testing.assert_allclose(some.values[1], alone.values[0], rtol=1e-6, atol=1e-8)


def test_regression_task_matches_influence_too():
    """Squared error (RegressionTask): PBRF's Bregman term is ½‖f(x) − f_s(x)‖²."""
    task = RegressionTask()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(25, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1)) + 0.1 * torch.randn(25, generator=gen, dtype=torch.float64)
    train = task.examples(x, y, [f"t{i}" for i in range(25)])
    queries = task.examples(x[:4] + 0.3, y[:4], [f"q{i}" for i in range(4)])
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    expected = influence(model, task, train, queries)
    pbrf = PBRF(task, damping=LAMBDA, epsilon=1e-3, symmetric=True, rtol=1e-9, progress=False)
    assert relative_error(pbrf.score(model, train, queries).values, expected) < 1e-3


def test_a_preconditioner_speeds_the_solves_up_without_changing_them():
    """With the exact (G + λI)⁻¹ of θ_s as L-BFGS's initial matrix a solve takes a few
    evaluations; the answer is the same PBRF (the stopping rule reads the true gradient)."""
    task, train = data(n=20)
    _, queries = data(n=4, seed=3, prefix="q")
    model = mlp()
    rows = [0, 3, 9]
    plain = PBRF(task, damping=LAMBDA, epsilon=0.05, rtol=1e-9, progress=False)
    reference = plain.score(model, train, queries, rows=rows)
    exact = InfluenceFunction(task, "explicit", damping=LAMBDA, progress=False)
    curvature = exact.fit(model, train).curvature
    fast = PBRF(
        task, damping=LAMBDA, epsilon=0.05, rtol=1e-9, preconditioner=curvature, progress=False
    )
    scores = fast.score(model, train, queries, rows=rows)
    np.testing.assert_allclose(scores.values, reference.values, rtol=1e-6, atol=1e-8)
    evals = scores.settings["solver"]["evaluations"]
    assert sum(evals) < 0.6 * sum(reference.settings["solver"]["evaluations"])
    assert scores.settings["preconditioner"] == "explicit"
    # ε = 0.05 is far from infinitesimal: the PBRF really differs from the influence function
    assert relative_error(scores.values, influence(model, task, train, queries)[rows]) > 1e-2
    with pytest.raises(TypeError, match="preconditioner"):
        PBRF(task, damping=LAMBDA, preconditioner=3)


def test_a_run_saves_partitions_and_resumes(tmp_path, monkeypatch):
    task, train = data(n=12)
    _, queries = data(n=3, seed=2, prefix="q")
    model = linear()
    pbrf = PBRF(task, damping=LAMBDA, epsilon=1e-3, chunk_size=2, progress=False)
    first = pbrf.score(model, train, queries, rows=[0, 1, 2, 3, 4], run=tmp_path)
    parts = sorted((tmp_path / "partitions").glob("pbrf-*/rows_*.npy"))
    assert len(parts) == 3
    parts[1].unlink()  # as if interrupted while computing rows 2-3
    calls = []
    original = _Problem.row

    def counting(self, i, eps):
        calls.append(i)
        return original(self, i, eps)

    monkeypatch.setattr(_Problem, "row", counting)
    again = pbrf.score(model, train, queries, rows=[0, 1, 2, 3, 4], run=RunDir(tmp_path))
    assert calls == [2, 3]
    np.testing.assert_allclose(again.values, first.values, rtol=1e-5, atol=1e-7)
    other = PBRF(task, damping=LAMBDA, epsilon=2e-3, chunk_size=2, progress=False)
    other.score(model, train, queries, rows=[0], run=tmp_path)
    assert calls[-1] == 0  # other settings never reuse these partitions


def test_float32_models_are_solved_in_float64_by_default():
    task, train = data(n=15)
    _, queries = data(n=3, seed=2, prefix="q")
    model = linear()
    expected = influence(model, task, train, queries)
    model = model.float()
    train32 = Examples({"x": train.tensors["x"].float(), "y": train.tensors["y"]}, train.ids)
    queries32 = Examples(
        {"x": queries.tensors["x"].float(), "y": queries.tensors["y"]}, queries.ids
    )
    scores = PBRF(task, damping=LAMBDA, epsilon=1e-4, symmetric=True, progress=False).score(
        model, train32, queries32
    )
    # the float32 weights differ from the float64 ones by rounding only
    assert relative_error(scores.values, expected) < 1e-4
    assert next(model.parameters()).dtype == torch.float32  # PBRF works on a copy
    assert scores.settings["dtype"] == "float64"


def test_stops_with_a_warning_when_the_budget_runs_out():
    task, train = data(n=10)
    _, queries = data(n=2, seed=2, prefix="q")
    pbrf = PBRF(task, damping=LAMBDA, epsilon=1e-3, rtol=1e-12, max_iter=2, progress=False)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        scores = pbrf.score(linear(), train, queries, rows=[0, 1])
    assert scores.settings["solver"]["not_converged"] == ["t0", "t1"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"damping": 0.0}, ValueError, "> 0"),
        ({"damping": "0.1"}, TypeError, "must be a number"),
        ({"damping": {"0": 0.1}}, TypeError, "one number"),
        ({"damping": 0.1, "damping_factor": 0.1}, ValueError, "not both"),
        ({"damping": 0.1, "epsilon": 0.0}, ValueError, "non-zero"),
        ({"damping": 0.1, "rtol": 2.0}, ValueError, "rtol"),
        ({"damping": 0.1, "dtype": torch.int64}, ValueError, "floating"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        PBRF(ClassificationTask(), **kwargs)


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        ([30], ValueError, "outside"),
        (["nope"], ValueError, "no training example"),
        ([1, 1], ValueError, "duplicates"),
        ([], ValueError, "empty"),
        ([1.5], TypeError, "positions or ids"),
    ],
)
def test_bad_rows_are_refused(rows, error, match):
    task, train = data()
    _, queries = data(n=2, seed=2, prefix="q")
    with pytest.raises(error, match=match):
        PBRF(task, damping=LAMBDA, progress=False).score(linear(), train, queries, rows=rows)
