"""The cached reference-classifier training is reproducible whatever ran before it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datafluence.models import TrainRecipe, train_classifier, training
from datafluence.models.training import train_classifier_checkpoints


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_training_is_seeded_including_the_initial_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFLUENCE_CACHE", str(tmp_path))
    x, y = torch.rand(20, 2, 2), torch.randint(0, 3, (20,))
    recipe = TrainRecipe(epochs=1, batch_size=8)
    torch.manual_seed(123)
    first, cached = train_classifier(_tiny, x, y, recipe, "t", "k", use_cache=False, progress=False)
    torch.rand(1000)  # other random draws before the second call must not matter
    second, _ = train_classifier(_tiny, x, y, recipe, "t", "k", use_cache=False, progress=False)
    assert not cached
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other, _ = train_classifier(
        _tiny,
        x,
        y,
        TrainRecipe(epochs=1, batch_size=8, seed=1),
        "t",
        "k",
        use_cache=False,
        progress=False,
    )
    assert not torch.equal(other[1].weight, first[1].weight)
    saved, _ = train_classifier(_tiny, x, y, recipe, "t", "k", progress=False)
    loaded, from_cache = train_classifier(_tiny, x, y, recipe, "t", "k", progress=False)
    assert from_cache and torch.equal(loaded[1].weight, saved[1].weight)
    torch.testing.assert_close(saved[1].weight, first[1].weight, rtol=0, atol=0)


def _checkpointed(recipe: TrainRecipe, x: torch.Tensor, y: torch.Tensor, **kw):
    return train_classifier_checkpoints(_tiny, x, y, recipe, "t", "k", progress=False, **kw)


def test_epoch_checkpoints_are_the_separate_shorter_trainings(tmp_path, monkeypatch):
    """One run's epoch-e weights equal a run stopped after e epochs (what they replace)."""
    monkeypatch.setenv("DATAFLUENCE_CACHE", str(tmp_path))
    x, y = torch.rand(20, 2, 2), torch.randint(0, 3, (20,))
    recipe = TrainRecipe(epochs=3, batch_size=8, lr=0.05)
    model, states, cached = _checkpointed(recipe, x, y, use_cache=False)
    assert not cached and len(states) == 3 and not model.training
    for epoch, state in enumerate(states, start=1):
        shorter = TrainRecipe(epochs=epoch, batch_size=8, lr=0.05)
        alone, _ = train_classifier(_tiny, x, y, shorter, "t", "k", use_cache=False, progress=False)
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    assert not torch.equal(states[0]["1.weight"], states[-1]["1.weight"])
    for name, value in model.state_dict().items():  # the final model is the last checkpoint
        torch.testing.assert_close(states[-1][name], value, rtol=0, atol=0)
    assert not list(tmp_path.rglob("*.safetensors"))  # use_cache=False writes nothing


def test_epoch_checkpoints_are_cached_beside_the_final_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFLUENCE_CACHE", str(tmp_path))
    x, y = torch.rand(20, 2, 2), torch.randint(0, 3, (20,))
    recipe = TrainRecipe(epochs=3, batch_size=8, lr=0.05)
    model, states, cached = _checkpointed(recipe, x, y)
    assert not cached and len(list((tmp_path / "models").glob("t-*.safetensors"))) == 3

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(training, "_fit", no_training)
        again, loaded, cached = _checkpointed(recipe, x, y)
        final, final_cached = train_classifier(_tiny, x, y, recipe, "t", "k", progress=False)
    assert cached and final_cached and not again.training
    for state, reloaded in zip(states, loaded, strict=True):
        assert state.keys() == reloaded.keys()
        for name in state:
            torch.testing.assert_close(reloaded[name], state[name], rtol=0, atol=0)
    for name, value in model.state_dict().items():  # the same final model for both functions
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(final.state_dict()[name], value, rtol=0, atol=0)

    other, other_states, other_cached = _checkpointed(
        TrainRecipe(epochs=3, batch_size=8, lr=0.01), x, y
    )
    assert not other_cached and not torch.equal(other_states[0]["1.weight"], states[0]["1.weight"])
    assert len(list((tmp_path / "models").glob("t-*.safetensors"))) == 6

    training._cache_paths("t", recipe, "k")[0].unlink()  # a partial set is not trusted
    _, retrained, cached = _checkpointed(recipe, x, y)
    assert not cached and training._cache_paths("t", recipe, "k")[0].exists()
    torch.testing.assert_close(retrained[0]["1.weight"], states[0]["1.weight"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one epoch"):
        _checkpointed(TrainRecipe(epochs=0), x, y)
