"""TracIn-CP (Pruthi et al. 2020): gradient dot products summed over training checkpoints.

score(i, j) = Σ_k η_k ∇m_j(θ_k)ᵀ (−∇L_i(θ_k))

with η_k the learning rate in force around checkpoint k, m_j the query's measurement and L_i
the training example's loss (for m = −L: Σ_k η_k ∇L_j·∇L_i). Positive: the gradient steps
taken on i along the run raised j's measurement. With one checkpoint and η = 1 it is the
gradient dot product (`GradientSimilarity(kind="dot")`), layer split included.

Checkpoints are state dicts or paths (.safetensors, or anything torch.load reads with
weights_only=True, optionally wrapping the state dict under "state_dict" / "model" /
"model_state_dict"). Each is loaded into `model` in turn (paths lazily, one at a time) and
the model's own weights are put back afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datafluence import store
from datafluence.gradients.capture import all_factors, check_devices, chunks, gradient_factors
from datafluence.gradients.dots import QueryBlock, factors_are_cheaper, layer_dots
from datafluence.gradients.layers import Modules, modules_setting
from datafluence.gradients.projection import RandomProjection
from datafluence.gradients.rows import assemble
from datafluence.gradients.space import ParamSpace
from datafluence.models.checkpoints import (
    Checkpoint,
    check_checkpoints,
    describe_checkpoint,
    using_checkpoint,
)
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import Examples, Task


class TracInCP:
    """Σ over checkpoints of learning rate × gradient dot product.

    `checkpoints`: state dicts or paths (None: the model's current weights, one checkpoint).
    `learning_rates`: one per checkpoint (a single number applies to all). `modules` and
    `projection_dim` / `projection` / `seed` as in GradientSimilarity; one projection
    serves every checkpoint.
    """

    name = "tracin"

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[Checkpoint] | None,
        learning_rates: Sequence[float] | float,
        modules: Modules = None,
        projection_dim: int | None = None,
        *,
        projection: str = "rademacher",
        seed: int = 0,
        chunk_size: int = 32,
        progress: bool = False,
    ) -> None:
        self.checkpoints = check_checkpoints(checkpoints)
        if isinstance(learning_rates, int | float):
            learning_rates = [float(learning_rates)] * len(self.checkpoints)
        self.learning_rates = [float(lr) for lr in learning_rates]
        if len(self.learning_rates) != len(self.checkpoints):
            raise ValueError(
                f"{len(self.learning_rates)} learning rates given for {len(self.checkpoints)} "
                "checkpoints; give one per checkpoint"
            )
        if not all(np.isfinite(self.learning_rates)):
            raise ValueError(f"learning rates must be finite, got {self.learning_rates}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        self.task = task
        self.modules = modules
        self.projector = (
            None if projection_dim is None else RandomProjection(projection_dim, projection, seed)
        )
        self.chunk_size = chunk_size
        self.progress = progress

    def settings(self) -> dict[str, Any]:
        return {
            "checkpoints": [describe_checkpoint(c) for c in self.checkpoints],
            "learning_rates": self.learning_rates,
            "modules": modules_setting(self.modules),
            "projection": None if self.projector is None else self.projector.settings(),
            **self.task.settings(),
        }

    def score(
        self,
        model: nn.Module,
        train: Examples,
        queries: Examples,
        run: RunDir | str | Path | None = None,
        per_layer: bool = True,
    ) -> Scores:
        """Scores [n_train, n_query] (+ parts["per_layer"], summing to the values).

        With `run`, each checkpoint's rows are saved as they finish and a re-run resumes.
        """
        start = time.perf_counter()
        check_devices(model, [("train", train), ("queries", queries)])
        self.task.check(train, "training")
        self.task.check(queries, "query")
        run = RunDir(run) if isinstance(run, str | Path) else run
        values: np.ndarray | None = None
        parts: np.ndarray | None = None
        fingerprints = []
        space_names: list[str] = []
        for k, (checkpoint, lr) in enumerate(
            zip(self.checkpoints, self.learning_rates, strict=True)
        ):
            with using_checkpoint(model, checkpoint):
                if k == 0:
                    self.task.check_model(model, train, "training")
                    self.task.check_model(model, queries, "query")
                fingerprints.append(store.model_fingerprint(model))
                v, p, space_names = self._one(model, train, queries, run, per_layer)
            values = v * lr if values is None else values + v * lr
            if p is not None:
                parts = p * lr if parts is None else parts + p * lr
        assert values is not None
        settings = {
            **self.settings(),
            "layers": space_names,
            "checkpoint_fingerprints": fingerprints,
            "seconds": round(time.perf_counter() - start, 3),
        }
        return Scores(
            values.astype(np.float32),
            train.ids,
            queries.ids,
            method=self.name,
            settings=settings,
            parts={} if parts is None else {"per_layer": parts.astype(np.float32)},
        )

    def self_score(self, model: nn.Module, train: Examples) -> np.ndarray:
        """Self-influence score(i, i) for every training example, float32 [n_train].

        For m = −L it is Σ_k η_k |∇L_i(θ_k)|², the learning-rate weighted squared gradient
        norms along the run: examples the run kept pushing hard on (mislabelled or atypical
        ones) score high (Pruthi et al. 2020, Section 4.1). Equals the diagonal of
        `score(model, train, train)` (projection included) without the n x n matrix.
        """
        check_devices(model, [("train", train)])
        self.task.check(train, "training")
        total = np.zeros(len(train))
        for k, (checkpoint, lr) in enumerate(
            zip(self.checkpoints, self.learning_rates, strict=True)
        ):
            with using_checkpoint(model, checkpoint):
                if k == 0:
                    self.task.check_model(model, train, "training")
                space = ParamSpace.of(model, self.modules)
                out = []
                for _, _, batch in chunks(train, self.chunk_size):
                    loss = gradient_factors(model, self.task, batch, space, "loss")
                    meas = gradient_factors(model, self.task, batch, space, "measure")
                    value = torch.zeros(len(next(iter(batch.values()))), dtype=torch.float64)
                    for layer in space.layers:
                        sides = [layer.per_example(*f[layer.name]) for f in (loss, meas)]
                        if self.projector is not None:
                            sides = [self.projector.project(layer.name, s) for s in sides]
                        dots = (sides[0] * sides[1]).flatten(1).sum(1)
                        value = value - dots.detach().double().cpu()
                    out.append(value)
            total += lr * torch.cat(out).numpy()
        return total.astype(np.float32)

    def _one(
        self,
        model: nn.Module,
        train: Examples,
        queries: Examples,
        run: RunDir | None,
        per_layer: bool,
    ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """Unweighted dot products at the loaded checkpoint (float64)."""
        space = ParamSpace.of(model, self.modules)
        cache: dict[str, dict[str, QueryBlock]] = {}

        def compute(lo: int, hi: int) -> Tensor:
            if "query" not in cache:
                factors = all_factors(model, self.task, queries, space, "measure", self.chunk_size)
                cache["query"] = {n: self._query_block(space, n, f) for n, f in factors.items()}
            query = cache["query"]
            batch = {key: v[lo:hi] for key, v in train.tensors.items()}
            factors = gradient_factors(model, self.task, batch, space, "loss")
            out = []
            for layer in space.layers:
                a, g = factors[layer.name]
                if self.projector is None:
                    out.append(layer_dots(layer, a, g, query[layer.name]))
                else:
                    projected = self.projector.project(layer.name, layer.per_example(a, g))
                    out.append(projected @ query[layer.name].dense.T)  # type: ignore[union-attr]
            return -torch.stack(out, dim=1)

        values, parts = assemble(
            train,
            queries,
            len(space.layers),
            self.chunk_size,
            compute,
            method="tracin",
            key={
                "settings": {**self.settings(), "checkpoints": None, "learning_rates": None},
                "model": store.model_fingerprint(model),
            },
            run=run,
            per_layer=per_layer,
            progress=self.progress,
        )
        values = np.asarray(values, dtype=np.float64)
        parts = None if parts is None else np.asarray(parts, dtype=np.float64)
        return values, parts, space.names

    def _query_block(self, space: ParamSpace, name: str, pair: tuple[Tensor, Tensor]) -> QueryBlock:
        layer = space.by_name[name]
        a, g = pair
        if self.projector is not None:
            return QueryBlock(dense=self.projector.project(name, layer.per_example(a, g)))
        if factors_are_cheaper(layer, a.shape[1]):
            return QueryBlock(factors=(a, g))
        return QueryBlock(dense=layer.per_example(a, g))
