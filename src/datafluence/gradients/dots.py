"""Inner products between per-example training gradients and query-side matrices.

A query side is held per layer in the cheapest exact form: dense matrices [Q, d_out, d_in'],
factors (a [Q, S, d_in'], g [Q, S, d_out]) of raw per-example gradients, or a low rank
U Vᵀ of preconditioned ones. Training gradients arrive as factors (a, g) and are only
materialised when the dense form is the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from datafluence.gradients.layers import Layer


@dataclass
class QueryBlock:
    """One layer's query side: exactly one of the three forms is set."""

    dense: Tensor | None = None  # [Q, d_out, d_in']
    factors: tuple[Tensor, Tensor] | None = None  # a [Q, S, d_in'], g [Q, S, d_out]
    lowrank: tuple[Tensor, Tensor] | None = None  # U [Q, d_out, r], V [Q, d_in', r]

    def __len__(self) -> int:
        if self.dense is not None:
            return self.dense.shape[0]
        pair = self.factors if self.factors is not None else self.lowrank
        assert pair is not None
        return pair[0].shape[0]


def factors_are_cheaper(layer: Layer, tokens: int) -> bool:
    """Whether Σ_{t,s}(g_t·g'_s)(a_t·a'_s) costs less than materialising both gradients."""
    d_out, d_in = layer.shape
    per_pair_factored = tokens * tokens * (d_out + (1 if layer.indexed else d_in))
    return per_pair_factored < d_out * d_in


def layer_dots(layer: Layer, a: Tensor, g: Tensor, query: QueryBlock) -> Tensor:
    """⟨Σ_t g_t a_tᵀ, Q_j⟩ for every training example and query -> [B, Q]."""
    if query.factors is not None:
        qa, qg = query.factors
        ga = torch.einsum("bto,qso->bqts", g, qg.to(g.dtype))
        return (ga * layer.input_gram(a, qa).to(g.dtype)).sum(dim=(2, 3))
    if query.lowrank is not None:
        u, v = query.lowrank
        gu = torch.einsum("bto,qor->btqr", g.to(u.dtype), u)
        return (gu * layer.project_inputs(a, v)).sum(dim=(1, 3)).to(g.dtype)
    assert query.dense is not None
    grads = layer.per_example(a, g)
    return grads.reshape(grads.shape[0], -1) @ query.dense.reshape(len(query), -1).to(grads.dtype).T


def squared_norms(layer: Layer, a: Tensor, g: Tensor) -> Tensor:
    """||Σ_t g_t a_tᵀ||² per example [B], through factors when that is cheaper."""
    if factors_are_cheaper(layer, a.shape[1]):
        gg = torch.einsum("bto,bso->bts", g, g)
        if layer.indexed:
            aa = (a[:, :, None] == a[:, None, :]) & (a[:, :, None] >= 0)
        else:
            aa = torch.einsum("bti,bsi->bts", a, a)
        return (gg * aa.to(g.dtype)).sum(dim=(1, 2))
    return layer.per_example(a, g).pow(2).sum(dim=(1, 2))


def squared_sum(layer: Layer, a: Tensor, g: Tensor) -> Tensor:
    """Σ_i (Σ_t g_t a_tᵀ)² elementwise [d_out, d_in'], float64; with one token it is
    (g²)ᵀ(a²), so no per-example matrix is built."""
    if a.shape[1] == 1 and not layer.indexed:
        return (g[:, 0].double() ** 2).T @ (a[:, 0].double() ** 2)
    grads = layer.per_example(a, g)
    return (grads * grads).sum(0, dtype=torch.float64)


def low_rank(matrices: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r factors (U [Q, d_out, r], V [Q, d_in', r]) of each matrix, U V ᵀ ≈ M."""
    u, s, vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    r = min(rank, s.shape[-1])
    u = u[..., :r] * s[..., None, :r]
    return u.to(matrices.dtype), vh[..., :r, :].transpose(-1, -2).to(matrices.dtype)
