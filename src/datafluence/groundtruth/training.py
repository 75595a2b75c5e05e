"""Retraining small models from scratch: the default `train_fn` of the ground truths.

A ground truth retrains many times, so a trainer is a plain callable

    train_fn(model_factory, train_subset, seed) -> trained model (eval mode)

and anything with that signature can be used. `Trainer` is the default: full-batch L-BFGS
(deterministic, converges to a minimum: the right choice for convex or small models, where
retraining differences must not drown in optimiser noise) or seeded minibatch Adam / SGD.
The seed fixes the initialisation (torch's global generator is seeded while the factory
runs, inside a forked RNG state, so the caller's state is untouched) and the minibatch order.
A factory that sets its own initial weights gives a fixed initialisation for every seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from datafluence.tasks import Examples, Task, eval_mode

ModelFactory = Callable[[], nn.Module]
TrainFn = Callable[[ModelFactory, Examples, int], nn.Module]
OPTIMIZERS = ("lbfgs", "adam", "sgd")


def init_model(model_factory: ModelFactory, seed: int) -> nn.Module:
    """model_factory() with torch's global generator seeded by `seed` (restored after)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory must return an nn.Module, got {type(model).__name__}")
    return model


@dataclass(frozen=True, eq=False)
class Trainer:
    """Train a fresh model on a set of examples: minimise mean_k L_k + (l2/2) ‖θ‖².

    `optimizer`: "lbfgs" (full batch, strong-Wolfe line search, up to `max_iter` iterations,
    stops when the largest gradient entry is ≤ `tol`), "adam" or "sgd" (`epochs` passes of
    shuffled minibatches of `batch_size`, None = full batch, learning rate `lr`). The loss is
    the task's per-example loss averaged over the subset; the L2 term covers every trainable
    parameter. Training runs in eval mode (dropout off, BatchNorm frozen), as every other
    forward pass in the package does.
    """

    task: Task
    optimizer: Literal["lbfgs", "adam", "sgd"] = "lbfgs"
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int | None = None
    l2: float = 0.0
    max_iter: int = 1000
    tol: float = 1e-9

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.epochs < 1 or self.max_iter < 1:
            raise ValueError("epochs and max_iter must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (or None), got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.l2 >= 0 and math.isfinite(self.l2)):
            raise ValueError(f"l2 must be a non-negative number, got {self.l2}")
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")

    def settings(self) -> dict[str, Any]:
        """What changes the numbers, JSON-able (saved with every ground truth)."""
        out: dict[str, Any] = {"trainer": "Trainer", "optimizer": self.optimizer, "l2": self.l2}
        if self.optimizer == "lbfgs":
            out.update(max_iter=self.max_iter, tol=self.tol)
        else:
            out.update(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)
        return {**out, **self.task.settings()}

    def __call__(self, model_factory: ModelFactory, train: Examples, seed: int) -> nn.Module:
        self.task.check(train, "training")
        model = init_model(model_factory, seed)
        params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        with eval_mode(model):
            if self.optimizer == "lbfgs":
                self._lbfgs(model, params, train)
            else:
                self._minibatch(model, params, train, seed)
        return model.eval()

    def objective(self, model: nn.Module, params: list[Tensor], batch: dict[str, Tensor]) -> Tensor:
        value = self.task.loss(model, batch).mean()
        if self.l2:
            value = value + 0.5 * self.l2 * sum((p * p).sum() for p in params)
        return value

    def _lbfgs(self, model: nn.Module, params: list[Tensor], train: Examples) -> None:
        batch = dict(train.tensors)
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.max_iter,
            max_eval=2 * self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=1e-14,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            value = self.objective(model, params, batch)
            if not torch.isfinite(value):
                raise FloatingPointError("the training loss became non-finite during retraining")
            value.backward()
            return value

        opt.step(closure)

    def _minibatch(
        self, model: nn.Module, params: list[Tensor], train: Examples, seed: int
    ) -> None:
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            opt = torch.optim.SGD(params, lr=self.lr)
        n = len(train)
        size = n if self.batch_size is None else min(self.batch_size, n)
        gen = torch.Generator().manual_seed(int(seed) + 7919)
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen) if size < n else torch.arange(n)
            for lo in range(0, n, size):
                idx = order[lo : lo + size].to(next(iter(train.tensors.values())).device)
                batch = {k: v[idx] for k, v in train.tensors.items()}
                opt.zero_grad(set_to_none=True)
                value = self.objective(model, params, batch)
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        "the training loss became non-finite during retraining; lower lr"
                    )
                value.backward()
                opt.step()


@torch.no_grad()
def measure_all(model: nn.Module, task: Task, examples: Examples, chunk: int = 1024) -> Tensor:
    """Every example's measurement under `model` (eval mode), float64 [n]."""
    with eval_mode(model):
        return torch.cat(
            [
                task.measure(model, {k: v[lo : lo + chunk] for k, v in examples.tensors.items()})
                .detach()
                .double()
                .cpu()
                for lo in range(0, len(examples), chunk)
            ]
        )


def retrain_and_measure(
    train_fn: TrainFn,
    model_factory: ModelFactory,
    train: Examples,
    seed: int,
    task: Task,
    queries: Examples,
) -> Tensor:
    """Train a fresh model on `train` with `seed`, then measure every query (float64 [Q])."""
    model = train_fn(model_factory, train, int(seed))
    if not isinstance(model, nn.Module):
        raise TypeError(f"train_fn must return the trained nn.Module, got {type(model).__name__}")
    values = measure_all(model, task, queries)
    if not torch.isfinite(values).all():
        raise FloatingPointError(
            f"a model retrained with seed {seed} on {len(train)} examples gives non-finite "
            "query measurements; check the trainer's settings"
        )
    return values


def describe_train_fn(train_fn: TrainFn) -> Any:
    """What identifies a trainer in saved settings: its settings() when it has them."""
    settings = getattr(train_fn, "settings", None)
    if callable(settings):
        return settings()
    name = getattr(train_fn, "__qualname__", type(train_fn).__qualname__)
    module = getattr(train_fn, "__module__", type(train_fn).__module__)
    return {"train_fn": f"{module}.{name}"}


def init_fingerprints(model_factory: ModelFactory, seeds: tuple[int, ...]) -> list[str]:
    """A hash of the initial weights per seed: a changed architecture or init is noticed."""
    from datafluence.store import model_fingerprint

    return [model_fingerprint(init_model(model_factory, s)) for s in seeds]


def check_seeds(seeds: Any) -> tuple[int, ...]:
    """Seeds as a non-empty tuple of distinct ints."""
    if isinstance(seeds, int):
        seeds = (seeds,)
    out = tuple(int(s) for s in seeds)
    if not out:
        raise ValueError("seeds is empty; give at least one seed")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct, got {out}")
    return out
