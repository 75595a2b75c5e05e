"""The exact damped Gauss-Newton or Hessian as a dense matrix, solved directly (small models).

The reference every other strategy is checked against. The GN is built from exact
output-Hessian roots (fisher="exact" passes: Σ over passes of per-example gradient outer
products), independently of the matrix-free products used by CG, LiSSA and Arnoldi; the
Hessian from Hessian-vector products with the unit vectors. `blocks="layer"` keeps only the
per-layer diagonal blocks (block-diagonal, so per-layer scores are separate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from datafluence.curvature.base import Curvature, FitContext, register
from datafluence.curvature.damping import Damping
from datafluence.curvature.fisher import fisher_factors
from datafluence.curvature.operator import CurvatureOperator, check_matrix
from datafluence.gradients.space import Blocks

MAX_DIM = 20_000
BLOCKS = ("full", "layer")


def dense_solver(matrix: Tensor, damping: float):
    """x ↦ (M + λI)⁻¹ x in float64: Cholesky when positive definite, LU otherwise."""
    damped = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return lambda x: torch.cholesky_solve(x.double(), chol)
    lu, pivots, info = torch.linalg.lu_factor_ex(damped)
    if int(info) != 0:
        raise FloatingPointError("the damped curvature matrix is singular; increase the damping")
    return lambda x: torch.linalg.lu_solve(lu, pivots, x.double())


@register
class Explicit(Curvature):
    """Dense (G + λI) solved exactly; `matrix` = "gn" or "hessian"."""

    name = "explicit"
    block_diagonal = False

    def __init__(
        self,
        damping: Damping = None,
        matrix: str = "gn",
        blocks: str = "full",
        *,
        damping_factor: float | None = None,
    ) -> None:
        super().__init__(damping, damping_factor=damping_factor)
        self.matrix = check_matrix(matrix)
        if blocks not in BLOCKS:
            raise ValueError(f"unknown blocks {blocks!r}; choose one of {BLOCKS}")
        if blocks == "full" and isinstance(self.damping, Mapping):
            raise ValueError(
                "per-layer damping needs a block-diagonal curvature; use blocks='layer' or "
                "give one number"
            )
        self.blocks = blocks
        self.block_diagonal = blocks == "layer"  # type: ignore[misc]
        self.dense: Tensor | None = None
        self._solvers: dict[str, Any] = {}

    def options(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "blocks": self.blocks}

    def _fit(self, ctx: FitContext) -> None:
        p = ctx.space.dim
        if p > MAX_DIM:
            raise ValueError(
                f"the explicit curvature needs a {p} x {p} matrix; select fewer modules or use "
                "cg, lissa, arnoldi, kfac or ekfac"
            )
        device = ctx.space.parameters()[0].device
        if self.matrix == "hessian":
            eye = torch.eye(p, dtype=torch.float64, device=device)
            dense = CurvatureOperator(ctx, "hessian").matvec(eye)
        else:
            dense = torch.zeros(p, p, dtype=torch.float64, device=device)
            for _, _, factors in fisher_factors(ctx, "exact"):
                grads = ctx.space.flatten(
                    {n: ctx.space.by_name[n].per_example(a, g) for n, (a, g) in factors.items()}
                ).double()
                dense += grads.T @ grads
            dense /= len(ctx.train)
        self.dense = (dense + dense.T) / 2
        self._prepare()

    def _ranges(self) -> dict[str, slice]:
        assert self.space is not None
        if self.blocks == "full":
            return {"*": slice(0, self.space.dim)}
        out, lo = {}, 0
        for name, size in zip(self.space.names, self.space.sizes, strict=True):
            out[name] = slice(lo, lo + size)
            lo += size
        return out

    def _prepare(self) -> None:
        assert self.dense is not None
        if not torch.isfinite(self.dense).all():
            raise FloatingPointError(
                "the curvature matrix contains NaN/Inf; some training gradients are not finite"
            )
        self._solvers = {}
        for name, sl in self._ranges().items():
            block = self.dense[sl, sl]
            self.lambdas[name] = self.resolve_damping(name, float(block.diagonal().mean()))
            self._solvers[name] = dense_solver(block, self.lambdas[name])

    def _solve(self, vectors: Blocks) -> Blocks:
        assert self.space is not None
        flat = self.space.flatten(vectors)
        out = torch.empty_like(flat, dtype=torch.float64)
        for name, sl in self._ranges().items():
            out[:, sl] = self._solvers[name](flat[:, sl].T).T
        return self.space.unflatten(out.to(flat.dtype))

    def state(self) -> dict[str, Tensor]:
        assert self.dense is not None
        return {"matrix": self.dense, **self._lambda_state()}

    def _load(self, state: dict[str, Tensor]) -> None:
        self.dense = state["matrix"]
        self._prepare()
