"""The cached reference-classifier training is reproducible whatever ran before it."""

from __future__ import annotations

import torch
from torch import nn

from datafluence.models import TrainRecipe, train_classifier


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
