"""The TracIn-CP baseline for Simfluence: gradient dot products at checkpoints of a real run.

TracIn (Pruthi et al., 2020) says a step on batch c_t moves test loss z by
−lr_t Σ_{i∈c_t} ⟨∇L_i(θ_t), ∇L_z(θ_t)⟩ (first order, plain SGD). `tracin_cp` trains one
reference curriculum, takes the per-example gradients of every pool and test example at
its checkpoints (`datafluence.gradients`, module hooks), and returns the additive
`TracInCPSimulator` that rolls those dot products out on any curriculum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from datafluence.gradients import ParamSpace, per_example_gradients, resolve_layers
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
    """[N, M] ⟨∇L_i, ∇L_z⟩ of the per-example training losses under `model` (eval mode)."""
    space = space or trainable_space(model)
    test_grads = space.flatten(per_example_gradients(model, task, test, space, "loss", chunk_size))
    out = np.empty((len(pool), len(test)))
    for lo in range(0, len(pool), chunk_size):
        hi = min(lo + chunk_size, len(pool))
        grads = space.flatten(per_example_gradients(model, task, pool[lo:hi], space, "loss"))
        out[lo:hi] = (grads @ test_grads.T).double().numpy()
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
