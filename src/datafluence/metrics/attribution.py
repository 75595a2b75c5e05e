"""Attribution against ground truth: LDS, leave-one-out and PBRF correlation, mislabel AUC.

Every function takes the estimate as a `Scores` object (rows and columns matched to the
ground truth by id, in any order) or a plain [n_train, n_query] array (then the shapes must
agree exactly), and returns a dict of Python numbers (lists for per-query values), ready for
metrics.json. `compare` lays several methods side by side in a DataFrame.

Conventions, as in `desiderata`:

* NaN or infinite inputs are rejected with a ValueError.
* Correlations come from `datafluence.stats`: one with a constant vector is undefined,
  reported as NaN, and the means over queries skip it (`n_undefined` counts them; all
  undefined gives NaN).
* Spearman = Pearson of average ranks (ties share their mean rank).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from datafluence import stats
from datafluence.scores import Scores, as_array

ScoresLike = Scores | np.ndarray
MetricFn = Callable[[ScoresLike, Any], Mapping[str, Any]]

__all__ = ["compare", "lds", "loo_correlation", "mislabel_auc", "pbrf_agreement"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _finite(arr: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains {int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} "
            "infinite values; these metrics need finite numbers"
        )
    return arr


def _mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def _ids(obj: Any, attr: str) -> tuple[str, ...] | None:
    ids = getattr(obj, attr, None)
    return None if ids is None else tuple(str(i) for i in ids)


def _select(
    have: tuple[str, ...], want: tuple[str, ...], side: str, names: tuple[str, str]
) -> np.ndarray:
    """Positions in `have` of every id in `want`; a clear error for missing ids."""
    if len(set(want)) != len(want):
        raise ValueError(f"the {names[1]} has duplicate {side} ids")
    lookup = {name: k for k, name in enumerate(have)}
    missing = [i for i in want if i not in lookup]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise ValueError(
            f"{len(missing)} {side} id(s) of the {names[1]} are not in the {names[0]} "
            f"({shown}{', ...' if len(missing) > 5 else ''}); score the same examples"
        )
    return np.asarray([lookup[i] for i in want], dtype=np.int64)


def _aligned(
    estimate: ScoresLike,
    truth_values: np.ndarray,
    truth_train: tuple[str, ...] | None,
    truth_query: tuple[str, ...] | None,
    names: tuple[str, str],
    same_rows: bool,
) -> np.ndarray:
    """The estimate's matrix with rows/columns in the ground truth's order.

    Ids are matched when both sides have them; the estimate may hold more training rows
    than the ground truth unless `same_rows` (then its row set must be exactly the truth's);
    its queries must be exactly the truth's.
    """
    values = as_array(estimate)
    if values.ndim != 2:
        raise ValueError(
            f"the {names[0]} must be a 2-D [n_train, n_query] matrix, got {values.shape}"
        )
    if isinstance(estimate, Scores) and truth_train is not None and truth_query is not None:
        if set(estimate.query_ids) != set(truth_query):
            extra = sorted(set(estimate.query_ids) - set(truth_query))[:5]
            missing = sorted(set(truth_query) - set(estimate.query_ids))[:5]
            raise ValueError(
                f"the {names[0]} and the {names[1]} have different queries (only in the "
                f"{names[0]}: {extra}; only in the {names[1]}: {missing}); use the same query set"
            )
        if same_rows and set(estimate.train_ids) != set(truth_train):
            raise ValueError(
                f"the {names[0]} scores {len(estimate.train_ids)} training examples but the "
                f"{names[1]} covers {len(truth_train)} (or other ids); the subset effect needs a "
                "score for exactly the ground truth's training examples"
            )
        rows = _select(estimate.train_ids, truth_train, "training", names)
        cols = _select(estimate.query_ids, truth_query, "query", names)
        values = values[np.ix_(rows, cols)]
    elif values.shape != truth_values.shape:
        raise ValueError(
            f"the {names[0]} has shape {values.shape} but the {names[1]} has "
            f"{truth_values.shape}; pass arrays of the same shape, or Scores with ids"
        )
    return _finite(values, names[0])


def _column_correlations(
    estimate: np.ndarray, truth: np.ndarray
) -> tuple[list[float], list[float]]:
    return (
        stats.column_pearson(estimate, truth).tolist(),
        stats.column_spearman(estimate, truth).tolist(),
    )


def _truth_scores(truth: ScoresLike, name: str) -> tuple[np.ndarray, tuple | None, tuple | None]:
    values = as_array(truth)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"the {name} must be a non-empty 2-D matrix, got shape {values.shape}")
    _finite(values, name)
    if isinstance(truth, Scores):
        return values, truth.train_ids, truth.query_ids
    return values, None, None


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def lds(scores: ScoresLike, ground_truth: Any) -> dict[str, Any]:
    """Linear datamodeling score: per query, the Spearman correlation across subsets between
    the predicted effect Σ_{i∈S_m} score(i, j) and the measurement after retraining on S_m.

    `ground_truth`: a `SubsetRetraining` (anything with masks [M, n_train], measurements
    [M, n_query], train_ids, query_ids) or a pair (masks, measurements) of arrays. A perfect
    (or any monotone) predictor gives 1, a reversed one −1. Returns {"lds" (mean over
    queries), "per_query", "n_subsets", "n_queries", "n_undefined"}.
    """
    if isinstance(ground_truth, tuple | list) and len(ground_truth) == 2:
        masks, measurements = ground_truth
        train_ids = query_ids = None
    elif hasattr(ground_truth, "masks") and hasattr(ground_truth, "measurements"):
        masks, measurements = ground_truth.masks, ground_truth.measurements
        train_ids, query_ids = _ids(ground_truth, "train_ids"), _ids(ground_truth, "query_ids")
    else:
        raise TypeError(
            "ground_truth must be a SubsetRetraining (from groundtruth.subset_retraining) or a "
            f"(masks, measurements) pair, got {type(ground_truth).__name__}"
        )
    masks = np.asarray(masks)
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise ValueError("subset masks must be boolean (or 0/1): True = in the subset")
        masks = masks.astype(bool)
    measurements = _finite(np.asarray(measurements, dtype=np.float64), "subset measurements")
    if masks.ndim != 2 or measurements.ndim != 2 or masks.shape[0] != measurements.shape[0]:
        raise ValueError(
            f"masks [M, n_train] and measurements [M, n_query] must share M, got {masks.shape} "
            f"and {measurements.shape}"
        )
    if masks.shape[0] < 2:
        raise ValueError(f"the LDS needs at least 2 subsets, got {masks.shape[0]}")
    expected = np.zeros((masks.shape[1], measurements.shape[1]))
    values = _aligned(
        scores, expected, train_ids, query_ids, ("scores", "subset ground truth"), same_rows=True
    )
    predicted = masks.astype(np.float64) @ values  # [M, Q]
    per_query = stats.column_spearman(predicted, measurements).tolist()
    return {
        "lds": _mean(per_query),
        "per_query": per_query,
        "n_subsets": int(masks.shape[0]),
        "n_queries": int(values.shape[1]),
        "n_undefined": int(np.isnan(per_query).sum()),
    }


def loo_correlation(scores: ScoresLike, loo_ground_truth: ScoresLike) -> dict[str, Any]:
    """Pearson and Spearman, per query over training rows, between scores and leave-one-out
    effects (the Scores from groundtruth.leave_one_out; rows matched by id, the estimate may
    score more rows than were left out). Returns {"pearson", "spearman" (means over
    queries), "pearson_per_query", "spearman_per_query", "n_train", "n_queries",
    "n_undefined"}."""
    truth, train_ids, query_ids = _truth_scores(loo_ground_truth, "leave-one-out ground truth")
    if truth.shape[0] < 2:
        raise ValueError("a correlation over training rows needs at least 2 left-out rows")
    values = _aligned(
        scores, truth, train_ids, query_ids, ("scores", "leave-one-out ground truth"), False
    )
    pearson, spearman = _column_correlations(values, truth)
    return {
        "pearson": _mean(pearson),
        "spearman": _mean(spearman),
        "pearson_per_query": pearson,
        "spearman_per_query": spearman,
        "n_train": int(truth.shape[0]),
        "n_queries": int(truth.shape[1]),
        "n_undefined": int(np.isnan(pearson).sum()),
    }


def pbrf_agreement(scores: ScoresLike, pbrf_scores: ScoresLike) -> dict[str, Any]:
    """Agreement with PBRF scores (same scale as influence scores): Pearson per query over
    the PBRF's training rows and its mean, Spearman mean, and the Pearson over all
    (row, query) entries together ("pearson_overall"). Rows matched by id; the estimate may
    score more rows than the PBRF did."""
    truth, train_ids, query_ids = _truth_scores(pbrf_scores, "PBRF scores")
    if truth.shape[0] < 2:
        raise ValueError("a correlation over training rows needs at least 2 PBRF rows")
    values = _aligned(scores, truth, train_ids, query_ids, ("scores", "PBRF scores"), False)
    pearson, spearman = _column_correlations(values, truth)
    return {
        "pearson": _mean(pearson),
        "spearman": _mean(spearman),
        "pearson_overall": stats.pearson(values.reshape(-1), truth.reshape(-1)),
        "pearson_per_query": pearson,
        "n_train": int(truth.shape[0]),
        "n_queries": int(truth.shape[1]),
        "n_undefined": int(np.isnan(pearson).sum()),
    }


RankBy = Literal["value", "magnitude", "negative"]


def mislabel_auc(
    self_scores: ScoresLike | Sequence[float],
    is_mislabelled: Sequence[bool] | np.ndarray,
    rank_by: RankBy = "value",
) -> dict[str, Any]:
    """ROC AUC of flagging mislabelled training examples by their self-influence.

    Direction: with the package's sign convention the self-influence of a classifier,
    score(i, i) = ∇L_iᵀ (G + λI)⁻¹ ∇L_i, is ≥ 0 and large for examples the model can only fit
    by bending towards them: mislabelled ones. So by default (`rank_by="value"`) HIGHER
    self-influence flags a mislabel; "magnitude" ranks by |value| (estimators whose sign is
    unreliable), "negative" flags LOW values. AUC = P(a mislabelled example ranks above a
    clean one), ties counting one half (the Mann-Whitney U statistic / (n_pos n_neg), exact;
    0.5 = chance, 1 = every mislabel ranked first).

    `self_scores`: [n] values, or a square Scores over the same ids (its diagonal is used).
    """
    if isinstance(self_scores, Scores):
        if self_scores.train_ids != self_scores.query_ids:
            raise ValueError(
                "self-influence from a Scores object needs the training set as its own query "
                "set, in the same order (train_ids == query_ids); or pass the values [n]"
            )
        values = np.diag(as_array(self_scores)).copy()
    else:
        values = np.asarray(self_scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"self_scores must be 1-D [n_train], got shape {values.shape}")
    labels = np.asarray(is_mislabelled)
    if labels.dtype != bool:
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ValueError("is_mislabelled must be boolean (or 0/1): True = mislabelled")
        labels = labels.astype(bool)
    if labels.shape != values.shape:
        raise ValueError(
            f"{values.shape[0]} self-influence values but {labels.shape} mislabel flags; give "
            "one flag per training example"
        )
    _finite(values, "self_scores")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"the AUC needs both mislabelled and clean examples, got {n_pos} mislabelled and "
            f"{n_neg} clean"
        )
    if rank_by == "value":
        key = values
    elif rank_by == "magnitude":
        key = np.abs(values)
    elif rank_by == "negative":
        key = -values
    else:
        raise ValueError(f"rank_by must be 'value', 'magnitude' or 'negative', got {rank_by!r}")
    ranks = rankdata(key)  # average ranks for ties
    u = float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2.0
    return {
        "auc": u / (n_pos * n_neg),
        "n_mislabelled": n_pos,
        "n_clean": n_neg,
        "rank_by": rank_by,
    }


METRICS: dict[str, MetricFn] = {
    "lds": lds,
    "loo": loo_correlation,
    "pbrf": pbrf_agreement,
}


def compare(
    methods: Mapping[str, ScoresLike],
    ground_truth: Any,
    metric: str | MetricFn = "pbrf",
) -> pd.DataFrame:
    """One row per method, one column per scalar the metric returns (lists are left out),
    plus "seconds" when a method's Scores record their timings.

    `metric`: "lds", "loo", "pbrf" or any function (scores, ground_truth) -> dict.
    """
    if not methods:
        raise ValueError("methods is empty; give at least one {name: Scores}")
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
        fn = METRICS[metric]
    elif callable(metric):
        fn = metric
    else:
        raise TypeError(f"metric must be a name or a function, got {type(metric).__name__}")
    rows = []
    for name, scores in methods.items():
        result = fn(scores, ground_truth)
        row: dict[str, Any] = {
            k: v
            for k, v in result.items()
            if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        }
        if isinstance(scores, Scores) and "seconds" in scores.timings:
            row["seconds"] = float(scores.timings["seconds"])
        rows.append(pd.Series(row, name=str(name)))
    return pd.DataFrame(rows)
