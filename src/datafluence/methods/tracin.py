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

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datafluence.gradients.capture import all_factors, gradient_factors
from datafluence.gradients.dots import QueryBlock, layer_dots, query_block
from datafluence.gradients.layers import Modules, modules_setting
from datafluence.gradients.projection import RandomProjection
from datafluence.gradients.space import ParamSpace
from datafluence.methods.base import SELF_COLUMN, Call, Method, Run
from datafluence.models.checkpoints import (
    Checkpoint,
    check_checkpoints,
    describe_checkpoint,
    using_checkpoint,
)
from datafluence.scores import Scores
from datafluence.store import model_fingerprint
from datafluence.tasks import Task


class TracInCP(Method):
    """Σ over checkpoints of learning rate × gradient dot product.

    `checkpoints`: state dicts or paths (None: the model's current weights, one checkpoint).
    `learning_rates`: one per checkpoint (a single number applies to all). None is allowed
    for a single checkpoint only: η = 1, with a warning that the scale is then arbitrary.
    `modules` and `projection_dim` / `projection` / `seed` as in GradientSimilarity; one
    projection serves every checkpoint.
    """

    name = "tracin"
    task: Task  # never None: the constructor takes one

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[Checkpoint] | None = None,
        learning_rates: Sequence[float] | float | None = None,
        *,
        modules: Modules = None,
        projection_dim: int | None = None,
        projection: str = "rademacher",
        seed: int = 0,
        chunk_size: int = 32,
        progress: bool = True,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size, progress=progress, seed=seed)
        self.checkpoints = check_checkpoints(checkpoints)
        if learning_rates is None:
            if len(self.checkpoints) > 1:
                raise ValueError(
                    f"{len(self.checkpoints)} checkpoints need their learning rates: give "
                    "learning_rates (one per checkpoint, or one number for all)"
                )
            warnings.warn(
                "TracInCP with one checkpoint and no learning rate uses η = 1: the ranking is "
                "the gradient dot product's, but the scale is arbitrary; give learning_rates "
                "(the training run's) for scores on the run's scale",
                UserWarning,
                stacklevel=2,
            )
            learning_rates = 1.0
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
        self.modules = modules
        self.projector = (
            None
            if projection_dim is None
            else RandomProjection(projection_dim, projection, self.seed)
        )

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
        model: nn.Module | None,
        train: Any,
        queries: Any,
        *,
        run: Run = None,
        per_layer: bool = True,
    ) -> Scores:
        """Scores [n_train, n_query] (+ parts["per_layer"], summing to the values).

        With `run`, each checkpoint's rows are saved as they finish and a re-run resumes.
        """
        call = self.begin(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None: TracIn reads the model
        values: np.ndarray | None = None
        parts: np.ndarray | None = None
        fingerprints = []
        space_names: list[str] = []
        for checkpoint, lr in zip(self.checkpoints, self.learning_rates, strict=True):
            with using_checkpoint(model, checkpoint):
                fingerprints.append(model_fingerprint(model))
                v, p, space_names = self._one(call, fingerprints[-1], per_layer)
            values = v * lr if values is None else values + v * lr
            if p is not None:
                parts = p * lr if parts is None else parts + p * lr
        assert values is not None
        return call.finish(
            values.astype(np.float32),
            call.train.ids,
            call.queries.ids,
            settings={"layers": space_names, "checkpoint_fingerprints": fingerprints},
            parts={} if parts is None else {"per_layer": parts.astype(np.float32)},
        )

    def self_score(self, model: nn.Module | None, train: Any, *, run: Run = None) -> Scores:
        """Self-influence score(i, i) for every training example: Scores [n_train, 1].

        For m = −L it is Σ_k η_k |∇L_i(θ_k)|², the learning-rate weighted squared gradient
        norms along the run: examples the run kept pushing hard on (mislabelled or atypical
        ones) score high (Pruthi et al. 2020, Section 4.1). Equals the diagonal of
        `score(model, train, train)` (projection included) without the n x n matrix.
        """
        call = self.begin(model, run, train=train)
        assert model is not None  # begin() refuses None: TracIn reads the model
        examples = call.train
        total = np.zeros((len(examples), 1))
        for checkpoint, lr in zip(self.checkpoints, self.learning_rates, strict=True):
            with using_checkpoint(model, checkpoint):
                space = self.space(model)

                def compute(lo: int, hi: int, space: ParamSpace = space) -> Tensor:
                    batch = {k: v[lo:hi] for k, v in examples.tensors.items()}
                    loss = gradient_factors(model, self.task, batch, space, "loss")
                    meas = gradient_factors(model, self.task, batch, space, "measure")
                    value = torch.zeros(hi - lo, dtype=torch.float64)
                    for layer in space.layers:
                        sides = [layer.per_example(*f[layer.name]) for f in (loss, meas)]
                        if self.projector is not None:
                            sides = [self.projector.project(layer.name, s) for s in sides]
                        dots = (sides[0] * sides[1]).flatten(1).sum(1)
                        value = value - dots.detach().double().cpu()
                    return value[:, None]

                key = {"what": "self_score", "checkpoint": model_fingerprint(model)}
                total += lr * call.table(len(examples), 1, compute, key=key).astype(np.float64)
        return call.finish(total.astype(np.float32), examples.ids, (SELF_COLUMN,))

    def _one(
        self, call: Call, checkpoint_fp: str, per_layer: bool
    ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """Unweighted dot products at the loaded checkpoint (float64)."""
        model, train, queries = call.model, call.train, call.queries
        assert model is not None
        space = self.space(model)
        cache: dict[str, dict[str, QueryBlock]] = {}

        def compute(lo: int, hi: int) -> Tensor:
            if "query" not in cache:
                factors = all_factors(model, self.task, queries, space, "measure", self.chunk_size)
                cache["query"] = {
                    n: query_block(space.by_name[n], a, g, self.projector)
                    for n, (a, g) in factors.items()
                }
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

        values, parts = call.layered(
            len(train),
            len(queries),
            len(space.layers),
            compute,
            key={"checkpoint": checkpoint_fp},
            per_layer=per_layer,
        )
        values = np.asarray(values, dtype=np.float64)
        parts = None if parts is None else np.asarray(parts, dtype=np.float64)
        return values, parts, space.names
