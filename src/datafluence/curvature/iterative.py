"""Matrix-free solvers: conjugate gradient and LiSSA, on Gauss-Newton or Hessian products.

Nothing is stored but the damping: every solve runs products over the training set, so a
loaded strategy is bound again to the model and data it was fitted on. The default damping
uses a seeded Hutchinson estimate of the mean eigenvalue (16 probes), so it is close to, not
identical with, the explicit strategy's exact 0.1 × trace / P.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from datafluence.curvature.base import Curvature, FitContext, register
from datafluence.curvature.damping import Damping
from datafluence.curvature.operator import (
    CurvatureOperator,
    check_matrix,
    largest_eigenvalue,
    mean_eigenvalue,
)
from datafluence.gradients.space import Blocks


class MatrixFree(Curvature):
    """Shared by CG, LiSSA and Arnoldi: one damping for the whole matrix, flat solves."""

    block_diagonal = False

    def __init__(
        self, damping: Damping = None, matrix: str = "gn", *, damping_factor: float | None = None
    ) -> None:
        super().__init__(damping, damping_factor=damping_factor)
        if isinstance(self.damping, Mapping):
            raise ValueError(
                f"{self.name} works on the whole matrix and takes one damping number, "
                "not one per layer"
            )
        self.matrix = check_matrix(matrix)
        self.op: CurvatureOperator | None = None
        self.seed = 0

    def options(self) -> dict[str, Any]:
        return {"matrix": self.matrix}

    def _bind(self, ctx: FitContext) -> None:
        self.op = CurvatureOperator(ctx, self.matrix)
        self.seed = ctx.seed

    def _fit(self, ctx: FitContext) -> None:
        assert self.op is not None
        mean = mean_eigenvalue(self.op, seed=ctx.seed) if self.damping is None else math.nan
        self.lambdas["*"] = self.resolve_damping("*", mean)

    def _load(self, state: dict[str, Tensor]) -> None:
        self._load_lambdas(state)

    def state(self) -> dict[str, Tensor]:
        return self._lambda_state()

    def _solve(self, vectors: Blocks) -> Blocks:
        assert self.space is not None
        flat = self.space.flatten(vectors)
        return self.space.unflatten(self._solve_flat(flat.double().T).T.to(flat.dtype))

    def _solve_flat(self, b: Tensor) -> Tensor:
        """(G + λI)⁻¹ B for B [P, k] in float64."""
        raise NotImplementedError


@register
class CG(MatrixFree):
    """Conjugate gradient on all right-hand sides at once (each column its own step sizes)."""

    name = "cg"

    def __init__(
        self,
        damping: Damping = None,
        matrix: str = "gn",
        max_iter: int = 100,
        tol: float = 1e-6,
        *,
        damping_factor: float | None = None,
    ) -> None:
        super().__init__(damping, matrix, damping_factor=damping_factor)
        if max_iter < 1 or not 0 < tol < 1:
            raise ValueError("cg needs max_iter ≥ 1 and 0 < tol < 1")
        self.max_iter, self.tol = int(max_iter), float(tol)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "max_iter": self.max_iter, "tol": self.tol}

    def _solve_flat(self, b: Tensor) -> Tensor:
        assert self.op is not None
        lam = self.lambdas["*"]
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(0)
        target = self.tol * b.norm(dim=0)
        active = (rs.sqrt() > target).nonzero().flatten()
        for _ in range(self.max_iter):
            if active.numel() == 0:
                break
            pa = p[:, active]
            ap = self.op.matvec(pa) + lam * pa
            curv = (pa * ap).sum(0)
            if (curv <= 0).any():
                raise FloatingPointError(
                    "cg met a direction of non-positive curvature (an indefinite Hessian?); "
                    "increase the damping or use matrix='gn'"
                )
            alpha = rs[active] / curv
            x[:, active] += alpha * pa
            r[:, active] -= alpha * ap
            new = (r[:, active] ** 2).sum(0)
            p[:, active] = r[:, active] + (new / rs[active]) * pa
            rs[active] = new
            active = active[new.sqrt() > target[active]]
        if active.numel():
            worst = float((rs[active].sqrt() / b.norm(dim=0)[active]).max())
            warnings.warn(
                f"cg stopped after {self.max_iter} iterations with relative residual {worst:.2e} "
                f"> tol={self.tol}; raise max_iter or the damping",
                RuntimeWarning,
                stacklevel=3,
            )
        return x


@register
class LiSSA(MatrixFree):
    """Neumann series h ← b + (I − (G + λI)/s) h, result h / s (Agarwal et al. 2017).

    `scale` s must exceed (λ_max + λ)/2; by default 1.1 × (power-iteration λ_max + λ).
    `batch_size` draws a seeded mini-batch per step (None: the whole training set, a
    deterministic iteration that stops early once it has converged).
    """

    name = "lissa"

    def __init__(
        self,
        damping: Damping = None,
        matrix: str = "gn",
        depth: int = 1000,
        scale: float | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(damping, matrix)
        if (
            depth < 1
            or (scale is not None and scale <= 0)
            or (batch_size is not None and batch_size < 1)
        ):
            raise ValueError("lissa needs depth ≥ 1, scale > 0 (or None), batch_size ≥ 1 (or None)")
        self.depth, self.scale, self.batch_size = int(depth), scale, batch_size
        self.scale_used = scale

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "depth": self.depth,
            "scale": self.scale,
            "batch_size": self.batch_size,
        }

    def _fit(self, ctx: FitContext) -> None:
        super()._fit(ctx)
        if self.scale is None:
            assert self.op is not None
            self.scale_used = 1.1 * (largest_eigenvalue(self.op, seed=ctx.seed) + self.lambdas["*"])

    def state(self) -> dict[str, Tensor]:
        base = super().state()
        assert self.scale_used is not None  # set by fit or load
        return {
            **base,
            "scale": torch.tensor(float(self.scale_used), dtype=torch.float64),
        }

    def _load(self, state: dict[str, Tensor]) -> None:
        super()._load(state)
        self.scale_used = float(state["scale"])

    def _solve_flat(self, b: Tensor) -> Tensor:
        assert self.op is not None and self.scale_used is not None
        lam, s = self.lambdas["*"], float(self.scale_used)
        n = len(self.op.ctx.train)
        gen = torch.Generator().manual_seed(self.seed + 7)
        h = b.clone()
        for _ in range(self.depth):
            idx = None
            if self.batch_size is not None and self.batch_size < n:
                idx = torch.randperm(n, generator=gen)[: self.batch_size]
            new = b + h - (self.op.matvec(h, idx) + lam * h) / s
            if not torch.isfinite(new).all():
                raise FloatingPointError(
                    "lissa diverged; give a larger scale (or damping), or use matrix='gn'"
                )
            step = (new - h).norm() / new.norm().clamp(min=1e-300)
            h = new
            if idx is None and step < 1e-10:
                break
        return h / s
