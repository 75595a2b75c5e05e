"""Desiderata of an influence matrix: properties a good estimate should show, as plain numbers.

Every function takes a `Scores` object or an array shaped [n_train, n_query] (rows = training
examples, columns = queries) and returns a dict of Python floats/ints, so results go straight
into metrics.json. The exception is `spurious_sequences`, which reads per-token parts
[T, n_train, n_query] and returns one ratio and flag per (training sequence, query) pair.

Conventions shared by all functions:

* NaN or infinite inputs are rejected with a ValueError: a silent NaN would poison every mean.
* A rank or linear correlation of a constant vector is undefined (`datafluence.stats`); it
  is reported as ``float("nan")`` and summaries over columns use nan-aware mean/median
  (all-NaN gives NaN).
* "Off-diagonal" means every ordered pair (i, j) with i != j, i.e. both M[i, j] and M[j, i].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist, squareform

from datafluence import stats
from datafluence.scores import Scores, as_array

ScoresLike = Scores | np.ndarray

_MIN_TAIL_DEFAULT = 10  # fewest tail points a power-law fit may use

__all__ = [
    "distance_decay",
    "noise_invariance",
    "pairwise_distances",
    "power_law_tail",
    "sparsity",
    "spurious_sequences",
    "summarize",
    "symmetry",
]


# --------------------------------------------------------------------------------------------
# input checks and small statistics helpers
# --------------------------------------------------------------------------------------------


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite values; these metrics need finite "
            "numbers, so drop or recompute the affected rows/columns first"
        )


def _matrix(scores: ScoresLike, name: str = "scores") -> np.ndarray:
    """The float64 [n_train, n_query] matrix, checked for shape and finiteness."""
    arr = as_array(scores)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix [n_train, n_query], got shape {arr.shape}; "
            "reshape a single column to [n, 1]"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); it needs at least one value")
    _check_finite(arr, name)
    return arr


def _square(scores: ScoresLike, name: str = "scores") -> np.ndarray:
    """A square matrix over the same items (train = probes) with at least 2 items."""
    arr = _matrix(scores, name)
    n, m = arr.shape
    if n != m:
        raise ValueError(
            f"{name} must be square (the same items as training examples and queries), got "
            f"shape {arr.shape}; compute scores with the training set as its own query set"
        )
    if n < 2:
        raise ValueError(f"{name} has {n} item; at least 2 items are needed for pairwise metrics")
    return arr


def _off_diagonal_mask(n: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _nanmedian(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(np.median(x)) if x.size else float("nan")


# --------------------------------------------------------------------------------------------
# 1. symmetry
# --------------------------------------------------------------------------------------------


def symmetry(scores: ScoresLike, include_diagonal: bool = False) -> dict[str, float]:
    """How far influence of i on j matches influence of j on i, for a square matrix.

    Why: for many losses the first-order influence is a symmetric gradient inner product, so
    asymmetry measures how much an estimator (or the true retraining effect) departs from it.

    Correlations are over all ordered off-diagonal pairs (M[i, j], M[j, i]), i != j, i.e.
    corr(offdiag(M), offdiag(M^T)) with both orders of every unordered pair. Unlike using one
    triangle, this does not depend on how the items happen to be numbered. The diagonal
    (self-influence, usually large) is excluded unless `include_diagonal`; the same mask is
    used for the Frobenius norms of the asymmetry index

        ||M - M^T||_F / (||M||_F + ||M^T||_F)   (0 = symmetric, 1 = antisymmetric).

    An all-zero matrix counts as symmetric (index 0); constant entries give NaN correlations.
    """
    m = _square(scores)
    n = m.shape[0]
    mask = np.ones((n, n), dtype=bool) if include_diagonal else _off_diagonal_mask(n)
    x = m[mask]
    y = m.T[mask]
    norm = float(np.linalg.norm(x))
    diff = float(np.linalg.norm(x - y))
    asym = diff / (2.0 * norm) if norm > 0 else 0.0
    return {
        "pearson": stats.pearson(x, y),
        "spearman": stats.spearman(x, y),
        "asymmetry_index": asym,
    }


# --------------------------------------------------------------------------------------------
# 2. sparsity and heavy tails
# --------------------------------------------------------------------------------------------


def _frac_label(frac: float) -> str:
    return f"{frac * 100:g}".replace(".", "p")


def _gini_columns(abs_values: np.ndarray) -> np.ndarray:
    """Gini coefficient of each column of a non-negative matrix (NaN for an all-zero column).

    G = sum_i (2i - n - 1) x_(i) / (n sum_i x_i) with x sorted ascending, i = 1..n: 0 when all
    values are equal, 1 - 1/n when one value holds everything.
    """
    n = abs_values.shape[0]
    xs = np.sort(abs_values, axis=0)
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    total = xs.sum(axis=0)
    out = np.full(abs_values.shape[1], np.nan)
    ok = total > 0
    out[ok] = (weights @ xs[:, ok]) / (n * total[ok])
    return out


def _top_share_columns(abs_values: np.ndarray, frac: float) -> np.ndarray:
    """Share of each column's total |influence| held by its top ceil(frac * n) examples."""
    n = abs_values.shape[0]
    k = max(1, math.ceil(round(frac * n, 9)))  # round: 0.07 * 100 must give 7, not 8
    top = -np.partition(-abs_values, k - 1, axis=0)[:k] if k < n else abs_values
    total = abs_values.sum(axis=0)
    out = np.full(abs_values.shape[1], np.nan)
    ok = total > 0
    out[ok] = top[:, ok].sum(axis=0) / total[ok]
    return out


def sparsity(
    scores: ScoresLike,
    top_fracs: Sequence[float] = (0.01, 0.1),
    power_law: bool = True,
) -> dict[str, float | int]:
    """How concentrated each query's influence is on a few training examples.

    Why: if a behaviour is driven by a handful of examples, attributions are actionable; a
    flat distribution means nothing stands out. Per query column, over training examples:

    * Gini coefficient of |values| (0 = spread evenly, 1 - 1/n = one example holds it all);
    * share of the column's total |influence| held by its top ceil(frac * n_train) examples
      (at least one example), for each frac in `top_fracs`.

    Mean and median over queries are reported; all-zero columns are NaN and skipped.
    Keys: gini_mean, gini_median, top_{pct}pct_share_mean / _median ("1", "10", "0p5" ...),
    and, when `power_law`, the `power_law_tail` fit of all nonzero |values| pooled over the
    matrix as powerlaw_alpha, powerlaw_xmin, powerlaw_ks, powerlaw_n_tail (NaN/0 when there
    are too few distinct nonzero values to fit a tail).
    """
    m = _matrix(scores)
    fracs = tuple(float(f) for f in top_fracs)
    for f in fracs:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"top_fracs must lie in (0, 1], got {f}; 0.01 means the top 1%")
    abs_m = np.abs(m)
    gini = _gini_columns(abs_m)
    out: dict[str, float | int] = {"gini_mean": _nanmean(gini), "gini_median": _nanmedian(gini)}
    for f in fracs:
        share = _top_share_columns(abs_m, f)
        label = _frac_label(f)
        out[f"top_{label}pct_share_mean"] = _nanmean(share)
        out[f"top_{label}pct_share_median"] = _nanmedian(share)
    if power_law:
        positive = abs_m[abs_m > 0]
        fit: dict[str, Any] = {"alpha": float("nan"), "xmin": float("nan"), "ks": float("nan")}
        fit["n_tail"] = 0
        if positive.size >= _MIN_TAIL_DEFAULT and np.unique(positive).size >= 2:
            # a ValueError here means e.g. every candidate tail is one repeated value: keep NaN
            with contextlib.suppress(ValueError):
                fit = power_law_tail(positive)
        out["powerlaw_alpha"] = fit["alpha"]
        out["powerlaw_xmin"] = fit["xmin"]
        out["powerlaw_ks"] = fit["ks"]
        out["powerlaw_n_tail"] = int(fit["n_tail"])
    return out


def spurious_sequences(
    token_scores: ScoresLike, threshold: float = 2 / 3
) -> tuple[np.ndarray, np.ndarray]:
    """Training sequences whose influence on a query sits on one or two tokens.

    Why (Grosse et al. 2023): influence concentrated on a single token usually comes from a
    token-level coincidence (a shared rare token, a formatting mark) rather than from what
    the sequence says, so such pairs should not be read as evidence of learning from content.

    Per (training sequence, query) pair, the ratio ‖s‖₂ / ‖s‖₁ of its per-token scores s:
    1 when one token holds all the influence, 1/√k when k tokens share it evenly (1/√2 ≈ 0.71
    for two, so the default threshold 2/3 flags one or two dominant tokens), 0 for an
    all-zero pair (never flagged). `token_scores`: a Scores with parts["per_token"]
    [T, n_train, n_query] (InfluenceFunction.token_scores) or that array.
    Returns (ratio [n_train, n_query] float64, flags = ratio > threshold).
    """
    if isinstance(token_scores, Scores):
        if "per_token" not in token_scores.parts:
            raise ValueError(
                f"these {token_scores.method!r} scores have no parts['per_token'] (parts: "
                f"{sorted(token_scores.parts)}); compute them with "
                "InfluenceFunction.token_scores(model, train, queries)"
            )
        parts = token_scores.parts["per_token"]
    else:
        parts = token_scores
    if np.ndim(parts) != 3 or 0 in np.shape(parts):
        raise ValueError(
            f"per-token scores must be a non-empty 3-D array [T, n_train, n_query] (token "
            f"positions first, like parts['per_token']), got shape {np.shape(parts)}"
        )
    if not 0.0 <= threshold < 1.0:
        raise ValueError(
            f"threshold must lie in [0, 1) (the ratio is at most 1), got {threshold}; 2/3 "
            "flags influence held by one or two tokens"
        )
    _, n_train, n_query = np.shape(parts)
    ratio = np.zeros((n_train, n_query))
    step = max(1, (1 << 24) // (np.shape(parts)[0] * n_query))  # bounded memory for memmaps
    for lo in range(0, n_train, step):
        s = np.asarray(parts[:, lo : lo + step], dtype=np.float64)
        _check_finite(s, "per-token scores")
        l1 = np.abs(s).sum(axis=0)
        l2 = np.sqrt((s * s).sum(axis=0))
        np.divide(l2, l1, out=ratio[lo : lo + step], where=l1 > 0)
    return ratio, ratio > threshold


class _SortedSample:
    """Sorted positive values with what every candidate fit reuses (logs, tie-aware ranks)."""

    def __init__(self, xs: np.ndarray) -> None:
        self.xs = xs
        self.logs = np.log(xs)
        # Empirical CDF just after / just before each point (exact with ties), as global ranks.
        self.right = np.searchsorted(xs, xs, side="right").astype(np.float64)
        self.left = np.searchsorted(xs, xs, side="left").astype(np.float64)

    def fit_at(self, k: int) -> tuple[float, float]:
        """Continuous power-law MLE alpha and KS distance for the tail xs[k:], where k is the
        first index of its value. Returns (nan, inf) when the tail has a single value."""
        tail_logs = self.logs[k:]
        n = tail_logs.size
        log_xmin = self.logs[k]
        s = float(tail_logs.sum()) - n * log_xmin
        if not s > 0:
            return float("nan"), float("inf")
        alpha = 1.0 + n / s
        fitted = -np.expm1((1.0 - alpha) * (tail_logs - log_xmin))  # 1 - (x/xmin)^(1-alpha)
        above = float(np.max(self.right[k:] - k - n * fitted))
        below = float(np.max(n * fitted - (self.left[k:] - k)))
        return alpha, max(above, below) / n


def _select_xmin(sample: _SortedSample, min_tail: int, max_candidates: int) -> int:
    """Index into the sorted sample of the xmin minimising the KS distance (Clauset et al.)."""
    xs = sample.xs
    _, first = np.unique(xs, return_index=True)
    first = first[first <= xs.size - min_tail]
    if first.size == 0:
        raise ValueError(
            f"no candidate xmin leaves at least min_tail={min_tail} values in the tail "
            f"(only {xs.size} values); pass more data or a smaller min_tail"
        )
    if first.size > max_candidates:  # evenly spaced quantiles of the candidate values
        pick = np.unique(np.linspace(0, first.size - 1, max_candidates).round().astype(int))
        first = first[pick]
    best_k, best_ks = -1, float("inf")
    for k in first:
        _, ks = sample.fit_at(int(k))
        if ks < best_ks:
            best_k, best_ks = int(k), ks
    if best_k < 0:
        raise ValueError(
            "every candidate tail consists of one repeated value, so no power law can be fitted"
        )
    return best_k


def power_law_tail(
    x: np.ndarray | Sequence[float],
    xmin: float | None = None,
    *,
    min_tail: int = _MIN_TAIL_DEFAULT,
    max_candidates: int = 1000,
    max_points: int = 200_000,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, float | int]:
    """Fit a continuous power law p(x) ~ x^-alpha to the tail x >= xmin (Clauset, Shalizi &
    Newman 2009), to say how heavy-tailed influence is.

    alpha = 1 + n_tail / sum ln(x_i / xmin) over the tail, with standard error
    (alpha - 1) / sqrt(n_tail). When `xmin` is None it is the candidate minimising the KS
    distance between the empirical and fitted tail CDFs; candidates are the distinct values
    of x that leave at least `min_tail` tail points, thinned to at most `max_candidates`
    evenly spaced quantiles. With more than `max_points` values, xmin is chosen on a seeded
    random subsample of that size (selection is O(candidates x n)); alpha, ks and n_tail are
    then computed on all values at that xmin.

    `x` is flattened and must be finite and strictly positive (pass e.g. |values| > 0).
    Returns alpha, alpha_se, xmin, ks, n_tail. With `n_bootstrap` > 0 it also returns
    ks_pvalue from the semi-parametric bootstrap of Clauset et al.: each of `n_bootstrap`
    synthetic data sets (seeded by `seed`) of the same size draws each point from the fitted
    power law with probability n_tail / n and otherwise resamples the body (x < xmin), is
    refitted the same way (xmin re-estimated if it was estimated), and the p-value is the
    fraction of synthetic KS distances >= the observed one (p < 0.1 rules the power law out);
    synthetic sets too degenerate to refit are left out of that fraction. Each draw costs a
    full fit, so keep `n_bootstrap` modest (e.g. 100) on large inputs.
    """
    values = np.asarray(x, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("power_law_tail got no values; it needs a 1-D array of positive numbers")
    _check_finite(values, "x")
    if np.any(values <= 0):
        raise ValueError(
            f"power_law_tail needs strictly positive values but {int((values <= 0).sum())} are "
            "<= 0; fit the magnitudes instead, e.g. np.abs(v)[v != 0]"
        )
    if min_tail < 2:
        raise ValueError(f"min_tail must be at least 2, got {min_tail}")
    if max_candidates < 1 or max_points < min_tail:
        raise ValueError(
            f"max_candidates must be >= 1 and max_points >= min_tail, got {max_candidates} "
            f"and {max_points}"
        )
    xs = np.sort(values)
    rng = np.random.default_rng(seed)

    if xmin is None:
        sample = xs
        if xs.size > max_points:
            sample = np.sort(rng.choice(xs, size=max_points, replace=False))
        chosen = float(sample[_select_xmin(_SortedSample(sample), min_tail, max_candidates)])
    else:
        chosen = float(xmin)
        if not (math.isfinite(chosen) and chosen > 0):
            raise ValueError(f"xmin must be a finite positive number, got {xmin}")
    k = int(np.searchsorted(xs, chosen, side="left"))
    n_tail = xs.size - k
    if n_tail < min_tail:
        raise ValueError(
            f"only {n_tail} values are >= xmin={chosen:g}; at least min_tail={min_tail} are "
            "needed, so lower xmin (or min_tail)"
        )
    alpha, ks = _SortedSample(xs).fit_at(k)
    if not math.isfinite(alpha):
        raise ValueError(
            f"all {n_tail} tail values equal xmin={chosen:g}, so the exponent is undefined; "
            "choose a lower xmin"
        )
    out: dict[str, float | int] = {
        "alpha": float(alpha),
        "alpha_se": float((alpha - 1.0) / math.sqrt(n_tail)),
        "xmin": chosen,
        "ks": float(ks),
        "n_tail": int(n_tail),
    }
    if n_bootstrap > 0:
        body = xs[:k]
        p_tail = n_tail / xs.size
        exceed, valid = 0, 0
        for _ in range(n_bootstrap):
            from_tail = rng.random(xs.size) < p_tail if body.size else np.ones(xs.size, bool)
            n_t = int(from_tail.sum())
            synth = np.empty(xs.size)
            u = rng.random(n_t)
            synth[from_tail] = chosen * (1.0 - u) ** (-1.0 / (alpha - 1.0))
            if body.size:
                synth[~from_tail] = rng.choice(body, size=xs.size - n_t, replace=True)
            try:
                fit = power_law_tail(
                    synth,
                    None if xmin is None else chosen,
                    min_tail=min_tail,
                    max_candidates=max_candidates,
                    max_points=max_points,
                    seed=int(rng.integers(2**31)),
                )
            except ValueError:
                continue  # degenerate synthetic draw (too few tail points): left out
            valid += 1
            exceed += fit["ks"] >= ks
        out["ks_pvalue"] = exceed / valid if valid else float("nan")
        out["n_bootstrap"] = int(n_bootstrap)
    return out


# --------------------------------------------------------------------------------------------
# 3. noise invariance
# --------------------------------------------------------------------------------------------


def noise_invariance(clean: ScoresLike, noisy: ScoresLike) -> dict[str, float]:
    """Agreement between influence computed with clean and with noise-corrupted training data.

    Why: an attribution that reshuffles when inputs get a little noise is explaining the noise,
    not the learned behaviour. Per query column j, Spearman(clean[:, j], noisy[:, j]) over
    training examples (NaN for a constant column, skipped by the mean/median); plus Spearman
    and Pearson of the two whole matrices flattened.
    """
    a = _matrix(clean, "clean")
    b = _matrix(noisy, "noisy")
    if a.shape != b.shape:
        raise ValueError(
            f"clean and noisy scores must have the same shape [n_train, n_query], got {a.shape} "
            f"and {b.shape}; compute both over the same training examples and queries"
        )
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 training examples (rows) to rank, got shape {a.shape}")
    per_column = stats.column_spearman(a, b)
    flat_a, flat_b = a.ravel(), b.ravel()
    return {
        "column_spearman_mean": _nanmean(per_column),
        "column_spearman_median": _nanmedian(per_column),
        "spearman": stats.spearman(flat_a, flat_b),
        "pearson": stats.pearson(flat_a, flat_b),
    }


# --------------------------------------------------------------------------------------------
# 4. distance decay
# --------------------------------------------------------------------------------------------


def pairwise_distances(features: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Euclidean distances [n, n] (float64) between the rows of `features` [n, ...].

    Trailing axes are flattened (an image batch [n, c, h, w] works as is); the diagonal is 0.
    Use it to build the input- or embedding-space `distance` for `distance_decay`.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim == 0 or f.shape[0] < 2:
        raise ValueError(f"features must have at least 2 rows (one per item), got shape {f.shape}")
    f = f.reshape(f.shape[0], -1)
    _check_finite(f, "features")
    return squareform(pdist(f, metric="euclidean"))


def distance_decay(
    scores: ScoresLike,
    distance: np.ndarray | None = None,
    labels: np.ndarray | Sequence[Any] | None = None,
) -> dict[str, float]:
    """Does influence fall off with distance between items? For a square matrix (train = probes).

    Why: a plausible attribution says similar examples influence each other most. Using the
    off-diagonal entries M[i, j], i != j:

    * with `distance` [n, n]: "spearman_vs_distance" = Spearman(M[i, j], distance[i, j])
      (negative = influence decays with distance);
    * with `labels` [n]: "within_class_mean" and "across_class_mean" influence,
      "block_difference" = within - across, "block_ratio" = within / across, and
      "spearman_vs_different_class" = Spearman(M[i, j], 1[label_i != label_j]) (negative =
      less influence across classes). The ratio only reads as "times stronger" for a positive
      denominator, so block_ratio is NaN when the across-class mean is <= 1e-12 * max|M|
      (zero or negative); use block_difference then.
    """
    if distance is None and labels is None:
        raise ValueError(
            "distance_decay needs `distance` ([n, n] matrix) or `labels` ([n] classes) or both"
        )
    m = _square(scores)
    n = m.shape[0]
    off = _off_diagonal_mask(n)
    values = m[off]
    out: dict[str, float] = {}
    if distance is not None:
        d = np.asarray(distance, dtype=np.float64)
        if d.shape != (n, n):
            raise ValueError(
                f"distance must be an [n, n] matrix matching the scores ({n} items), got shape "
                f"{d.shape}; build it with pairwise_distances(features)"
            )
        _check_finite(d, "distance")
        out["spearman_vs_distance"] = stats.spearman(values, d[off])
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.shape[0] != n:
            raise ValueError(
                f"labels must be 1-D with one class per item ({n} items), got shape {lab.shape}"
            )
        same = (lab[:, None] == lab[None, :])[off]
        if same.all():
            raise ValueError(
                "labels hold a single class, so there are no across-class pairs; "
                "pass labels with at least 2 classes"
            )
        if not same.any():
            raise ValueError(
                "every item has its own class, so there are no within-class pairs; "
                "pass labels where some class has at least 2 items"
            )
        within = float(values[same].mean())
        across = float(values[~same].mean())
        scale = float(np.abs(values).max())
        out["within_class_mean"] = within
        out["across_class_mean"] = across
        out["block_difference"] = within - across
        out["block_ratio"] = within / across if across > 1e-12 * scale else float("nan")
        out["spearman_vs_different_class"] = stats.spearman(values, (~same).astype(np.float64))
    return out


# --------------------------------------------------------------------------------------------
# all at once
# --------------------------------------------------------------------------------------------


def summarize(
    scores: ScoresLike,
    labels: np.ndarray | Sequence[Any] | None = None,
    distance: np.ndarray | None = None,
) -> dict[str, Any]:
    """All desiderata for one matrix: {"symmetry", "sparsity", "distance_decay"}.

    Symmetry and distance decay only make sense for a square matrix over the same items (and
    decay needs `labels` or `distance`); when they do not apply they are left out and the
    reason is recorded under "skipped" (that key is present only when something was skipped).
    Invalid inputs (NaN, wrong shapes) still raise.
    """
    m = _matrix(scores)
    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    square = m.shape[0] == m.shape[1] and m.shape[0] >= 2
    if square:
        out["symmetry"] = symmetry(m)
    else:
        skipped["symmetry"] = (
            f"scores have shape {m.shape}; symmetry needs a square matrix of at least 2 items"
        )
    out["sparsity"] = sparsity(m)
    if not square:
        skipped["distance_decay"] = (
            f"scores have shape {m.shape}; distance decay needs a square matrix of at least 2 items"
        )
    elif labels is None and distance is None:
        skipped["distance_decay"] = "no labels or distance given"
    else:
        out["distance_decay"] = distance_decay(m, distance=distance, labels=labels)
    if skipped:
        out["skipped"] = skipped
    return out
