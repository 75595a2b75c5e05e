"""Pearson and Spearman correlations with one policy for undefined values, used by every metric.

Policy (the same for the 1-D and the column-wise forms):

* A correlation needs at least 2 pairs and finite values on both sides. A NaN or ±Inf
  entry anywhere makes the correlation undefined: the result is NaN (scipy's default
  "propagate"; Inf too, since neither a mean nor a rank order is meaningful with it).
  Pairs are never dropped silently: a simulator that diverged on some examples must not be
  scored on the ones it did not lose. Metrics that need finite inputs check them first and
  raise a clear error instead.
* A constant side (max == min) has no variance, so the correlation is undefined: NaN.
* Otherwise the result is clipped to [-1, 1] (round-off can step just outside).

Callers report NaN as "undefined" (e.g. ``n_undefined``) and leave it out of means over
queries or runs. Spearman is the Pearson correlation of average ranks (ties share their
mean rank), as scipy.stats.spearmanr computes it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata

__all__ = ["column_pearson", "column_spearman", "pearson", "spearman"]


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson correlation of two 1-D arrays of the same length (NaN when undefined)."""
    x, y = _vectors(a, b)
    return float(column_pearson(x[:, None], y[:, None])[0])


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of two 1-D arrays of the same length (NaN when undefined)."""
    x, y = _vectors(a, b)
    return float(column_spearman(x[:, None], y[:, None])[0])


def column_pearson(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pearson correlation of each column of `a` [n, k] with the same column of `b`; [k]."""
    x, y = _matrices(a, b)
    out = np.full(x.shape[1], np.nan)
    ok = _defined(x, y)
    if ok.any():
        out[ok] = _correlate(x[:, ok], y[:, ok])
    return out


def column_spearman(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Spearman correlation of each column of `a` [n, k] with the same column of `b`; [k]."""
    x, y = _matrices(a, b)
    out = np.full(x.shape[1], np.nan)
    ok = _defined(x, y)
    if ok.any():
        out[ok] = _correlate(rankdata(x[:, ok], axis=0), rankdata(y[:, ok], axis=0))
    return out


def _vectors(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"a correlation needs two 1-D arrays of the same length, got shapes {x.shape} and "
            f"{y.shape}; flatten with .ravel(), or use column_pearson/column_spearman for [n, k]"
        )
    return x, y


def _matrices(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(
            f"column correlations need two 2-D [n, k] arrays of the same shape, got {x.shape} "
            f"and {y.shape}"
        )
    return x, y


def _defined(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Columns whose correlation is defined: >= 2 rows, all finite, neither side constant."""
    if x.shape[0] < 2:
        return np.zeros(x.shape[1], dtype=bool)
    ok = np.isfinite(x).all(axis=0) & np.isfinite(y).all(axis=0)
    ok[ok] = (np.ptp(x[:, ok], axis=0) > 0) & (np.ptp(y[:, ok], axis=0) > 0)
    return ok


def _correlate(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Column-wise Pearson of finite, non-constant columns.

    Each column is first scaled by a power of two near its largest magnitude: exact in
    floating point, and it keeps sums of squares from overflowing (|x| ~ 1e200) or
    underflowing (|x| ~ 1e-200), where the plain formula would report NaN or 0/0.
    """
    x = _unit_scale(x)
    y = _unit_scale(y)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    num = (x * y).sum(axis=0)
    den = np.sqrt((x * x).sum(axis=0)) * np.sqrt((y * y).sum(axis=0))
    return np.clip(num / den, -1.0, 1.0)


def _unit_scale(x: np.ndarray) -> np.ndarray:
    _, exponent = np.frexp(np.abs(x).max(axis=0))
    return np.ldexp(x, -exponent)
