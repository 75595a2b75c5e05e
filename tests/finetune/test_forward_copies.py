"""SmallCNN.forward_copies, the EIF engine's many-copies measurement, against plain forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from datafluence.methods import EmpiricalInfluence
from datafluence.models import SmallCNN
from datafluence.tasks import ClassificationTask


def perturbed_copies(model: torch.nn.Module, copies: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        n: p.detach() + scale * p.detach().abs().mean() * torch.randn(copies, *p.shape, generator=g)
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize(
    ("in_channels", "side", "m"),
    [(1, 28, 130), (3, 31, 5)],  # 130 > COPY_BLOCK: blocked; side 31: odd map, pool drops a row
)
def test_forward_copies_equals_each_copys_forward(in_channels: int, side: int, m: int) -> None:
    torch.manual_seed(0)
    model = SmallCNN(n_classes=7, in_channels=in_channels, side=side).eval()
    params = perturbed_copies(model, 4)
    x = torch.rand(m, in_channels, side, side, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stacked = model.forward_copies(params, x)
        each = torch.stack(
            [functional_call(model, {n: p[c] for n, p in params.items()}, (x,)) for c in range(4)]
        )
    assert stacked.shape == (4, m, 7)
    assert (each[1] - each[0]).abs().max() > 1e-2  # the copies really differ
    torch.testing.assert_close(stacked, each, rtol=0, atol=2e-5)


@pytest.mark.parametrize("recipe", [dict(optimizer="sgd", steps=2), dict(optimizer="adam")])
def test_engine_measures_with_forward_copies_and_equals_the_naive_loop(
    monkeypatch: pytest.MonkeyPatch, recipe: dict
) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    task = ClassificationTask(num_classes=10)
    g = torch.Generator().manual_seed(3)
    items = task.examples(
        torch.rand(9, 1, 28, 28, generator=g), torch.randint(0, 10, (9,), generator=g)
    )
    calls = []
    original = SmallCNN.forward_copies
    monkeypatch.setattr(
        SmallCNN, "forward_copies", lambda self, p, x: calls.append(1) or original(self, p, x)
    )
    common = dict(lr=1e-2, progress=False, **recipe)
    batched = EmpiricalInfluence(task, chunk_size=4, probe_chunk_size=5, **common)
    naive = EmpiricalInfluence(task, engine="naive", **common)
    b, n = batched.score(model, items, items), naive.score(model, items, items)
    assert len(calls) == (3 + 1) * 2  # (3 chunks of copies + the untouched model) x 2 probe chunks
    assert np.abs(n.values).max() > 1e-2
    assert np.abs(b.values - n.values).max() < 1e-5
