"""The TracIn-CP baseline for Simfluence: gradient dot products at checkpoints of a real run.

TracIn (Pruthi et al., 2020) says a step on batch c_t moves test loss z by
−lr_t Σ_{i∈c_t} ⟨∇L_i(θ_t), ∇L_z(θ_t)⟩ (first order, plain SGD). `tracin_cp` trains one
reference curriculum, takes the per-example gradients of every pool and test example at
its checkpoints (`datafluence.gradients`, module hooks), and returns the additive
`TracInCPSimulator` that rolls those dot products out on any curriculum; `save_tracin` and
`load_tracin` keep its dot products, the costly part, across interrupted experiments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from datafluence import store
from datafluence.gradients import ParamSpace, gradient_factors, resolve_layers
from datafluence.gradients.capture import all_factors, chunks
from datafluence.gradients.dots import QueryBlock, factors_are_cheaper, layer_dots
from datafluence.simfluence.evaluate import TracInCPSimulator
from datafluence.simfluence.logger import train_curriculum
from datafluence.tasks import Examples, Task


def trainable_space(
    model: nn.Module, modules: str | type | Iterable[str | type] | None = None
) -> ParamSpace:
    """The layers `modules` names, or (None) every supported layer that is being trained."""
    if modules is not None:
        return ParamSpace.of(model, modules)
    layers = [
        layer for layer in resolve_layers(model) if any(p.requires_grad for p in layer.parameters())
    ]
    if not layers:
        raise ValueError(
            "no supported layer of the model has trainable parameters; unfreeze some, or name "
            "the layers to take gradients of with modules=..."
        )
    return ParamSpace(layers)


def gradient_dots(
    model: nn.Module,
    task: Task,
    pool: Examples,
    test: Examples,
    space: ParamSpace | None = None,
    chunk_size: int = 64,
) -> np.ndarray:
    """[N, M] ⟨∇L_i, ∇L_z⟩ of the per-example training losses under `model` (eval mode).

    Layer by layer, from the hooks' factors (a, g): with one token per example (an MLP) the
    dot product of two weight gradients g aᵀ is (a·a')(g·g'), so no per-example gradient
    is ever built; with many tokens the test side is materialised when that is cheaper
    (the machinery `methods.tracin.TracInCP` uses, without its checkpoint-summing).
    """
    space = space or trainable_space(model)
    test_factors = all_factors(model, task, test, space, "loss", chunk_size)
    queries = {}
    for layer in space.layers:
        a, g = test_factors[layer.name]
        cheap = factors_are_cheaper(layer, a.shape[1])
        queries[layer.name] = (
            QueryBlock(factors=(a, g)) if cheap else QueryBlock(dense=layer.per_example(a, g))
        )
    out = np.empty((len(pool), len(test)))
    for lo, hi, batch in chunks(pool, chunk_size):
        factors = gradient_factors(model, task, batch, space)
        total = cast(
            Tensor,
            sum(
                layer_dots(layer, *factors[layer.name], queries[layer.name])
                for layer in space.layers
            ),
        )
        out[lo:hi] = total.double().numpy()
    return out


def tracin_cp(
    make_model: Callable[[], nn.Module],
    pool: Examples,
    test: Examples,
    task: Task,
    curriculum: np.ndarray,
    lr: float,
    *,
    optimizer: Literal["sgd", "adam"] = "sgd",
    seed: int = 0,
    run: int = 0,
    every: int = 1,
    modules: str | type | Iterable[str | type] | None = None,
    chunk_size: int = 64,
    progress: bool = False,
) -> TracInCPSimulator:
    """TracIn-CP from the checkpoints θ_0, θ_every, θ_2·every, ... of one reference run.

    The run is `train_curriculum(make_model, ..., curriculum, seed=seed, run=run)`, i.e.
    the same as `collect_runs`' run `run` when given its curriculum. The training loss of a
    step is the batch mean, so an SGD step moves θ by −(lr/b) Σ_i ∇L_i: the simulator's
    learning rate is lr/b. With Adam this is the usual TracIn approximation (the
    preconditioner is ignored). `modules` picks the layers whose parameters count (default:
    every supported layer with trainable parameters: for LoRA, the adapters' layers).
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    steps, b = np.shape(curriculum)
    checkpoints = list(range(0, steps, every))
    dots = np.empty((len(checkpoints), len(pool), len(test)))
    bar = tqdm(total=len(checkpoints), desc="TracIn checkpoints", disable=not progress, leave=False)
    spaces: dict[int, ParamSpace] = {}

    def take(t: int, model: nn.Module) -> None:
        if t % every:
            return
        if id(model) not in spaces:
            spaces[id(model)] = trainable_space(model, modules)
        space = spaces[id(model)]
        with torch.random.fork_rng(devices=[]):  # leave the run's own random stream alone
            dots[t // every] = gradient_dots(model, task, pool, test, space, chunk_size)
        bar.update(1)

    try:
        train_curriculum(
            make_model,
            pool,
            test,
            task,
            curriculum,
            lr,
            optimizer=optimizer,
            seed=seed,
            run=run,
            before_step=take,
        )
    finally:
        bar.close()
    return TracInCPSimulator(dots, lr / b, pool.ids, test.ids, checkpoints)


def save_tracin(sim: TracInCPSimulator, path: str | Path) -> Path:
    """Write `sim`'s dot products, learning rates and checkpoint steps to `path` (.npz).

    The ids are not stored: they belong to the pool and test set, which the caller has.
    """
    path = Path(path)
    with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, dots=sim.dots, lr=sim.lrs, checkpoint_steps=sim.checkpoint_steps)
    return path


def load_tracin(
    path: str | Path, pool_ids: Sequence[str], test_ids: Sequence[str]
) -> TracInCPSimulator:
    """The simulator `save_tracin` wrote to `path`, keyed by the given pool and test ids."""
    with np.load(path) as saved:
        lr = saved["lr"]
        lrs = float(lr) if lr.ndim == 0 else lr  # one rate, or one per step
        return TracInCPSimulator(saved["dots"], lrs, pool_ids, test_ids, saved["checkpoint_steps"])
