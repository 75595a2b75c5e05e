"""TracIn-CP against a torch.func hand computation over several checkpoints; one checkpoint
with η = 1 is the gradient dot product; checkpoints from files; the model is left as found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, grad, vmap

from datafluence.methods.gradient_similarity import GradientSimilarity
from datafluence.methods.tracin import TracInCP
from datafluence.tasks import ClassificationTask


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def data(task: ClassificationTask, n: int, seed: int, prefix: str):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return task.examples(x, y, [f"{prefix}{i}" for i in range(n)])


def flat_grads(model, state, task, examples, which):
    """Per-example gradients [N, P] by torch.func at the given weights."""
    params = {k: v.detach() for k, v in state.items()}
    fn = task.loss if which == "loss" else task.measure

    def one(p, x, y):
        return fn(lambda z: functional_call(model, p, (z,)), {"x": x[None], "y": y[None]})[0]

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, examples.tensors["x"], examples.tensors["y"])
    return torch.cat([g[k].reshape(len(examples), -1) for k in params], dim=1)


@pytest.mark.parametrize("measurement", ["log_prob", "prob"])
def test_matches_a_hand_computation_over_three_checkpoints(measurement):
    task = ClassificationTask(measurement=measurement)
    model = mlp(0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints = [mlp(s).state_dict() for s in (1, 2, 3)]
    rates = [0.1, 0.05, 0.01]
    train, queries = data(task, 7, 0, "t"), data(task, 3, 1, "q")
    scores = TracInCP(task, checkpoints, rates, chunk_size=3).score(model, train, queries)

    want = torch.zeros(7, 3, dtype=torch.float64)
    for state, lr in zip(checkpoints, rates, strict=True):
        g_train = flat_grads(model, state, task, train, "loss")
        g_query = flat_grads(model, state, task, queries, "measure")
        want += lr * (-g_train) @ g_query.T
    np.testing.assert_allclose(scores.values, want.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        scores.parts["per_layer"].sum(0), scores.values, rtol=1e-5, atol=1e-7
    )
    assert scores.parts["per_layer"].shape == (2, 7, 3)
    assert scores.settings["learning_rates"] == rates
    assert len(set(scores.settings["checkpoint_fingerprints"])) == 3
    for k, v in model.state_dict().items():  # the model's own weights are back
        torch.testing.assert_close(v, own[k], rtol=0, atol=0)
    if measurement == "log_prob":  # m = −L: Σ η ∇L_j·∇L_i, symmetric in train/query roles
        self_scores = TracInCP(task, checkpoints, rates).score(model, train, train).values
        assert (np.diag(self_scores) > 0).all()


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_one_checkpoint_with_unit_rate_is_the_gradient_dot_product(projection_dim):
    task = ClassificationTask()
    model = mlp(0)
    train, queries = data(task, 6, 0, "t"), data(task, 4, 1, "q")
    tracin = TracInCP(task, None, 1.0, projection_dim=projection_dim, seed=3)
    dot = GradientSimilarity(task, "dot", projection_dim=projection_dim, seed=3, progress=False)
    a = tracin.score(model, train, queries)
    b = dot.score(model, train, queries)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.parts["per_layer"], b.parts["per_layer"], rtol=1e-6, atol=1e-9)
    assert a.settings["layers"] == b.settings["layers"]


def test_checkpoint_files_and_resumable_runs(tmp_path):
    task = ClassificationTask()
    model = mlp(0)
    train, queries = data(task, 5, 0, "t"), data(task, 2, 1, "q")
    states = [mlp(1).state_dict(), mlp(2).state_dict()]
    torch.save({"state_dict": states[0]}, tmp_path / "a.pt")
    save_file({k: v.contiguous() for k, v in states[1].items()}, str(tmp_path / "b.safetensors"))
    paths = [tmp_path / "a.pt", str(tmp_path / "b.safetensors")]
    from_dicts = TracInCP(task, states, [0.5, 0.25]).score(model, train, queries)
    from_files = TracInCP(task, paths, [0.5, 0.25]).score(model, train, queries, run=tmp_path / "r")
    np.testing.assert_allclose(from_files.values, from_dicts.values, rtol=1e-6)
    assert from_files.settings["checkpoints"][0].endswith("a.pt")
    again = TracInCP(task, paths, [0.5, 0.25]).score(model, train, queries, run=tmp_path / "r")
    np.testing.assert_allclose(again.values, from_files.values, rtol=0)
    # the learning rates weigh stored rows, they are not part of what is stored
    halved = TracInCP(task, paths, [0.25, 0.125]).score(model, train, queries, run=tmp_path / "r")
    np.testing.assert_allclose(halved.values, from_files.values / 2, rtol=1e-6)


def test_bad_inputs_are_clear_errors(tmp_path):
    task = ClassificationTask()
    model = mlp(0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    train, queries = data(task, 3, 0, "t"), data(task, 2, 1, "q")
    with pytest.raises(ValueError, match="one per checkpoint"):
        TracInCP(task, [mlp(1).state_dict()], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        TracInCP(task, [], [])
    with pytest.raises(TypeError, match="as a list"):
        TracInCP(task, mlp(1).state_dict(), [0.1])
    wrong = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().state_dict()
    with pytest.raises(ValueError, match="does not fit the model"):
        TracInCP(task, [wrong], [0.1]).score(model, train, queries)
    with pytest.raises(FileNotFoundError):
        TracInCP(task, [tmp_path / "missing.pt"], [0.1]).score(model, train, queries)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, own[k], rtol=0, atol=0)
