"""TRAK against the hand-computed formula (no projection), ensembling over checkpoints,
seeded projection, subsets of the fitted set, and the language-model output function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_lm import CharTokenizer, char_gpt2
from torch import nn
from torch.func import functional_call, grad, vmap

from datafluence.methods.trak import TRAK, output_function
from datafluence.tasks import ClassificationTask


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def data(n: int, seed: int, prefix: str):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return ClassificationTask().examples(x, y, [f"{prefix}{i}" for i in range(n)])


def margin_grads(model, state, examples):
    """∇θ log(p_y/(1 − p_y)) per example [N, P] and 1 − p_y [N], by torch.func."""
    params = {k: v.detach() for k, v in state.items()}

    def margin(p, x, y):
        logits = functional_call(model, p, (x[None],))[0]
        p_y = torch.softmax(logits, -1).gather(0, y[None])[0]
        return torch.log(p_y / (1 - p_y))

    x, y = examples.tensors["x"], examples.tensors["y"]
    g = vmap(grad(margin), in_dims=(None, 0, 0))(params, x, y)
    probs = torch.softmax(functional_call(model, params, (x,)), -1)
    q = 1 - probs.gather(1, y[:, None])[:, 0]
    return torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1), q.detach()


def hand_trak(model, states, train, queries, damping):
    kernel_terms, qs = [], []
    for state in states:
        phi, q = margin_grads(model, state, train)
        phi_q, _ = margin_grads(model, state, queries)
        k = phi.T @ phi + damping * torch.eye(phi.shape[1], dtype=phi.dtype)
        kernel_terms.append(phi @ torch.linalg.solve(k, phi_q.T))
        qs.append(q)
    return (torch.stack(kernel_terms).mean(0) * torch.stack(qs).mean(0)[:, None]).numpy()


def test_unprojected_scores_match_the_formula_and_ensembling_averages():
    model = mlp(0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    states = [mlp(s).state_dict() for s in (1, 2)]
    task = ClassificationTask()
    train, queries = data(8, 0, "t"), data(3, 1, "q")
    trak = TRAK(task, states, projection_dim=None, damping=0.1)
    scores = trak.score(model, train, queries)
    np.testing.assert_allclose(
        scores.values,
        hand_trak(model, states, train, queries, 0.1 * len(train)),  # λ on the mean kernel
        rtol=1e-5,
        atol=1e-8,
    )
    # one checkpoint each: the ensemble is the mean kernel term times the mean Q, not the
    # mean of the products
    single = [
        TRAK(task, [s], projection_dim=None, damping=0.1).score(model, train, queries)
        for s in states
    ]
    assert not np.allclose(scores.values, (single[0].values + single[1].values) / 2, rtol=1e-3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, own[k], rtol=0, atol=0)
    assert scores.settings["damping_used"] == [0.1, 0.1]
    assert scores.settings["feature_dim"] == 3 * 4 + 4 + 4 * 3 + 3


def test_default_damping_is_relative_and_self_scores_are_positive():
    model = mlp(0)
    task = ClassificationTask()
    train = data(40, 0, "t")  # more examples than parameters: the k x k solve
    scores = TRAK(task, None, projection_dim=None).score(model, train, train)
    lam = scores.settings["damping_used"][0]
    phi, q = margin_grads(model, model.state_dict(), train)
    # 1e-3 x the mean eigenvalue of the mean kernel ΦᵀΦ / N, i.e. N λ on ΦᵀΦ
    mean_eig = float(torch.trace(phi.T @ phi)) / (phi.shape[1] * len(train))
    assert lam == pytest.approx(1e-3 * mean_eig, rel=1e-9)
    np.testing.assert_allclose(
        scores.values,
        hand_trak(model, [model.state_dict()], train, train, lam * len(train)),
        rtol=1e-4,
        atol=1e-8,
    )
    assert (np.diag(scores.values) > 0).all()  # φ_iᵀ K⁻¹ φ_i Q_i with K positive definite


def test_projection_is_seeded_and_close_to_the_exact_kernel_when_wide():
    model = mlp(0)
    task = ClassificationTask()
    train, queries = data(12, 0, "t"), data(4, 1, "q")
    states = [mlp(1).state_dict(), mlp(2).state_dict()]
    a = TRAK(task, states, projection_dim=64, damping=0.1, seed=5).score(model, train, queries)
    b = TRAK(task, states, projection_dim=64, damping=0.1, seed=5).score(model, train, queries)
    c = TRAK(task, states, projection_dim=64, damping=0.1, seed=6).score(model, train, queries)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(a.values, c.values)
    assert a.settings["projection"] == {"dim": 64, "kind": "rademacher", "seed": 5}
    exact = TRAK(task, states, projection_dim=None, damping=0.1).score(model, train, queries)
    wide = TRAK(task, states, projection_dim=2048, damping=0.1, projection="gaussian")
    got = wide.score(model, train, queries).values
    assert np.corrcoef(got.ravel(), exact.values.ravel())[0, 1] > 0.95


def test_fitted_features_serve_subsets_and_refuse_other_data():
    model = mlp(0)
    task = ClassificationTask()
    train, queries = data(9, 0, "t"), data(2, 1, "q")
    trak = TRAK(task, None, projection_dim=32, damping=0.05).fit(model, train)
    full = trak.score(model, train, queries)
    rows = [7, 2, 4]
    part = trak.score(model, train[rows], queries)
    np.testing.assert_allclose(part.values, full.values[rows], rtol=1e-6)
    assert part.train_ids == ("t7", "t2", "t4")
    with pytest.raises(ValueError, match="not in the set"):
        trak.score(model, data(2, 3, "other"), queries)
    changed = task.examples(train.tensors["x"] + 1, train.tensors["y"], train.ids)
    with pytest.raises(ValueError, match="other data"):
        trak.score(model, changed, queries)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(ValueError, match="fit\\(model, train\\) again"):
        trak.score(model, train, queries)


def test_bad_inputs():
    with pytest.raises(ValueError, match="damping"):
        TRAK(ClassificationTask(), None, damping=-1.0)
    with pytest.raises(TypeError, match="no output function"):
        output_function(object(), None, {})  # type: ignore[arg-type]


def test_language_model_output_is_the_summed_token_margin():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    from datafluence.tasks import CausalLMTask

    model = char_gpt2()
    task = CausalLMTask(CharTokenizer())
    train = task.examples([("ab", "cd"), "abc", ("h", "ggd")])
    queries = task.examples([("ab", "c"), "bad"], ids=["q0", "q1"])
    f, q = output_function(task, model, train.tensors)
    for i, (tokens, start) in enumerate(task.encode(item) for item in train.items):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0].double()
        p = torch.softmax(logits, -1)[torch.arange(start - 1, len(tokens) - 1), tokens[start:]]
        assert float(f[i].detach()) == pytest.approx(float(torch.log(p / (1 - p)).sum()), rel=1e-6)
        assert float(q[i]) == pytest.approx(float((1 - p).mean()), rel=1e-6)
    scores = TRAK(task, None, projection_dim=16).score(model, train, queries)
    assert scores.shape == (3, 2) and np.isfinite(scores.values).all()
