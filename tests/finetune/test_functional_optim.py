"""The functional optimizers against torch.optim, step by step, on the tensor layouts the
engines hand them: autograd returns transposed (non-contiguous) gradients for LoRA's B."""

from __future__ import annotations

import pytest
import torch

from datafluence.finetune import functional_optim
from datafluence.finetune.recipe import FinetuneRecipe

RECIPES = {
    "sgd-momentum-wd": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": dict(optimizer="adam", lr=0.05),
    "adam-wd": dict(optimizer="adam", lr=0.05, weight_decay=0.1),
    "adamw": dict(optimizer="adamw", lr=0.05, weight_decay=0.1, betas=(0.8, 0.99)),
}
ADAM = [name for name in RECIPES if name.startswith("adam")]


def _problem(recipe: FinetuneRecipe, contiguous_params: bool):
    """Start parameters and one set of (transposed) gradients per step."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"A": (3, 4, 6), "B": (3, 6, 4)}
    start = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    if not contiguous_params:  # a transposed parameter: the term-by-term path
        start["B"] = torch.randn(3, 4, 6, generator=gen).transpose(1, 2)
    grads = [
        {k: torch.randn(s[0], s[2], s[1], generator=gen).transpose(1, 2) for k, s in shapes.items()}
        for _ in range(recipe.steps)
    ]
    assert not grads[0]["B"].is_contiguous()
    return start, grads


def _assert_matches_torch_optim(recipe: FinetuneRecipe, contiguous_params: bool) -> None:
    start, grads = _problem(recipe, contiguous_params)
    reference = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = recipe.torch_optimizer(list(reference.values()))
    params = {k: v.clone() for k, v in start.items()}  # clone keeps the transposed layout
    state = functional_optim.init_state(recipe, params)
    for t, g in enumerate(grads, start=1):
        for k, p in reference.items():
            p.grad = g[k].clone()
        opt.step()
        functional_optim.step(recipe, params, g, state, t)
        for k, p in reference.items():
            torch.testing.assert_close(params[k], p.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("contiguous_params", [True, False])
def test_step_equals_torch_optim_on_transposed_gradients(name, contiguous_params):
    _assert_matches_torch_optim(FinetuneRecipe(steps=3, **RECIPES[name]), contiguous_params)


@pytest.mark.parametrize("name", ADAM)
def test_fused_kernel_is_used_where_torch_has_it(name, monkeypatch):
    """On CPU float32 (torch >= 2.4) the probe finds the kernel and the fused path runs."""
    if not functional_optim._fused_available(RECIPES[name]["optimizer"], "cpu", torch.float32):
        pytest.skip("this torch build has no fused CPU Adam kernel")
    calls = []
    fused = functional_optim._fused_adam
    monkeypatch.setattr(functional_optim, "_fused_adam", lambda *a: calls.append(1) or fused(*a))
    _assert_matches_torch_optim(FinetuneRecipe(steps=3, **RECIPES[name]), True)
    assert len(calls) == 3


@pytest.mark.parametrize("name", ADAM)
def test_term_by_term_fallback_where_the_fused_kernel_is_missing(name, monkeypatch):
    """A torch build without the kernel: the same numbers, from the term-by-term update."""

    def no_fused(*_args):
        raise AssertionError("the fused kernel ran although the capability check said no")

    monkeypatch.setattr(functional_optim, "_fused_available", lambda *_args: False)
    monkeypatch.setattr(functional_optim, "_fused_adam", no_fused)
    _assert_matches_torch_optim(FinetuneRecipe(steps=3, **RECIPES[name]), True)


def test_probe_rejects_a_kernel_that_fails(monkeypatch):
    """A kernel that exists but raises on this device is reported missing, not used."""

    def broken(*_args, **_kwargs):
        raise NotImplementedError("no kernel for this backend")

    monkeypatch.setattr(torch, "_fused_adam_", broken, raising=False)
    functional_optim._fused_available.cache_clear()
    try:
        assert not functional_optim._fused_available("adam", "cpu", torch.float32)
    finally:
        functional_optim._fused_available.cache_clear()


@pytest.mark.parametrize(
    ("name", "fused"),
    [(n, True) for n in RECIPES] + [(n, False) for n in ADAM],
    ids=list(RECIPES) + [f"{n}-term-by-term" for n in ADAM],
)
def test_every_step_updates_in_place_and_returns_nothing(name, fused, monkeypatch):
    """One contract on every path: params and state written in place, grads only read."""
    if not fused:
        monkeypatch.setattr(functional_optim, "_fused_available", lambda *_args: False)
    recipe = FinetuneRecipe(steps=3, **RECIPES[name])
    start, grads = _problem(recipe, contiguous_params=True)
    params = {k: v.clone() for k, v in start.items()}
    tensors = dict(params)
    state = functional_optim.init_state(recipe, params)
    buffers: dict = {}
    for t, g in enumerate(grads, start=1):
        seen = {k: v.clone() for k, v in g.items()}
        before = {k: v.clone() for k, v in params.items()}
        assert functional_optim.step(recipe, params, g, state, t) is None
        for k in params:
            assert params[k] is tensors[k]  # the same tensors, with new values
            assert not torch.equal(params[k], before[k])
            assert torch.equal(g[k], seen[k])
        now = {(s, k): buf for s, bufs in state.items() for k, buf in bufs.items()}
        assert len(now) == len(state) * len(params)
        assert all(buf is now[key] for key, buf in buffers.items())  # state kept, not replaced
        assert all(buf.data_ptr() != g[k].data_ptr() for (_, k), buf in now.items())
        buffers = now
