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


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("contiguous_params", [True, False])
def test_step_equals_torch_optim_on_transposed_gradients(name, contiguous_params):
    recipe = FinetuneRecipe(steps=3, **RECIPES[name])
    gen = torch.Generator().manual_seed(0)
    shapes = {"A": (3, 4, 6), "B": (3, 6, 4)}
    start = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    if not contiguous_params:  # a transposed parameter: the pure (unfused) path
        start["B"] = torch.randn(3, 4, 6, generator=gen).transpose(1, 2)
    grads = [
        {k: torch.randn(s[0], s[2], s[1], generator=gen).transpose(1, 2) for k, s in shapes.items()}
        for _ in range(recipe.steps)
    ]
    assert not grads[0]["B"].is_contiguous()
    reference = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = recipe.torch_optimizer(list(reference.values()))
    params = {k: v.clone() if contiguous_params else v for k, v in start.items()}
    state = functional_optim.init_state(recipe, params)
    for t, g in enumerate(grads, start=1):
        for k, p in reference.items():
            p.grad = g[k].clone()
        opt.step()
        params = functional_optim.step(recipe, params, g, state, t)
        for k, p in reference.items():
            torch.testing.assert_close(params[k], p.detach(), rtol=0, atol=1e-6)
