"""Damping: λ in (G + λI)⁻¹.

The default is 0.1 × the mean eigenvalue of the curvature it damps (per layer for
block-diagonal strategies, of the whole matrix otherwise), so the same default means the
same thing at any scale of loss or model. A fixed value, or one per layer, can be given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

Damping = float | Mapping[str, float] | None
DEFAULT_FACTOR = 0.1


def check_damping(damping: Damping) -> Damping:
    """Reject damping ≤ 0 or non-finite values early, with the fix in the message."""
    if damping is None:
        return None
    values = damping.items() if isinstance(damping, Mapping) else [("damping", damping)]
    for name, value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"damping for {name!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"damping must be a positive finite number, got {value} for {name!r}; use a "
                "small positive value (e.g. 1e-3) or None for 0.1 x the mean eigenvalue"
            )
    if isinstance(damping, Mapping):
        return {str(k): float(v) for k, v in damping.items()}
    return float(damping)


def resolve(damping: Damping, block: str, mean_eigenvalue: float) -> float:
    """λ for one block: the fixed value, or 0.1 × its mean eigenvalue."""
    if isinstance(damping, Mapping):
        if block not in damping:
            raise ValueError(
                f"damping was given per layer but not for {block!r}; give a value for every "
                f"selected layer (got {sorted(damping)})"
            )
        return float(damping[block])
    if damping is not None:
        return float(damping)
    if not math.isfinite(mean_eigenvalue):
        raise FloatingPointError(
            f"the mean eigenvalue of the curvature of {block!r} is {mean_eigenvalue}; the "
            "statistics are broken (NaN/Inf gradients?) - check the model and data"
        )
    if mean_eigenvalue <= 0:
        raise ValueError(
            f"the curvature of {block!r} has mean eigenvalue {mean_eigenvalue:.3g} ≤ 0, so the "
            "default damping (0.1 x mean eigenvalue) is not positive; pass damping=<value> "
            "(a Hessian may be indefinite; a layer with zero gradients has zero curvature)"
        )
    return DEFAULT_FACTOR * mean_eigenvalue
