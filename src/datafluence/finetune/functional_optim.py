"""SGD and Adam(W) as pure functions on (stacked) parameter dicts.

They follow torch.optim's update rules term by term so that N copies trained at once equal
N copies trained one by one with the stock optimizers.
"""

from __future__ import annotations

import math

from torch import Tensor

from datafluence.finetune.recipe import FinetuneRecipe

Params = dict[str, Tensor]


def init_state(recipe: FinetuneRecipe, params: Params) -> dict[str, Params]:
    if recipe.optimizer == "sgd":
        return {"momentum": {}} if recipe.momentum else {}
    return {
        "m": {n: p.new_zeros(p.shape) for n, p in params.items()},
        "v": {n: p.new_zeros(p.shape) for n, p in params.items()},
    }


def step(
    recipe: FinetuneRecipe, params: Params, grads: Params, state: dict[str, Params], t: int
) -> Params:
    """One update at step t (1-based); returns new params, updates `state` in place."""
    if recipe.optimizer == "sgd":
        return _sgd(recipe, params, grads, state)
    return _adam(recipe, params, grads, state, t)


def _sgd(recipe: FinetuneRecipe, params: Params, grads: Params, state: dict[str, Params]) -> Params:
    out = {}
    for name, p in params.items():
        d = grads[name]
        if recipe.weight_decay:
            d = d + recipe.weight_decay * p
        if recipe.momentum:
            buf = state["momentum"].get(name)
            buf = d.clone() if buf is None else buf * recipe.momentum + d
            state["momentum"][name] = buf
            d = buf
        out[name] = p - recipe.lr * d
    return out


def _adam(
    recipe: FinetuneRecipe, params: Params, grads: Params, state: dict[str, Params], t: int
) -> Params:
    beta1, beta2 = recipe.betas
    bias1 = 1 - beta1**t
    bias2_sqrt = math.sqrt(1 - beta2**t)
    out = {}
    for name, p in params.items():
        g = grads[name]
        if recipe.weight_decay and recipe.optimizer == "adam":
            g = g + recipe.weight_decay * p
        if recipe.weight_decay and recipe.optimizer == "adamw":
            p = p * (1 - recipe.lr * recipe.weight_decay)
        m = state["m"][name].lerp(g, 1 - beta1)
        v = state["v"][name] * beta2 + (1 - beta2) * g * g
        state["m"][name], state["v"][name] = m, v
        denom = v.sqrt() / bias2_sqrt + recipe.eps
        out[name] = p - (recipe.lr / bias1) * m / denom
    return out
