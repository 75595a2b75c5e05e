"""The identity (plain gradient dot products) and the diagonal of the Gauss-Newton."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from datafluence.curvature.base import Curvature, FitContext, register
from datafluence.curvature.damping import Damping
from datafluence.curvature.fisher import check_fisher, fisher_factors
from datafluence.gradients.dots import squared_sum
from datafluence.gradients.space import Blocks


@register
class Identity(Curvature):
    """G + λI replaced by I: influence becomes the gradient dot product."""

    name = "identity"

    def __init__(self, damping: Damping = None, *, damping_factor: float | None = None) -> None:
        if damping is not None or damping_factor is not None:
            raise ValueError(
                "the identity curvature takes no damping; leave damping and damping_factor unset"
            )
        super().__init__(None)

    def _fit(self, ctx: FitContext) -> None:
        pass

    def _solve(self, vectors: Blocks) -> Blocks:
        return dict(vectors)


@register
class Diagonal(Curvature):
    """diag(G) + λ per parameter, from per-example gradients (Fisher estimate chosen by
    `fisher`: "sample", "exact", "empirical")."""

    name = "diagonal"

    def __init__(
        self,
        damping: Damping = None,
        fisher: str = "sample",
        *,
        damping_factor: float | None = None,
    ) -> None:
        super().__init__(damping, damping_factor=damping_factor)
        self.fisher = check_fisher(fisher)
        self.diag: dict[str, Tensor] = {}

    def options(self) -> dict[str, Any]:
        return {"fisher": self.fisher}

    def _fit(self, ctx: FitContext) -> None:
        sums = {
            layer.name: torch.zeros(layer.shape, dtype=torch.float64) for layer in ctx.space.layers
        }
        for _, _, factors in fisher_factors(ctx, self.fisher):
            for name, (a, g) in factors.items():
                sums[name] = sums[name].to(g.device) + squared_sum(ctx.space.by_name[name], a, g)
        n = len(ctx.train)
        self.diag = {name: s / n for name, s in sums.items()}
        self._set_lambdas()

    def _set_lambdas(self) -> None:
        for name, d in self.diag.items():
            if not torch.isfinite(d).all():
                raise FloatingPointError(
                    f"the diagonal curvature of {name!r} has NaN/Inf entries; some training "
                    "gradients are not finite - check the model and the data"
                )
            self.lambdas[name] = self.resolve_damping(name, float(d.mean()))

    def _solve(self, vectors: Blocks) -> Blocks:
        return {
            name: (v.double() / (self.diag[name].to(v.device) + self.lambdas[name])).to(v.dtype)
            for name, v in vectors.items()
        }

    def state(self) -> dict[str, Tensor]:
        return {**{f"diag/{k}": v for k, v in self.diag.items()}, **self._lambda_state()}

    def _load(self, state: dict[str, Tensor]) -> None:
        self.diag = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("diag/")}
        self._set_lambdas()
