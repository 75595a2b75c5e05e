"""Simfluence against reality: replaying curricula, TracIn-CP dot products, saved simulators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from datafluence.simfluence import (
    LinearSimulator,
    NoChangeSimulator,
    TracInCPSimulator,
    collect_runs,
    duplicate,
    effect_agreement,
    evaluate,
    gradient_dots,
    load_simulator,
    load_tracin,
    make_simulator,
    random_curricula,
    rollout,
    save_tracin,
    tracin_cp,
    train_curriculum,
)
from datafluence.tasks import ClassificationTask


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: threads only wait on each other (badly so on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(seed: int = 0, n_pool: int = 16, n_test: int = 5):
    g = torch.Generator().manual_seed(seed)
    task = ClassificationTask(num_classes=3)
    pool = task.examples(
        torch.randn(n_pool, 4, generator=g), torch.randint(0, 3, (n_pool,), generator=g)
    )
    test = task.examples(
        torch.randn(n_test, 4, generator=g),
        torch.randint(0, 3, (n_test,), generator=g),
        ids=[f"z{i}" for i in range(n_test)],
    )
    return task, pool, test


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_train_curriculum_replays_a_collected_run_and_trains_edited_ones() -> None:
    task, pool, test = _data()
    curricula, losses = collect_runs(_mlp, pool, test, task, 3, 6, 4, 0.3, seed=5, progress=False)
    for r in range(3):
        again = train_curriculum(_mlp, pool, test, task, curricula[r], 0.3, seed=5, run=r)
        np.testing.assert_array_equal(again, losses[r])
    # A step may hold one example several times (duplicate writes copies anywhere).
    edited = duplicate(curricula[0], example=3, k=10, seed=1)
    assert (edited == 3).sum() >= 10
    real = train_curriculum(_mlp, pool, test, task, edited, 0.3, seed=5, run=0)
    assert real.shape == (7, 5) and np.array_equal(real[0], losses[0, 0])
    assert not np.allclose(real, losses[0])
    seen: list[int] = []
    train_curriculum(
        _mlp, pool, test, task, edited, 0.3, seed=5, before_step=lambda t, m: seen.append(t)
    )
    assert seen == list(range(6))
    with pytest.raises(ValueError, match="one curriculum"):
        train_curriculum(_mlp, pool, test, task, curricula, 0.3)
    with pytest.raises(ValueError, match="outside the pool"):
        train_curriculum(_mlp, pool, test, task, curricula[0] + 100, 0.3)


def test_gradient_dots_equal_brute_force_per_example_gradients() -> None:
    task, pool, test = _data(1)
    torch.manual_seed(0)
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        out = functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(out, y[None])

    def flat(examples):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(
            params, examples.tensors["x"], examples.tensors["y"]
        )
        return torch.cat([v.reshape(len(examples), -1) for v in g.values()], dim=1).double()

    expected = (flat(pool) @ flat(test).T).numpy()
    got = gradient_dots(model, task, pool, test, chunk_size=5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    # Frozen layers do not count: only trainable layers span the space.
    for p in model[0].parameters():
        p.requires_grad_(False)
    last = gradient_dots(model, task, pool, test)
    head = flat(pool)[:, -(6 * 3 + 3) :] @ flat(test)[:, -(6 * 3 + 3) :].T
    np.testing.assert_allclose(last, head.numpy(), rtol=1e-4, atol=1e-6)


def test_tracin_cp_at_a_small_learning_rate_follows_its_own_run() -> None:
    """First order is exact as lr → 0: the roll-out matches the run its checkpoints came from."""
    task, pool, test = _data(2)
    c = random_curricula(len(pool), 1, 8, 4, seed=3)[0]
    lr = 1e-3
    real = train_curriculum(_mlp, pool, test, task, c, lr, seed=2)
    sim = tracin_cp(_mlp, pool, test, task, c, lr, seed=2)
    assert sim.dots.shape == (8, 16, 5) and sim.checkpoint_steps.tolist() == list(range(8))
    assert float(sim.lrs) == pytest.approx(lr / 4)  # the batch loss is a mean over 4 examples
    predicted = sim.predict(c, real[0], pool.ids)
    change = np.abs(real[-1] - real[0]).max()
    assert change > 1e-3
    assert np.abs(predicted - real).max() < 0.02 * change
    sparse = tracin_cp(_mlp, pool, test, task, c, lr, seed=2, every=3)
    assert sparse.checkpoint_steps.tolist() == [0, 3, 6]
    np.testing.assert_allclose(sparse.dots, sim.dots[[0, 3, 6]])
    with pytest.raises(ValueError, match="every"):
        tracin_cp(_mlp, pool, test, task, c, lr, every=0)


def test_saved_simulators_predict_and_score_like_the_fitted_ones(tmp_path) -> None:
    n, m = 12, 3
    pool = tuple(f"p{i}" for i in range(n))
    rng = np.random.default_rng(0)
    a = 0.25 + 0.01 * rng.normal(size=(n, m))
    b = -0.01 + 0.01 * rng.normal(size=(n, m))
    c = random_curricula(n, 10, 12, 4, seed=1)
    losses = rollout(a, b, c, rng.uniform(1, 2, size=(10, m)))
    for kind in ("additive", "multiplicative", "linear"):
        sim = make_simulator(kind, lam=(0.01, 0.1)).fit(c, losses, pool, val_runs=2)
        back = load_simulator(sim.save(tmp_path / f"{kind}.npz"))
        assert type(back) is type(sim) and back.lam_ == sim.lam_
        np.testing.assert_array_equal(
            back.predict(c[:2], losses[:2, 0], pool), sim.predict(c[:2], losses[:2, 0], pool)
        )
        np.testing.assert_array_equal(back.scores().values, sim.scores().values)
        assert back.scores().settings == sim.scores().settings
        assert back.selection_.equals(sim.selection_)
    with pytest.raises(ValueError, match="pool ids mismatch"):
        back.predict(c[0], losses[0, 0], tuple(f"q{i}" for i in range(n)))
    with pytest.raises(RuntimeError, match="fit"):
        LinearSimulator().save(tmp_path / "unfitted.npz")
    with pytest.raises(FileNotFoundError):
        load_simulator(tmp_path / "missing.npz")


def test_saved_tracin_predicts_like_the_computed_one(tmp_path) -> None:
    """Dot products, rates and checkpoint steps survive the trip; the ids come from the caller."""
    rng = np.random.default_rng(0)
    pool, test = [f"p{i}" for i in range(6)], ["z0", "z1"]
    c = random_curricula(6, 1, 5, 2, seed=0)[0]
    l0 = np.array([1.0, 2.0])
    for lrs in (0.1, np.linspace(0.1, 0.02, 5)):  # one rate, or one per step
        sim = TracInCPSimulator(rng.normal(size=(2, 6, 2)), lrs, pool, test, [0, 3])
        back = load_tracin(save_tracin(sim, tmp_path / "tracin" / "dots.npz"), pool, test)
        np.testing.assert_array_equal(back.predict(c, l0, pool), sim.predict(c, l0, pool))
        assert back.checkpoint_steps.tolist() == [0, 3] and back.test_ids == tuple(test)


def test_no_change_reference_and_effect_agreement() -> None:
    c = random_curricula(6, 2, 5, 2, seed=0)
    l0 = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 0.5]])
    flat = NoChangeSimulator().predict(c, l0, [str(i) for i in range(6)])
    assert flat.shape == (2, 6, 3) and np.array_equal(flat[:, -1], l0)
    table = evaluate(NoChangeSimulator(), c, flat, [str(i) for i in range(6)])
    assert table["mse_all_steps"].tolist() == [0.0, 0.0]

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 2, size=(6, 4))
    effect = np.outer(np.arange(6), [0.1, -0.2, 0.3, 0.0])
    out = effect_agreement(base + effect, base, base + effect, base, focus=[1, 2])
    assert out["mse_all_steps"] == 0 and out["effect_pearson"] == pytest.approx(1.0)
    assert out["real_effect_final"] == pytest.approx(0.5 * (-1.0 + 1.5))
    assert out["predicted_effect_final"] == out["real_effect_final"]
    wrong = effect_agreement(base - effect, base, base + effect, base)
    assert wrong["effect_pearson"] == pytest.approx(-1.0)
    assert wrong["effect_spearman_final"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one shape"):
        effect_agreement(base, base[:3], base, base)
