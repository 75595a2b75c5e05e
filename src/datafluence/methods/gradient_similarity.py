"""Gradient similarity baselines: dot product and cosine of per-example gradients.

score(i, j) = ∇m_j · (−∇L_i): positive when a gradient step on training example i raises
query j's measurement (for m = −L: ∇L_j · ∇L_i). "cosine" divides by both norms. Both are
the identity-curvature influence, so they share its sign and its per-layer split.
Without projection, Linear-like layers are contracted from activation and output-gradient
factors when that is cheaper than building per-example weight gradients.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from datafluence.gradients.capture import Factors, all_factors, gradient_factors
from datafluence.gradients.dots import (
    QueryBlock,
    layer_dots,
    query_block,
    squared_norms,
)
from datafluence.gradients.layers import Modules, modules_setting
from datafluence.gradients.projection import RandomProjection
from datafluence.gradients.space import ParamSpace
from datafluence.methods.base import Method, Run
from datafluence.scores import Scores
from datafluence.tasks import Task

KINDS = ("dot", "cosine")


class GradientSimilarity(Method):
    """Dot product or cosine of training-loss and query-measurement gradients.

    `modules`: names, globs or types of the layers to use (None: every Linear, Conv2d and
    GPT-2 Conv1D layer with weights of its own; embeddings only when named).
    `projection_dim`: project each layer's gradients to this many dimensions with a random
    matrix drawn from `seed` (`projection`: "rademacher" or "gaussian") before comparing them.
    """

    name = "gradient_similarity"
    task: Task  # never None: the constructor takes one

    def __init__(
        self,
        task: Task,
        kind: str = "dot",
        *,
        modules: Modules = None,
        projection_dim: int | None = None,
        projection: str = "rademacher",
        seed: int = 0,
        chunk_size: int = 32,
        progress: bool = True,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size, progress=progress, seed=seed)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        self.kind = kind
        self.modules = modules
        self.projector = (
            None
            if projection_dim is None
            else RandomProjection(projection_dim, projection, self.seed)
        )

    def settings(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
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
        """Scores [n_train, n_query] (+ parts["per_layer"], which sum to the values)."""
        call = self.begin(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None: gradients need the model
        train, queries = call.train, call.queries
        space = self.space(model)
        factors = all_factors(model, self.task, queries, space, "measure", self.chunk_size)
        query = {
            n: query_block(space.by_name[n], a, g, self.projector) for n, (a, g) in factors.items()
        }
        query_norms = self._norms(space, factors, query) if self.kind == "cosine" else None

        def compute(lo: int, hi: int) -> Tensor:
            batch = {k: v[lo:hi] for k, v in train.tensors.items()}
            train_factors = gradient_factors(model, self.task, batch, space, "loss")
            parts, projected = [], {}
            for layer in space.layers:
                a, g = train_factors[layer.name]
                if self.projector is None:
                    parts.append(layer_dots(layer, a, g, query[layer.name]))
                else:
                    projected[layer.name] = self.projector.project(
                        layer.name, layer.per_example(a, g)
                    )
                    parts.append(projected[layer.name] @ query[layer.name].dense.T)  # type: ignore[union-attr]
            dots = -torch.stack(parts, dim=1)  # [B, L, Q]
            if query_norms is None:
                return dots
            if self.projector is None:
                sq = sum(squared_norms(layer, *train_factors[layer.name]) for layer in space.layers)
            else:
                sq = sum(p.pow(2).sum(1) for p in projected.values())
            denom = sq.sqrt()[:, None, None] * query_norms[None, None, :]  # type: ignore[union-attr]
            return torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(dots))

        values, parts = call.layered(
            len(train), len(queries), len(space.layers), compute, key={}, per_layer=per_layer
        )
        return call.finish(
            values,
            train.ids,
            queries.ids,
            method=f"gradient_{self.kind}",
            settings={"layers": space.names},
            parts={} if parts is None else {"per_layer": parts},
        )

    def _norms(self, space: ParamSpace, factors: Factors, query: dict[str, QueryBlock]) -> Tensor:
        """Each query gradient's norm (of its projection, when projecting)."""
        if self.projector is not None:
            # projected queries are dense
            squares = (cast(Tensor, q.dense).pow(2).sum(1) for q in query.values())
            return cast(Tensor, sum(squares)).sqrt()
        return cast(
            Tensor, sum(squared_norms(space.by_name[n], a, g) for n, (a, g) in factors.items())
        ).sqrt()
