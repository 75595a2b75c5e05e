"""Inner products between per-example training gradients and query-side matrices.

A query side is held per layer in the cheapest exact form: dense matrices [Q, d_out, d_in'],
factors (a [Q, S, d_in'], g [Q, S, d_out]) of raw per-example gradients, or a low rank
U Vᵀ of preconditioned ones. Training gradients arrive as factors (a, g) and are only
materialised when the dense form is the cheaper one.

Because a training gradient is Σ_t g_t a_tᵀ, every dot splits exactly into one term
g_tᵀ Q_j a_t per training token t (`layer_token_dots`), whatever form Q_j is held in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    if query.lowrank is not None and not layer.indexed:
        u, v = query.lowrank
        d_out, d_in = u.shape[1], v.shape[1]
        if a.shape[1] * (d_out + d_in) * u.shape[2] > d_out * d_in:
            # Many positions (conv layers): T per-token terms of rank r cost more than one
            # dense dot, so rebuild U Vᵀ in query blocks (the stored side stays low-rank).
            grads = layer.per_example(a, g).reshape(g.shape[0], -1)
            step = max(1, (1 << 25) // (d_out * d_in))
            return torch.cat(
                [
                    grads @ (bu @ bv.transpose(1, 2)).reshape(len(bu), -1).to(grads.dtype).T
                    for bu, bv in zip(u.split(step), v.split(step), strict=True)
                ],
                dim=1,
            )
    if query.dense is None:  # factored forms cost the same per token: sum the token terms
        return layer_token_dots(layer, a, g, query).sum(1)
    grads = layer.per_example(a, g)
    return grads.reshape(grads.shape[0], -1) @ query.dense.reshape(len(query), -1).to(grads.dtype).T


def layer_token_dots(
    layer: Layer, a: Tensor, g: Tensor, query: QueryBlock, budget: int = 1 << 25
) -> Tensor:
    """g_tᵀ Q_j a_t for every training example, token and query -> [B, T, Q].

    Summed over t this is `layer_dots`. A dense query side costs T times more this way
    (the per-example gradient is never formed), so queries go in blocks whose largest
    intermediate stays under `budget` elements.
    """
    if query.factors is not None:
        qa, qg = query.factors
        ga = torch.einsum("bto,qso->bqts", g, qg.to(g.dtype))
        return (ga * layer.input_gram(a, qa).to(g.dtype)).sum(3).transpose(1, 2)
    if query.lowrank is not None:
        u, v = query.lowrank
        gu = torch.einsum("bto,qor->btqr", g.to(u.dtype), u)
        return (gu * layer.project_inputs(a, v)).sum(3).to(g.dtype)
    assert query.dense is not None
    dense = query.dense.to(g.dtype)
    b, t, d_out = g.shape
    d_in = dense.shape[2]
    side = d_out if layer.indexed else min(d_out, d_in)
    step = max(1, budget // max(1, b * t * side))
    out = []
    for block in dense.split(step):
        if layer.indexed:  # Q_j a_t is column a_t of Q_j; padding (-1) contributes nothing
            picked = block[:, :, a.clamp(min=0)]  # [q, d_out, B, T]
            terms = torch.einsum("qobt,bto->btq", picked, g) * (a >= 0)[..., None].to(g.dtype)
        elif d_in < d_out:
            gq = torch.einsum("bto,qoi->btqi", g, block)
            terms = (gq * a.to(g.dtype)[:, :, None, :]).sum(-1)
        else:
            qa = torch.einsum("qoi,bti->btqo", block, a.to(g.dtype))
            terms = (qa * g[:, :, None, :]).sum(-1)
        out.append(terms)
    return torch.cat(out, dim=2)


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


def query_block(layer: Layer, a: Tensor, g: Tensor, projector: Any = None) -> QueryBlock:
    """Query gradients of one layer in the cheapest exact form the training side can be
    contracted with: projected (with `projector`, a RandomProjection), activation/gradient
    factors where they are smaller than the weight gradients, else dense gradients."""
    if projector is not None:
        return QueryBlock(dense=projector.project(layer.name, layer.per_example(a, g)))
    if factors_are_cheaper(layer, a.shape[1]):
        return QueryBlock(factors=(a, g))
    return QueryBlock(dense=layer.per_example(a, g))
