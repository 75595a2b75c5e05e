"""Regression as a Task: half squared error, measurement = −loss.

(Kept here until it moves next to ClassificationTask in `datafluence.tasks`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from datafluence.tasks import Examples, ModelFn, Task


class RegressionTask(Task):
    """Real-valued targets `y` [N, k] (a 1-D target becomes [N, 1]) from inputs `x`.

    Loss L = ½ Σ_k (f(x)_k − y_k)² per example (the Gaussian negative log-likelihood with unit
    variance, up to a constant), so its Hessian in the outputs is the identity and the
    Gauss-Newton matrix is JᵀJ. The only measurement is "neg_loss" (= −L): higher = the
    model fits the example better, as for every task.
    """

    def __init__(self, measurement: str = "neg_loss") -> None:
        if measurement != "neg_loss":
            raise ValueError(
                f"a regression task measures 'neg_loss' (−½ squared error), got {measurement!r}"
            )
        self.measurement = measurement

    def examples(
        self, x: Tensor, y: Tensor | Sequence[float], ids: Sequence[str] | None = None
    ) -> Examples:
        """Build a checked set of examples from inputs and real targets."""
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if not y.dtype.is_floating_point:
            y = y.to(x.dtype if x.dtype.is_floating_point else torch.get_default_dtype())
        if y.ndim == 1:
            y = y[:, None]
        if x.shape[0] == 0:
            raise ValueError("the example set is empty; give at least one example")
        if ids is None:
            ids = [str(i) for i in range(x.shape[0])]
        examples = Examples({"x": x, "y": y}, tuple(str(i) for i in ids))
        self.check(examples)
        return examples

    def check(self, examples: Examples, role: str = "examples") -> None:
        super().check(examples, role)
        if "x" not in examples.tensors or "y" not in examples.tensors:
            raise ValueError(
                f"regression {role} need tensors 'x' (inputs) and 'y' (targets), "
                f"got {sorted(examples.tensors)}"
            )
        y = examples.tensors["y"]
        if not y.dtype.is_floating_point or y.ndim != 2:
            raise ValueError(
                f"{role} targets must be a floating-point tensor [N, k], got dtype {y.dtype} "
                f"and shape {tuple(y.shape)}; build them with RegressionTask.examples"
            )
        for name in ("x", "y"):
            t = examples.tensors[name]
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                raise ValueError(f"{role} {name!r} contains NaN or Inf; clean it first")

    def outputs(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        out = model(batch["x"])
        y = batch["y"]
        if out.shape != y.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for targets of shape "
                f"{tuple(y.shape)}; a regressor must return [batch, k] like the targets"
            )
        return out

    def loss_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return 0.5 * (outputs - batch["y"].to(outputs.dtype)).pow(2).sum(-1)

    def measure_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return -self.loss_from_outputs(outputs, batch)

    def sample_labels(
        self, outputs: Tensor, batch: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Targets drawn from the model's predictive N(f(x), I) (drawn on the CPU), so that
        E[g gᵀ] is the Gauss-Newton matrix (fisher="sample" in K-FAC / EK-FAC)."""
        noise = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
        drawn = outputs.detach().double().cpu() + noise
        return {**batch, "y": drawn.to(device=outputs.device, dtype=batch["y"].dtype)}
