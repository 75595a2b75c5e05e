"""K-FAC and EK-FAC: per-layer Kronecker-factored Gauss-Newton blocks.

For a layer y_t = M a_t, G_l ≈ S ⊗ A (row-major vec of M) with
  A = mean over all tokens of a_t a_tᵀ,  S = mean over examples of Σ_t E_y[g_t g_tᵀ],
tokens treated as independent, so the scale matches G = mean_i J_iᵀ H_i J_i. Both factors
are accumulated and eigendecomposed in float64. K-FAC's eigenvalues in the Kronecker
eigenbasis are λ_S ⊗ λ_A; EK-FAC replaces them by the mean squared projection of the true
per-example gradients (summed over tokens) onto that basis (George et al. 2018). Embedding
inputs are one-hot, so their A is diagonal and kept as a vector.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from datafluence.curvature.base import Curvature, FitContext, register
from datafluence.curvature.damping import Damping
from datafluence.curvature.fisher import check_fisher, fisher_factors
from datafluence.gradients.dots import squared_sum
from datafluence.gradients.layers import Layer, gram64
from datafluence.gradients.space import Blocks


def _eigh(matrix: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition in float64 with a clear error for broken statistics."""
    matrix = matrix.double()
    if not torch.isfinite(matrix).all():
        raise FloatingPointError(
            f"the {what} contains NaN/Inf; some training examples give non-finite activations "
            "or gradients - check the model (and its inputs) before fitting the curvature"
        )
    try:
        vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    except RuntimeError as err:  # torch.linalg.LinAlgError
        raise FloatingPointError(f"eigendecomposition of the {what} failed: {err}") from err
    return vals.clamp(min=0), vecs.contiguous()  # the layout saved factors load with


@register
class KFAC(Curvature):
    """Kronecker-factored curvature per layer; `fisher` picks how labels are chosen."""

    name = "kfac"

    def __init__(
        self,
        damping: Damping = None,
        fisher: str = "sample",
        *,
        damping_factor: float | None = None,
    ) -> None:
        super().__init__(damping, damping_factor=damping_factor)
        self.fisher = check_fisher(fisher)
        self.a_vals: dict[str, Tensor] = {}
        self.a_vecs: dict[str, Tensor | None] = {}  # None: identity (embedding)
        self.s_vals: dict[str, Tensor] = {}
        self.s_vecs: dict[str, Tensor] = {}
        self.eigs: dict[str, Tensor] = {}  # [d_out, d_in'] eigenvalues in the KFE basis

    def options(self) -> dict[str, Any]:
        return {"fisher": self.fisher}

    def _fit(self, ctx: FitContext) -> None:
        space = ctx.space
        a_sum: dict[str, Tensor] = {}
        tokens = dict.fromkeys(space.names, 0)
        s_sum: dict[str, Tensor] = {}
        for i, _, factors in fisher_factors(ctx, self.fisher, stream=0):
            for name, (a, g) in factors.items():
                if i == 0:
                    moment, count = space.by_name[name].input_second_moment(a)
                    a_sum[name] = a_sum[name] + moment if name in a_sum else moment
                    tokens[name] += count
                moment = gram64(g.reshape(-1, g.shape[-1]))
                s_sum[name] = s_sum[name] + moment if name in s_sum else moment
        n = len(ctx.train)
        for layer in space.layers:
            name = layer.name
            a = a_sum[name] / tokens[name]
            if layer.indexed:
                if not torch.isfinite(a).all():
                    raise FloatingPointError(f"the input statistics of {name!r} contain NaN/Inf")
                self.a_vals[name], self.a_vecs[name] = a, None
            else:
                self.a_vals[name], self.a_vecs[name] = _eigh(a, f"input factor A of {name!r}")
            self.s_vals[name], self.s_vecs[name] = _eigh(
                s_sum[name] / n, f"output-gradient factor S of {name!r}"
            )
            self.eigs[name] = torch.outer(self.s_vals[name], self.a_vals[name])
        self._correct(ctx)
        self._set_lambdas()

    def _correct(self, ctx: FitContext) -> None:
        """EK-FAC hook: K-FAC keeps the Kronecker eigenvalues."""

    def _set_lambdas(self) -> None:
        for name, eig in self.eigs.items():
            self.lambdas[name] = self.resolve_damping(name, float(eig.mean()))

    def rotate(self, name: str, v: Tensor, back: bool = False) -> Tensor:
        """Into the Kronecker eigenbasis (Q_Sᵀ V Q_A), or back (Q_S V Q_Aᵀ)."""
        qs = self.s_vecs[name].to(device=v.device, dtype=v.dtype)
        qa = self.a_vecs[name]
        qs = qs if back else qs.T
        v = qs @ v
        if qa is not None:
            qa = qa.to(device=v.device, dtype=v.dtype)
            v = v @ (qa.T if back else qa)
        return v

    def _solve(self, vectors: Blocks) -> Blocks:
        out = {}
        for name, v in vectors.items():
            eig = self.eigs[name].to(device=v.device, dtype=v.dtype)
            out[name] = self.rotate(
                name, self.rotate(name, v) / (eig + self.lambdas[name]), back=True
            )
        return out

    def pair_products(
        self, layer: Layer, left: tuple[Tensor, Tensor], right: tuple[Tensor, Tensor]
    ) -> Tensor | None:
        """One token per example (Linear layers of an MLP): each gradient g aᵀ rotates to
        (Q_Sᵀ g)(Q_Aᵀ a)ᵀ, so ⟨L, (E + λ)⁻¹ ∘ R⟩ = (g̃_L ∘ g̃_R)ᵀ (E + λ)⁻¹ (ã_L ∘ ã_R):
        O(d_out·d_in) per example instead of rotating two dense matrices."""
        if layer.indexed or left[0].shape[1] != 1 or right[0].shape[1] != 1:
            return None
        name = layer.name
        dtype = left[1].dtype
        qs = self.s_vecs[name].to(device=left[1].device, dtype=dtype)
        qa = self.a_vecs[name].to(device=left[1].device, dtype=dtype)  # type: ignore[union-attr]
        inverse = 1 / (self.eigs[name].to(device=qs.device, dtype=dtype) + self.lambdas[name])
        g = (left[1][:, 0] @ qs) * (right[1][:, 0] @ qs)
        a = (left[0][:, 0].to(dtype) @ qa) * (right[0][:, 0].to(dtype) @ qa)
        return ((g @ inverse) * a).sum(1)

    def block(self, name: str) -> Tensor:
        """The dense, undamped curvature block of one layer (float64; small layers, checks)."""
        qs = self.s_vecs[name]
        qa = self.a_vecs[name]
        if qa is None:
            qa = torch.eye(self.a_vals[name].numel(), dtype=torch.float64, device=qs.device)
        q = torch.kron(qs.contiguous(), qa.contiguous())
        return (q * self.eigs[name].reshape(-1)) @ q.T

    def state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in self.eigs:
            out[f"a_vals/{name}"] = self.a_vals[name]
            if self.a_vecs[name] is not None:
                out[f"a_vecs/{name}"] = self.a_vecs[name]  # type: ignore[assignment]
            out[f"s_vals/{name}"] = self.s_vals[name]
            out[f"s_vecs/{name}"] = self.s_vecs[name]
            out[f"eigs/{name}"] = self.eigs[name]
        return {**out, **self._lambda_state()}

    def _load(self, state: dict[str, Tensor]) -> None:
        assert self.space is not None
        for name in self.space.names:
            self.a_vals[name] = state[f"a_vals/{name}"]
            self.a_vecs[name] = state.get(f"a_vecs/{name}")
            self.s_vals[name] = state[f"s_vals/{name}"]
            self.s_vecs[name] = state[f"s_vecs/{name}"]
            self.eigs[name] = state[f"eigs/{name}"]
        self._set_lambdas()


@register
class EKFAC(KFAC):
    """K-FAC's eigenbasis with eigenvalues refitted from per-example gradients."""

    name = "ekfac"

    def _correct(self, ctx: FitContext) -> None:
        sums = {name: torch.zeros_like(e) for name, e in self.eigs.items()}
        for _, _, factors in fisher_factors(ctx, self.fisher, stream=1):
            for name, (a, g) in factors.items():
                layer = ctx.space.by_name[name]
                qs, qa = self.s_vecs[name].to(g.dtype), self.a_vecs[name]
                if qa is None or _rotate_factors_first(layer, a.shape[1]):
                    # Q_Sᵀ (Σ_t g_t a_tᵀ) Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ
                    g = g @ qs
                    if qa is not None:
                        a = a.to(g.dtype) @ qa.to(g.dtype)
                    sums[name] = sums[name].to(g.device) + squared_sum(layer, a, g)
                else:  # many tokens (convolutions): build the gradients, then rotate them
                    rotated = qs.T @ layer.per_example(a, g) @ qa.to(g.dtype)
                    sums[name] = sums[name].to(g.device) + (rotated * rotated).sum(
                        0, dtype=torch.float64
                    )
        n = len(ctx.train)
        for name, s in sums.items():
            if not torch.isfinite(s).all():
                raise FloatingPointError(
                    f"the EK-FAC eigenvalues of {name!r} contain NaN/Inf; some per-example "
                    "gradients are not finite - check the model and the data"
                )
            self.eigs[name] = s / n


def _rotate_factors_first(layer: Layer, tokens: int) -> bool:
    """Whether rotating a and g per token (T·(d_in² + d_out²), then Σ_t once more when
    T > 1) costs less than rotating each example's gradient matrix (T·d_out·d_in to build
    it, d_out·d_in·(d_out + d_in) to rotate it). One token (an MLP): always; a convolution
    with hundreds of positions and wide inputs: usually not."""
    d_out, d_in = layer.shape
    factors = tokens * (d_in * d_in + d_out * d_out) + (tokens * d_out * d_in if tokens > 1 else 0)
    matrices = tokens * d_out * d_in + d_out * d_in * (d_out + d_in)
    return factors <= matrices
