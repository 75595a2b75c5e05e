"""Attribution metrics on constructed inputs with known answers, and their errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr, spearmanr

from datafluence.groundtruth import SubsetRetraining, random_subsets
from datafluence.metrics.attribution import (
    compare,
    lds,
    loo_correlation,
    mislabel_auc,
    pbrf_agreement,
)
from datafluence.scores import Scores


def scores_of(values, train=None, queries=None, method="m", seconds=None, **settings) -> Scores:
    values = np.asarray(values, dtype=np.float64)
    train = train or [f"t{i}" for i in range(values.shape[0])]
    queries = queries or [f"q{j}" for j in range(values.shape[1])]
    timings = {} if seconds is None else {"seconds": seconds}
    return Scores(values, train, queries, method=method, settings=settings, timings=timings)


def subset_truth(n_train=12, n_query=3, n_subsets=40, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n_train, n_query))
    masks = random_subsets(n_train, n_subsets, 0.5, seed=seed)
    measured = masks.astype(float) @ true
    gt = SubsetRetraining(
        masks,
        measured,
        tuple(f"t{i}" for i in range(n_train)),
        tuple(f"q{j}" for j in range(n_query)),
        0.5,
        (0,),
    )
    return true, gt


# ------------------------------------------------------------------------------------------ lds


def test_lds_is_one_for_a_perfect_predictor_and_minus_one_reversed():
    true, gt = subset_truth()
    assert lds(scores_of(true), gt)["lds"] == pytest.approx(1.0)
    assert lds(scores_of(-true), gt)["lds"] == pytest.approx(-1.0)
    # scale is irrelevant (score vs score / N), and so is any monotone transform of the truth
    assert lds(scores_of(true / 500), gt)["lds"] == pytest.approx(1.0)
    exp_truth = (gt.masks, np.exp(gt.measurements))
    result = lds(true, exp_truth)
    assert result["lds"] == pytest.approx(1.0)
    assert result["per_query"] == pytest.approx([1.0, 1.0, 1.0])
    assert result["n_subsets"] == 40 and result["n_queries"] == 3


def test_lds_matches_a_hand_computed_spearman():
    """Four subsets of two examples; predicted effects 1, 2, 3, 4 vs measured 1, 3, 2, 4:
    Spearman = 1 − 6 Σd² / (n (n² − 1)) = 1 − 6·2/60 = 0.8."""
    masks = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=bool)
    values = np.array([[1.0], [2.0], [1.0]])  # predicted 1, 2, 3, 4
    measured = np.array([[1.0], [3.0], [2.0], [4.0]])
    assert lds(values, (masks, measured))["lds"] == pytest.approx(0.8)
    rng = np.random.default_rng(3)
    noisy = measured[:, 0] + rng.normal(size=4)
    expected = spearmanr(masks.astype(float) @ values[:, 0], noisy).statistic
    assert lds(values, (masks, noisy[:, None]))["lds"] == pytest.approx(expected)


def test_lds_matches_scores_to_the_ground_truth_by_id():
    true, gt = subset_truth()
    perm_rows = np.random.default_rng(1).permutation(12)
    perm_cols = [2, 0, 1]
    shuffled = Scores(
        true[np.ix_(perm_rows, perm_cols)],
        tuple(gt.train_ids[i] for i in perm_rows),
        tuple(gt.query_ids[j] for j in perm_cols),
        method="m",
    )
    assert lds(shuffled, gt)["lds"] == pytest.approx(1.0)
    # the same numbers in the wrong order (an array carries no ids) are not perfect
    assert lds(shuffled.values, gt)["lds"] < 0.9


def test_lds_counts_undefined_queries():
    true, gt = subset_truth()
    gt.measurements[:, 1] = 5.0  # a query the retraining never moves
    result = lds(scores_of(true), gt)
    assert math.isnan(result["per_query"][1]) and result["n_undefined"] == 1
    assert result["lds"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda t, gt: (scores_of(t[:-1]), gt), ValueError, "exactly the ground truth"),
        (
            lambda t, gt: (scores_of(t, queries=["q0", "q1", "x"]), gt),
            ValueError,
            "different queries",
        ),
        (lambda t, gt: (t[:, :2], gt), ValueError, "shape"),
        (lambda t, gt: (t, (gt.masks[:5], gt.measurements)), ValueError, "share M"),
        (lambda t, gt: (t, (gt.masks * 2, gt.measurements)), ValueError, "boolean"),
        (lambda t, gt: (t, (gt.masks[:1], gt.measurements[:1])), ValueError, "at least 2"),
        (lambda t, gt: (t, "nope"), TypeError, "SubsetRetraining"),
        (lambda t, gt: (np.where(t > 0, np.nan, t), gt), ValueError, "NaN"),
    ],
)
def test_lds_errors(make, error, match):
    true, gt = subset_truth()
    args = make(true, gt)
    with pytest.raises(error, match=match):
        lds(*args)


# ------------------------------------------------------------------------------- loo and pbrf


def test_loo_correlation_known_values():
    rng = np.random.default_rng(0)
    effects = rng.normal(size=(15, 4))
    truth = scores_of(effects, method="loo")
    perfect = loo_correlation(scores_of(effects * 300 + 2.0), truth)
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    assert loo_correlation(scores_of(-effects), truth)["pearson"] == pytest.approx(-1.0)
    noisy = effects + rng.normal(size=effects.shape)
    result = loo_correlation(scores_of(noisy), truth)
    for j in range(4):
        assert result["pearson_per_query"][j] == pytest.approx(
            pearsonr(noisy[:, j], effects[:, j]).statistic
        )
        assert result["spearman_per_query"][j] == pytest.approx(
            spearmanr(noisy[:, j], effects[:, j]).statistic
        )
    assert result["pearson"] == pytest.approx(np.mean(result["pearson_per_query"]))
    assert result["n_train"] == 15 and result["n_queries"] == 4


def test_ground_truth_rows_are_picked_out_of_a_larger_estimate():
    """LOO / PBRF are computed for some rows only; the estimate scores every row."""
    rng = np.random.default_rng(1)
    full = rng.normal(size=(30, 3))
    rows = [4, 17, 2, 25, 9]
    truth = Scores(full[rows] * 0.01, [f"t{i}" for i in rows], ["q0", "q1", "q2"], method="pbrf")
    assert pbrf_agreement(scores_of(full), truth)["pearson"] == pytest.approx(1.0)
    assert loo_correlation(scores_of(full), truth)["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the scores"):
        pbrf_agreement(scores_of(full[:10]), truth)
    with pytest.raises(ValueError, match="shape"):
        pbrf_agreement(full, truth.values.astype(np.float64))


def test_pbrf_agreement_overall_pearson():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(10, 3)) * np.array([1.0, 10.0, 100.0])
    estimate = truth + rng.normal(size=truth.shape)
    result = pbrf_agreement(estimate, truth)
    assert result["pearson_overall"] == pytest.approx(
        pearsonr(estimate.ravel(), truth.ravel()).statistic
    )
    # per query, the small-scale query is noisier than the large-scale one
    assert result["pearson_per_query"][0] < result["pearson_per_query"][2]
    with pytest.raises(ValueError, match="at least 2"):
        pbrf_agreement(estimate[:1], truth[:1])


# ------------------------------------------------------------------------------ mislabel AUC


def test_mislabel_auc_known_values():
    flags = np.array([1, 1, 0, 0, 0], dtype=bool)
    assert mislabel_auc([5.0, 4.0, 1.0, 2.0, 3.0], flags)["auc"] == 1.0
    assert mislabel_auc([0.0, 0.5, 1.0, 2.0, 3.0], flags)["auc"] == 0.0
    assert mislabel_auc([1.0] * 5, flags)["auc"] == 0.5
    # pairs: 0.8 beats all 3 clean; 0.4 beats 0.1, ties 0.4, loses to 0.5 -> 4.5 / 6
    result = mislabel_auc([0.8, 0.4, 0.5, 0.1, 0.4], flags)
    assert result["auc"] == pytest.approx(0.75)
    assert result["n_mislabelled"] == 2 and result["n_clean"] == 3
    # direction: by magnitude a large negative value flags; "negative" flips the ranking
    signed = [-9.0, 8.0, 0.1, -0.2, 0.3]
    assert mislabel_auc(signed, flags, rank_by="magnitude")["auc"] == 1.0
    assert mislabel_auc(signed, flags)["auc"] == pytest.approx(0.5)
    assert mislabel_auc([0.8, 0.4, 0.5, 0.1, 0.4], flags, "negative")["auc"] == pytest.approx(0.25)


def test_mislabel_auc_matches_pairwise_counting():
    rng = np.random.default_rng(4)
    values = np.round(rng.normal(size=60), 1)  # rounding makes ties
    flags = rng.random(60) < 0.2
    pos, neg = values[flags], values[~flags]
    expected = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert mislabel_auc(values, flags.astype(int))["auc"] == pytest.approx(expected)


def test_mislabel_auc_reads_the_diagonal_of_square_scores():
    values = np.diag([3.0, 0.1, 2.0, 0.2]) + 0.01
    square = Scores(values, ["a", "b", "c", "d"], ["a", "b", "c", "d"], method="m")
    assert mislabel_auc(square, [1, 0, 1, 0])["auc"] == 1.0
    other = Scores(values, ["a", "b", "c", "d"], ["d", "c", "b", "a"], method="m")
    with pytest.raises(ValueError, match="train_ids == query_ids"):
        mislabel_auc(other, [1, 0, 1, 0])


@pytest.mark.parametrize(
    ("values", "flags", "match"),
    [
        ([1.0, 2.0], [True, True], "both mislabelled and clean"),
        ([1.0, 2.0, 3.0], [True, False], "one flag per"),
        ([1.0, float("nan")], [True, False], "NaN"),
        ([[1.0, 2.0]], [True, False], "1-D"),
        ([1.0, 2.0], [2, 0], "boolean"),
    ],
)
def test_mislabel_auc_errors(values, flags, match):
    with pytest.raises(ValueError, match=match):
        mislabel_auc(values, flags)
    with pytest.raises(ValueError, match="rank_by"):
        mislabel_auc([1.0, 2.0], [True, False], rank_by="up")


# ----------------------------------------------------------------------------------- compare


def test_compare_lays_methods_side_by_side():
    rng = np.random.default_rng(5)
    truth = scores_of(rng.normal(size=(8, 2)), method="pbrf")
    methods = {
        "good": scores_of(truth.values * 3, seconds=1.5),
        "bad": scores_of(-truth.values),
        "noise": scores_of(rng.normal(size=(8, 2))),
    }
    table = compare(methods, truth, "pbrf")
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == ["good", "bad", "noise"]
    assert table.loc["good", "pearson"] == pytest.approx(1.0)
    assert table.loc["bad", "pearson"] == pytest.approx(-1.0)
    assert table.loc["good", "seconds"] == 1.5 and math.isnan(table.loc["bad", "seconds"])
    assert "pearson_per_query" not in table.columns
    custom = compare(methods, truth, lambda s, t: {"first": float(np.asarray(s.values)[0, 0])})
    assert set(custom.columns) == {"first", "seconds"}
    assert custom.loc["bad", "first"] == pytest.approx(-truth.values[0, 0])
    with pytest.raises(ValueError, match="unknown metric"):
        compare(methods, truth, "auc")
    with pytest.raises(ValueError, match="empty"):
        compare({}, truth, "loo")
