"""Arnoldi: the top-k eigenpairs of G from a Krylov subspace (Schioppa et al. 2022).

The basis is re-orthogonalised twice per step and restarted with a fresh random vector on
breakdown, and the eigenpairs are Rayleigh-Ritz pairs of the stored products, so with
iterations = P they are exact. The solve inverts the rank-k truncation plus damping:
(G_k + λI)⁻¹ = U diag(1/(λ_i + λ)) Uᵀ + (I − U Uᵀ)/λ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from datafluence.curvature.base import FitContext, register
from datafluence.curvature.damping import Damping
from datafluence.curvature.iterative import MatrixFree


@register
class Arnoldi(MatrixFree):
    """Top-`rank` eigenpairs (by magnitude) from `iterations` products (default 2 × rank)."""

    name = "arnoldi"

    def __init__(
        self,
        damping: Damping = None,
        matrix: str = "gn",
        rank: int = 20,
        iterations: int | None = None,
        *,
        damping_factor: float | None = None,
    ) -> None:
        super().__init__(damping, matrix, damping_factor=damping_factor)
        if rank < 1 or (iterations is not None and iterations < rank):
            raise ValueError("arnoldi needs rank ≥ 1 and iterations ≥ rank")
        self.rank, self.iterations = int(rank), iterations
        self.values: Tensor | None = None
        self.vectors: Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "rank": self.rank, "iterations": self.iterations}

    def _fit(self, ctx: FitContext) -> None:
        super()._fit(ctx)
        assert self.op is not None
        p = ctx.space.dim
        n = min(p, self.iterations or 2 * self.rank)
        device = ctx.space.parameters()[0].device
        gen = torch.Generator().manual_seed(ctx.seed + 3)

        def fresh(basis: Tensor) -> Tensor | None:
            for _ in range(3):
                w = torch.randn(p, generator=gen, dtype=torch.float64).to(device)
                for _ in range(2):
                    w -= basis @ (basis.T @ w)
                if w.norm() > 1e-8:
                    return w / w.norm()
            return None

        q = torch.zeros(p, n, dtype=torch.float64, device=device)
        gq = torch.zeros_like(q)
        v = fresh(q[:, :0])
        m = 0
        while m < n and v is not None:
            q[:, m] = v
            gq[:, m] = self.op.matvec(v[:, None])[:, 0]
            m += 1
            w = gq[:, m - 1].clone()
            for _ in range(2):
                w -= q[:, :m] @ (q[:, :m].T @ w)
            scale = gq[:, :m].norm() / m**0.5
            v = w / w.norm() if w.norm() > 1e-10 * max(float(scale), 1e-300) else fresh(q[:, :m])
        basis, products = q[:, :m], gq[:, :m]
        t = basis.T @ products
        if not torch.isfinite(t).all():
            raise FloatingPointError("arnoldi met NaN/Inf curvature products; check the model")
        vals, vecs = torch.linalg.eigh((t + t.T) / 2)
        top = vals.abs().argsort(descending=True)[: self.rank]
        self.values, self.vectors = vals[top], basis @ vecs[:, top]

    def state(self) -> dict[str, Tensor]:
        assert self.values is not None and self.vectors is not None
        return {**super().state(), "values": self.values, "vectors": self.vectors}

    def _load(self, state: dict[str, Tensor]) -> None:
        super()._load(state)
        self.values, self.vectors = state["values"], state["vectors"]

    def _solve_flat(self, b: Tensor) -> Tensor:
        assert self.values is not None and self.vectors is not None
        lam = self.lambdas["*"]
        u = self.vectors.to(b.device)
        coef = u.T @ b
        return u @ (coef / (self.values.to(b.device)[:, None] + lam)) + (b - u @ coef) / lam
