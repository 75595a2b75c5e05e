"""Backward passes whose outer products average to the Gauss-Newton / Fisher matrix.

G = mean_i J_iᵀ H_i J_i, with J_i the Jacobian of example i's outputs and H_i the Hessian of
its loss in those outputs. Three ways to produce vectors s with E[s sᵀ] ≈ H_i, each
backpropagated through the model:

- "exact": H_i = L_i L_iᵀ from its eigendecomposition; one pass per output (for softmax
  cross-entropy this is the exact expectation over classes: the true Fisher = GN).
- "sample": labels drawn from the model's own predictive distribution (true Fisher, one
  Monte-Carlo sample per example).
- "empirical": the dataset's own labels (empirical Fisher; biased, cheap).

The loss is recomputed from the outputs through the task: a task may define
`loss_from_outputs(outputs, batch)`; otherwise its `loss` is called with a stand-in model
that returns the outputs. Sampling needs `sample_labels(outputs, batch, generator)` on the
task, built in for ClassificationTask.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from datafluence.curvature.base import FitContext
from datafluence.gradients.capture import Capture, Factors, batch_size_of, per_example
from datafluence.gradients.space import ParamSpace
from datafluence.tasks import Task, eval_mode

FISHER = ("sample", "exact", "empirical")
MAX_EXACT_OUTPUTS = 512


def check_fisher(fisher: str) -> str:
    if fisher not in FISHER:
        raise ValueError(f"unknown fisher {fisher!r}; choose one of {FISHER}")
    return fisher


def loss_from_outputs(task: Task, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-example loss as a function of the model's outputs, checked to be per example."""
    return per_example(task.loss_from_outputs(outputs, batch), batch_size_of(batch), "loss")


def sample_labels(
    task: Task, outputs: Tensor, batch: Mapping[str, Tensor], generator: torch.Generator
) -> dict[str, Tensor]:
    """The batch with labels drawn from the model (drawn on the CPU: same on any device).

    Only the targets change: the loss is recomputed from the outputs already computed on
    the real inputs.
    """
    return dict(task.sample_labels(outputs, batch, generator))


def output_hessian_roots(task: Task, outputs: Tensor, batch: Mapping[str, Tensor]) -> list[Tensor]:
    """Vectors c_k [B, *out] with Σ_k c_k c_kᵀ = each example's loss Hessian in its outputs."""
    b = outputs.shape[0]
    k = outputs[0].numel()
    if k > MAX_EXACT_OUTPUTS:
        raise ValueError(
            f"the exact Gauss-Newton needs one backward pass per model output ({k} per "
            f"example, more than {MAX_EXACT_OUTPUTS}); use fisher='sample'"
        )
    out = outputs.detach().double().requires_grad_(True)
    with torch.enable_grad():
        losses = loss_from_outputs(task, out, batch)
        (grad,) = torch.autograd.grad(losses.sum(), out, create_graph=True)
        grad = grad.reshape(b, k)
        cols = []
        for j in range(k):
            (h,) = torch.autograd.grad(grad[:, j].sum(), out, retain_graph=True, allow_unused=True)
            cols.append(out.new_zeros(b, k) if h is None else h.reshape(b, k))
    hess = torch.stack(cols, dim=-1)  # [B, K, K]
    hess = (hess + hess.transpose(1, 2)) / 2
    if not torch.isfinite(hess).all():
        raise FloatingPointError("the loss Hessian in the model outputs has NaN/Inf entries")
    evals, evecs = torch.linalg.eigh(hess)
    roots = evecs * evals.clamp(min=0).sqrt()[:, None, :]  # columns scaled by √λ
    keep = roots.abs().amax(dim=(0, 1)) > 1e-12 * max(1.0, float(evals.abs().max()))
    return [
        roots[:, :, j].reshape(outputs.shape).to(outputs.dtype) for j in range(k) if bool(keep[j])
    ]


def fisher_passes(
    model: nn.Module,
    task: Task,
    batch: Mapping[str, Tensor],
    space: ParamSpace,
    fisher: str,
    generator: torch.Generator,
) -> Iterator[Factors]:
    """Factors (a, g) per layer for each backward pass of one batch; the Gauss-Newton (or
    Fisher) estimate is the sum over passes of the per-example outer products."""
    b = batch_size_of(batch)
    with eval_mode(model), space.gradients_on(model) as params, Capture(space) as cap:
        outputs = task.outputs(model, batch)
        inputs = cap.inputs(b)
        if fisher == "exact":
            for root in output_hessian_roots(task, outputs, batch):
                cap.new_pass()
                torch.autograd.grad(outputs, params, root, retain_graph=True, allow_unused=True)
                yield cap.factors(b, inputs)
            return
        target = batch if fisher == "empirical" else sample_labels(task, outputs, batch, generator)
        losses = loss_from_outputs(task, outputs, target)
        cap.new_pass()
        torch.autograd.grad(losses.sum(), params, allow_unused=True)
        yield cap.factors(b, inputs)


def fisher_factors(
    ctx: FitContext, fisher: str, stream: int = 0
) -> Iterator[tuple[int, int, Factors]]:
    """(pass index within its batch, batch size, factors) for every backward pass over the
    training set; pass 0 starts a new batch (the inputs a are shared by its passes)."""
    gen = ctx.generator(stream)
    for batch in ctx.batches(f"curvature ({fisher} fisher)"):
        b = batch_size_of(batch)
        for i, factors in enumerate(
            fisher_passes(ctx.model, ctx.task, batch, ctx.space, fisher, gen)
        ):
            yield i, b, factors
