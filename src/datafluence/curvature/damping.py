"""Damping: λ in (G + λI)⁻¹, with one meaning for every method that damps.

G is always the MEAN curvature (the mean over training examples of the per-example
Gauss-Newton or Hessian matrices; TRAK's kernel ΦᵀΦ / N). Damping is given one of two ways,
never both:

- `damping=λ`: absolute, added to the mean curvature as is (one number, or {layer: number}
  for block-diagonal strategies);
- `damping_factor=f`: relative, λ = f × the mean eigenvalue of the curvature it damps (per
  layer for block-diagonal strategies, of the whole matrix otherwise), so the same factor
  means the same thing at any scale of loss or model.

With neither, a method uses its default factor (influence functions and PBRF: 0.1; TRAK:
1e-3, as in its paper's ridge). The λ actually used is recorded in the result's settings
(`damping_used`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

Damping = float | Mapping[str, float] | None
DEFAULT_FACTOR = 0.1


def _number(value: Any, what: str, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(
            f"{what} must be a finite number {bound}, got {value}; use a small positive value "
            "(e.g. damping=1e-3, or damping_factor=0.1 for 0.1 x the mean eigenvalue)"
        )
    return float(value)


def check_damping(
    damping: Damping, damping_factor: float | None = None, *, allow_zero: bool = False
) -> tuple[Damping, float | None]:
    """(damping, damping_factor) checked: finite, positive (≥ 0 where a method can invert
    without damping, `allow_zero`), and not both given."""
    if damping is not None and damping_factor is not None:
        raise ValueError(
            f"give damping (absolute λ, got {damping}) or damping_factor (λ = factor x mean "
            f"eigenvalue, got {damping_factor}), not both"
        )
    factor = None if damping_factor is None else _number(damping_factor, "damping_factor", False)
    if damping is None:
        return None, factor
    if isinstance(damping, Mapping):
        return {
            str(k): _number(v, f"damping for {k!r}", allow_zero) for k, v in damping.items()
        }, None
    return _number(damping, "damping", allow_zero), None


def resolve(
    damping: Damping,
    damping_factor: float | None,
    block: str,
    mean_eigenvalue: float,
    default_factor: float = DEFAULT_FACTOR,
) -> float:
    """λ for one block: the absolute value, or the factor × its mean eigenvalue."""
    if isinstance(damping, Mapping):
        if block not in damping:
            raise ValueError(
                f"damping was given per layer but not for {block!r}; give a value for every "
                f"selected layer (got {sorted(damping)})"
            )
        return float(damping[block])
    if damping is not None:
        return float(damping)
    factor = default_factor if damping_factor is None else damping_factor
    if not math.isfinite(mean_eigenvalue):
        raise FloatingPointError(
            f"the mean eigenvalue of the curvature of {block!r} is {mean_eigenvalue}; the "
            "statistics are broken (NaN/Inf gradients?) - check the model and data"
        )
    if mean_eigenvalue == 0 and block != "*":
        # A layer whose gradients are all zero (a fresh LoRA A, a frozen or unused branch)
        # adds nothing to any score, whatever its λ: the fit of the other layers goes on.
        warnings.warn(
            f"layer {block!r} has zero curvature (its gradients are all zero: a fresh LoRA "
            "adapter's A, a frozen or unused layer); it contributes nothing to the scores and "
            "is damped with λ = 1; leave it out of `modules` to skip it",
            UserWarning,
            stacklevel=2,
        )
        return 1.0
    if mean_eigenvalue <= 0:
        raise ValueError(
            f"the curvature of {block!r} has mean eigenvalue {mean_eigenvalue:.3g} ≤ 0, so the "
            f"relative damping ({factor:g} x mean eigenvalue) is not positive; pass "
            "damping=<value> (a Hessian may be indefinite; a layer with zero gradients has "
            "zero curvature)"
        )
    return factor * mean_eigenvalue
