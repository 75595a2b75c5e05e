"""Exactness of empirical influence (EIF): the batched engine against independent ground truth.

EIF[i, j] = m(θ_i, q_j) − m(θ, q_j), θ_i = K optimizer steps on training example (group) i,
everything in eval mode (dropout off, BatchNorm on its running statistics, never updated).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datafluence.finetune import BatchedFinetuner, FinetuneRecipe, finetune_copy
from datafluence.methods import EmpiricalInfluence
from datafluence.tasks import ClassificationTask

TOL = 1e-5


def eif(task, model, train, queries, **kwargs):
    kwargs.setdefault("progress", False)
    groups = kwargs.pop("groups", None)
    return EmpiricalInfluence(task, **kwargs).score(model, train, queries, groups=groups)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, np.float64))))


# --- independent ground truth (no datafluence code) --------------------------------------


@torch.no_grad()
def log_p(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y|x) in eval mode, on a deep copy so the model's own flags never change."""
    m = copy.deepcopy(model).eval()
    return torch.log_softmax(m(x), dim=-1).gather(-1, y[:, None])[:, 0]


def hand_finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    only: str | None = None,
) -> nn.Module:
    """Deep copy, eval mode, torch.optim.SGD on the mean cross-entropy of the batch (x, y)."""
    tuned = copy.deepcopy(model).eval()
    params = [p for n, p in tuned.named_parameters() if only is None or n.startswith(only)]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(tuned(x), y).backward()
        opt.step()
    return tuned


def hand_row(model, train, idx, queries, **sgd) -> np.ndarray:
    x, y = train.tensors["x"][idx], train.tensors["y"][idx]
    tuned = hand_finetune(model, x, y, **sgd)
    qx, qy = queries.tensors["x"], queries.tensors["y"]
    return (log_p(tuned, qx, qy) - log_p(model, qx, qy)).numpy()


# --- (a) batched == naive ----------------------------------------------------------------

RECIPES = {
    "sgd": dict(optimizer="sgd", lr=0.1),
    "sgd-momentum-wd": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.05),
    "adam": dict(optimizer="adam", lr=0.01),
    "adam-wd": dict(optimizer="adam", lr=0.01, weight_decay=0.1),
    "adamw": dict(optimizer="adamw", lr=0.01, weight_decay=0.1, betas=(0.8, 0.99)),
}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", list(RECIPES))
def test_batched_equals_naive(make_model, make_examples, task, name, steps):
    model = make_model(seed=1)
    train, queries = make_examples(7, seed=2), make_examples(6, seed=3, prefix="q")
    recipe = dict(steps=steps, **RECIPES[name])
    # chunk 3 does not divide N=7; probe chunk 4 < M=6 and does not divide it either
    batched = eif(task, model, train, queries, chunk_size=3, probe_chunk_size=4, **recipe)
    naive = eif(task, model, train, queries, engine="naive", **recipe)
    assert batched.shape == naive.shape == (7, 6)
    assert np.abs(naive.values).max() > 1e-2  # the fine-tuning really moved something
    assert max_abs(batched.values, naive.values) < TOL
    assert batched.train_ids == naive.train_ids == train.ids
    assert batched.query_ids == naive.query_ids == queries.ids


def test_chunking_does_not_change_numbers(make_model, make_examples, task):
    model = make_model(seed=4)
    train, queries = make_examples(7, seed=5), make_examples(5, seed=6, prefix="q")
    a = eif(task, model, train, queries, steps=2, lr=0.05, chunk_size=1, probe_chunk_size=1)
    b = eif(task, model, train, queries, steps=2, lr=0.05, chunk_size=7, probe_chunk_size=5)
    c = eif(task, model, train, queries, steps=2, lr=0.05, chunk_size=100, probe_chunk_size=2)
    assert max_abs(a.values, b.values) < TOL
    assert max_abs(a.values, c.values) < TOL


# --- (b) hand-written ground truth -------------------------------------------------------


@pytest.mark.parametrize("engine", ["batched", "naive"])
@pytest.mark.parametrize(
    "sgd",
    [dict(steps=3, lr=0.1), dict(steps=2, lr=0.05, momentum=0.9, weight_decay=0.1)],
    ids=["plain", "momentum-wd"],
)
def test_matches_hand_written_sgd(make_model, make_examples, task, engine, sgd):
    model = make_model(seed=7)
    train, queries = make_examples(5, seed=8), make_examples(4, seed=9, prefix="q")
    scores = eif(task, model, train, queries, engine=engine, chunk_size=2, **sgd)
    for i in range(len(train)):
        expected = hand_row(model, train, [i], queries, **sgd)
        assert np.abs(expected).max() > 1e-3
        assert max_abs(scores.values[i], expected) < TOL, f"row {i}"


# --- (c) first-order check on a linear-softmax model --------------------------------------


def grad_log_p(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flattened ∇θ log p(y|x) for each example, shape [N, n_params]."""
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]].backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_one_sgd_step_is_lr_times_gradient_dot_product(make_examples, task):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    train, queries = make_examples(6, seed=11), make_examples(5, seed=12, prefix="q")
    lr = 1e-3
    scores = eif(task, model, train, queries, steps=1, lr=lr)
    g_train = grad_log_p(model, train.tensors["x"], train.tensors["y"])
    g_query = grad_log_p(model, queries.tensors["x"], queries.tensors["y"])
    # Δ log p(q) ≈ ∇log p(q) · (−lr ∇loss(s)) = lr ∇log p(q) · ∇log p(s)
    first_order = lr * (g_train @ g_query.T).numpy()
    scale = np.abs(first_order).max()
    assert scale > 1e-3
    np.testing.assert_allclose(scores.values, first_order, rtol=1e-2, atol=1e-2 * scale)


# --- (d) BatchNorm / dropout semantics ---------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"


@pytest.mark.parametrize("engine", ["batched", "naive"])
def test_model_left_unchanged_and_deterministic_in_train_mode(
    make_model, make_examples, task, engine
):
    model = make_model(seed=13, dropout=0.5, train_mode=True)
    eval_twin = make_model(seed=13, dropout=0.5, train_mode=False)
    train, queries = make_examples(6, seed=14), make_examples(5, seed=15, prefix="q")
    before = snapshot(model)
    bn = model.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())

    kw = dict(engine=engine, steps=2, lr=0.1, chunk_size=4, probe_chunk_size=2)
    first = eif(task, model, train, queries, **kw)
    assert model.training and all(m.training for m in model.modules())
    assert_same_state(model, before)
    assert torch.equal(bn.running_mean, stats[0])
    assert torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert all(p.grad is None for p in model.parameters())

    second = eif(task, model, train, queries, **kw)
    assert np.array_equal(first.values, second.values)  # dropout never drawn
    # train mode or eval mode makes no difference: fine-tuning and measuring are in eval mode
    from_eval = eif(task, eval_twin, train, queries, **kw)
    assert np.array_equal(first.values, from_eval.values)
    assert not eval_twin.training
    # and it is the eval-mode ground truth (running BN statistics, no dropout)
    assert max_abs(first.values[2], hand_row(model, train, [2], queries, steps=2, lr=0.1)) < TOL


def test_measurement_uses_running_statistics_not_probe_batch(make_model, make_examples, task):
    """With batch statistics a probe's value would depend on which probes share its batch."""
    model = make_model(seed=16, train_mode=True)
    train, queries = make_examples(3, seed=17), make_examples(6, seed=18, prefix="q")
    one = eif(task, model, train, queries, probe_chunk_size=1, lr=0.1)
    all_ = eif(task, model, train, queries, probe_chunk_size=6, lr=0.1)
    assert max_abs(one.values, all_.values) < TOL


# --- (e) trainable subsets ---------------------------------------------------------------


def test_trainable_head_only(make_model, make_examples, task):
    model = make_model(seed=19)
    train, queries = make_examples(7, seed=20), make_examples(5, seed=21, prefix="q")
    kw = dict(steps=3, lr=0.1, trainable=("head.*",))
    batched = eif(task, model, train, queries, chunk_size=3, **kw)
    naive = eif(task, model, train, queries, engine="naive", **kw)
    assert max_abs(batched.values, naive.values) < TOL
    assert batched.settings["recipe"]["trainable"] == ("head.*",)
    # independent: SGD on the head's parameters only
    for i in (0, 6):
        expected = hand_row(model, train, [i], queries, steps=3, lr=0.1, only="head.")
        assert max_abs(batched.values[i], expected) < TOL
    # freezing the body changes the answer
    full = eif(task, model, train, queries, chunk_size=3, steps=3, lr=0.1)
    assert max_abs(full.values, batched.values) > 1e-3


def test_trainable_changes_only_matching_parameters(make_model, make_examples, task):
    model = make_model(seed=22)
    train = make_examples(3, seed=23)
    recipe = FinetuneRecipe(steps=2, lr=0.5, trainable=("head.*",))
    tuned = finetune_copy(model, task, recipe, train[[0]].tensors)
    for name, p in model.state_dict().items():
        changed = not torch.equal(tuned.state_dict()[name], p)
        assert changed == name.startswith("head."), name

    finetuner = BatchedFinetuner(model, task, recipe)
    params = finetuner.finetune(train, [[0], [1], [2]], train.ids)
    assert sorted(params) == ["head.bias", "head.weight"]
    assert params["head.weight"].shape == (3, *model.head.weight.shape)
    assert torch.allclose(params["head.weight"][0], tuned.head.weight, atol=1e-6)


# --- (f) groups --------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_groups_equal_finetuning_on_the_whole_group(make_model, make_examples, task, optimizer):
    model = make_model(seed=24)
    train, queries = make_examples(7, seed=25), make_examples(4, seed=26, prefix="q")
    groups = [[0, 1], [2], [3, 4, 5], [6]]  # unequal sizes share the first chunk of 3
    lr = 0.1 if optimizer == "sgd" else 0.01
    kw = dict(steps=2, lr=lr, optimizer=optimizer, groups=groups)
    batched = eif(task, model, train, queries, chunk_size=3, **kw)
    naive = eif(task, model, train, queries, engine="naive", **kw)
    assert batched.train_ids == ("t0+t1", "t2", "t3+t4+t5", "t6")
    assert batched.shape == (4, 4)
    assert max_abs(batched.values, naive.values) < TOL
    singles = eif(task, model, train, queries, chunk_size=3, steps=2, lr=lr, optimizer=optimizer)
    assert max_abs(batched.values[1], singles.values[2]) < TOL
    assert max_abs(batched.values[3], singles.values[6]) < TOL
    assert max_abs(batched.values[0], singles.values[0]) > 1e-4  # a group is not a single
    if optimizer == "sgd":
        for row, group in ((0, [0, 1]), (2, [3, 4, 5])):
            expected = hand_row(model, train, group, queries, steps=2, lr=lr)
            assert max_abs(batched.values[row], expected) < TOL


def test_bad_groups_are_refused(make_model, make_examples, task):
    model = make_model()
    train, queries = make_examples(3), make_examples(2, prefix="q")
    method = EmpiricalInfluence(task, progress=False)
    with pytest.raises(ValueError, match="outside the training set"):
        method.score(model, train, queries, groups=[[0, 3]])
    with pytest.raises(ValueError, match="at least one training index"):
        method.score(model, train, queries, groups=[[0], []])
    with pytest.raises(ValueError, match="groups is empty"):
        method.score(model, train, queries, groups=[])


# --- (g) measurement spaces --------------------------------------------------------------


def test_measurement_spaces_are_consistent(make_model, make_examples):
    model = make_model(seed=27)
    train, queries = make_examples(5, seed=28), make_examples(4, seed=29, prefix="q")
    kw = dict(steps=2, lr=0.2, chunk_size=2)
    logp = eif(ClassificationTask(measurement="log_prob"), model, train, queries, **kw).values
    prob = eif(ClassificationTask(measurement="prob"), model, train, queries, **kw).values
    neg_loss = eif(ClassificationTask(measurement="neg_loss"), model, train, queries, **kw).values
    before = log_p(model, queries.tensors["x"], queries.tensors["y"]).numpy().astype(np.float64)
    after = before[None, :] + logp
    assert max_abs(prob, np.exp(after) - np.exp(before)[None, :]) < TOL
    assert max_abs(neg_loss, logp) < TOL  # −cross-entropy is log p(y|x)
    assert np.array_equal(np.sign(prob[np.abs(logp) > 1e-4]), np.sign(logp[np.abs(logp) > 1e-4]))
    assert max_abs(prob, logp) > 1e-3  # really a different space


def test_settings_name_recipe_and_measurement(make_model, make_examples):
    model = make_model()
    train, queries = make_examples(2), make_examples(2, prefix="q")
    task = ClassificationTask(num_classes=5, measurement="prob")
    scores = eif(task, model, train, queries, steps=2, lr=0.03, optimizer="adam")
    assert scores.method == "empirical"
    assert scores.settings["measurement"] == "prob"
    assert scores.settings["num_classes"] == 5
    assert scores.settings["recipe"]["steps"] == 2
    assert scores.settings["recipe"]["lr"] == 0.03
    assert scores.settings["recipe"]["optimizer"] == "adam"


# --- (h) ids and sign convention ---------------------------------------------------------


@pytest.mark.parametrize("measurement", ["log_prob", "prob", "neg_loss"])
def test_self_influence_is_positive_and_ids_label_the_axes(make_model, make_examples, measurement):
    model = make_model(seed=30)
    task = ClassificationTask(measurement=measurement)
    train = make_examples(6, seed=31, prefix="img-", task=task)
    scores = eif(task, model, train, train, steps=1, lr=1e-3, chunk_size=4)
    assert scores.train_ids == scores.query_ids == tuple(f"img-{i}" for i in range(6))
    assert np.all(np.diag(scores.values) > 0)
    frame = scores.to_pandas()
    assert list(frame.index) == list(train.ids)
    assert frame.loc["img-2", "img-2"] == scores.values[2, 2]


def test_sign_convention_row_is_after_minus_before(make_model, make_examples, task):
    """Row i, column j = m(θ_i, q_j) − m(θ, q_j): rows are train examples, columns queries."""
    model = make_model(seed=32)
    train, queries = make_examples(3, seed=33), make_examples(4, seed=34, prefix="q")
    scores = eif(task, model, train, queries, steps=1, lr=0.5)
    assert scores.shape == (3, 4)
    tuned = hand_finetune(model, train.tensors["x"][[1]], train.tensors["y"][[1]], 1, 0.5)
    qx, qy = queries.tensors["x"], queries.tensors["y"]
    after, before = log_p(tuned, qx, qy), log_p(model, qx, qy)
    assert max_abs(scores.values[1], (after - before).numpy()) < TOL
    assert max_abs(scores.values[1], (before - after).numpy()) > 1e-3
