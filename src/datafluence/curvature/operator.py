"""Matrix-free Gauss-Newton and Hessian products over the training set, in flat [P, k] form.

GN: G v = mean_i J_iᵀ H_i J_i v, with J v by the double-backward trick (J v = ∂/∂u ⟨Jᵀu, v⟩)
and H_i applied in output space. Hessian: H v by double backward of the mean loss. Both run
the user's module (eval mode) through autograd; products accumulate in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from datafluence.curvature.base import FitContext
from datafluence.curvature.fisher import loss_from_outputs
from datafluence.gradients.capture import batch_size_of, chunks, per_example
from datafluence.tasks import eval_mode

MATRICES = ("gn", "hessian")


def check_matrix(matrix: str) -> str:
    if matrix not in MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}; choose 'gn' (Gauss-Newton) or 'hessian'")
    return matrix


class CurvatureOperator:
    """v ↦ G v (mean over the chosen training examples)."""

    def __init__(self, ctx: FitContext, matrix: str = "gn") -> None:
        self.ctx = ctx
        self.matrix = check_matrix(matrix)
        self.dim = ctx.space.dim

    def matvec(self, vectors: Tensor, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """G V for V [P, k] (float64 result); `indices` restricts the mean to a subset.

        V is turned into parameter-shaped tensors once per product, and each chunk's result
        is summed (float64) in that shape, flattened once at the end: no per-chunk,
        per-column conversions.
        """
        ctx = self.ctx
        examples = ctx.train if indices is None else ctx.train[torch.as_tensor(indices)]
        product = self._gn if self.matrix == "gn" else self._hessian
        with eval_mode(ctx.model), ctx.space.gradients_on(ctx.model) as params:
            v = self._param_vectors(vectors)
            total = [torch.zeros_like(t, dtype=torch.float64) for t in v]
            for _, _, batch in chunks(examples, ctx.chunk_size):
                for acc, part in zip(total, product(batch, params, v), strict=True):
                    if part is not None:
                        acc += part
        return self._flat(total) / len(examples)

    def _hessian(self, batch: dict[str, Tensor], params: list, v: list[Tensor]) -> tuple:
        losses = per_example(
            self.ctx.task.loss(self.ctx.model, batch), batch_size_of(batch), "loss"
        )
        grads = torch.autograd.grad(losses.sum(), params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:  # the loss is linear in the parameters
            return (None,) * len(params)
        return _grad([grads[i] for i in used], params, [v[i] for i in used])

    def _gn(self, batch: dict[str, Tensor], params: list, v: list[Tensor]) -> tuple:
        task = self.ctx.task
        outputs = task.outputs(self.ctx.model, batch)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        jt_dummy = torch.autograd.grad(outputs, params, dummy, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(jt_dummy) if g is not None]
        out_d = outputs.detach().requires_grad_(True)
        losses = loss_from_outputs(task, out_d, batch)
        (dl,) = torch.autograd.grad(losses.sum(), out_d, create_graph=True)
        (jv,) = _grad([jt_dummy[i] for i in used], [dummy], [v[i] for i in used])
        (hjv,) = _grad([dl], [out_d], [jv])
        return _grad([outputs], params, [hjv])

    def _param_vectors(self, vectors: Tensor) -> list[Tensor]:
        """[P, k] -> tensors aligned with `parameters()` (in their dtype), leading dim k."""
        space = self.ctx.space
        blocks = space.unflatten(vectors.T.contiguous())
        out: list[Tensor] = []
        for layer in space.layers:
            dtype = layer.weight.dtype
            out.extend(t.to(dtype) for t in layer.from_matrix(blocks[layer.name]))
        return out

    def _flat(self, grads: Sequence[Tensor]) -> Tensor:
        """Tensors aligned with `parameters()`, leading dim k -> [P, k] float64."""
        space = self.ctx.space
        blocks, i = {}, 0
        for layer in space.layers:
            n = len(layer.parameters())
            blocks[layer.name] = layer.to_matrix(grads[i], grads[i + 1] if n == 2 else None)
            i += n
        return space.flatten(blocks).T.contiguous().double()


def _grad(outputs: list[Tensor], inputs: list, cotangents: list[Tensor]) -> tuple:
    """Vector-Jacobian products for a batch of cotangents (leading dim), vmapped by autograd
    when the ops allow it and one at a time otherwise."""
    try:
        return torch.autograd.grad(
            outputs, inputs, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:
        k = cotangents[0].shape[0]
        try:
            rows = [
                torch.autograd.grad(
                    outputs,
                    inputs,
                    [c[j] for c in cotangents],
                    retain_graph=True,
                    allow_unused=True,
                )
                for j in range(k)
            ]
        except RuntimeError as err:
            if "derivative for" not in str(err):
                raise
            raise RuntimeError(
                f"{err}. Curvature-vector products (explicit, cg, lissa, arnoldi) "
                "differentiate the model twice, and this op has no second derivative: for "
                "a transformers model load it with attn_implementation='eager' (the fused "
                "scaled-dot-product attention has none on CPU), or use curvature='ekfac', "
                "'kfac', 'diagonal' or 'identity', which need first derivatives only"
            ) from err
        return tuple(
            None if rows[0][i] is None else torch.stack([r[i] for r in rows])
            for i in range(len(inputs))
        )


def mean_eigenvalue(op: CurvatureOperator, probes: int = 16, seed: int = 0) -> float:
    """Hutchinson estimate of trace(G) / P with seeded Rademacher probes."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (op.dim, probes), generator=gen).double().mul_(2).sub_(1)
    z = z.to(_device(op))
    return float((z * op.matvec(z)).sum() / (probes * op.dim))


def largest_eigenvalue(op: CurvatureOperator, iterations: int = 20, seed: int = 0) -> float:
    """Power-iteration estimate of the largest |eigenvalue|."""
    gen = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(op.dim, 1, generator=gen, dtype=torch.float64).to(_device(op))
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        w = op.matvec(v)
        value = float((v * w).sum())
        norm = w.norm()
        if norm == 0:
            return 0.0
        v = w / norm
    return abs(value)


def _device(op: CurvatureOperator) -> torch.device:
    return op.ctx.space.parameters()[0].device
