"""Desiderata metrics on constructed matrices whose answers are known in closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from datafluence.metrics import (
    distance_decay,
    noise_invariance,
    pairwise_distances,
    power_law_tail,
    sparsity,
    summarize,
    symmetry,
)
from datafluence.scores import Scores


def _random(n: int, m: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, m))


def _pareto(n: int, alpha: float, xmin: float, seed: int) -> np.ndarray:
    """Inverse transform sampling: P(X > x) = (x / xmin)^(1 - alpha)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


# ---------------------------------------------------------------------------- symmetry


def test_symmetric_matrix_is_perfectly_symmetric() -> None:
    a = _random(20, 20)
    m = a + a.T
    out = symmetry(m)
    assert out["pearson"] == pytest.approx(1.0)
    assert out["spearman"] == pytest.approx(1.0)
    assert out["asymmetry_index"] == pytest.approx(0.0, abs=1e-12)


def test_antisymmetric_matrix_has_correlation_minus_one_and_index_one() -> None:
    a = _random(20, 20, seed=1)
    m = a - a.T
    out = symmetry(m)
    assert out["pearson"] == pytest.approx(-1.0)
    assert out["spearman"] == pytest.approx(-1.0)
    assert out["asymmetry_index"] == pytest.approx(1.0)


def test_symmetry_ignores_diagonal_unless_asked() -> None:
    # Off-diagonal antisymmetric, huge diagonal: the diagonal must not mask the asymmetry.
    a = _random(10, 10, seed=2)
    m = a - a.T + np.diag(np.full(10, 100.0))
    assert symmetry(m)["asymmetry_index"] == pytest.approx(1.0)
    with_diag = symmetry(m, include_diagonal=True)
    assert with_diag["asymmetry_index"] < 0.2
    assert with_diag["pearson"] > 0.9


def test_symmetry_is_invariant_to_relabelling_items() -> None:
    m = _random(15, 15, seed=3) + 0.5 * np.triu(np.ones((15, 15)))
    perm = np.random.default_rng(4).permutation(15)
    a, b = symmetry(m), symmetry(m[np.ix_(perm, perm)])
    for key in a:
        assert a[key] == pytest.approx(b[key])


def test_symmetry_accepts_scores_objects() -> None:
    a = _random(4, 4)
    ids = [str(i) for i in range(4)]
    s = Scores(values=a + a.T, train_ids=ids, query_ids=ids, method="test")
    assert symmetry(s)["pearson"] == pytest.approx(1.0)


def test_symmetry_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        symmetry(np.ones((3, 4)))
    with pytest.raises(ValueError, match="at least 2 items"):
        symmetry(np.ones((1, 1)))
    bad = np.ones((3, 3))
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        symmetry(bad)
    with pytest.raises(ValueError, match="2-D"):
        symmetry(np.ones(3))


# ---------------------------------------------------------------------------- sparsity


def test_gini_of_one_hot_and_constant_columns() -> None:
    n = 50
    one_hot = np.zeros((n, 1))
    one_hot[7, 0] = -3.0  # |values|: sign does not matter
    assert sparsity(one_hot)["gini_mean"] == pytest.approx(1.0 - 1.0 / n)
    assert sparsity(np.full((n, 1), 2.0))["gini_mean"] == pytest.approx(0.0, abs=1e-12)


def test_gini_mean_and_median_over_columns_skip_all_zero_columns() -> None:
    n = 10
    m = np.zeros((n, 3))
    m[0, 0] = 1.0  # Gini 1 - 1/n
    m[:, 1] = 1.0  # Gini 0
    # column 2 is all zero: undefined, skipped
    out = sparsity(m, power_law=False)
    assert out["gini_mean"] == pytest.approx((1 - 1 / n) / 2)
    assert out["gini_median"] == pytest.approx((1 - 1 / n) / 2)


def test_top_share_of_known_column() -> None:
    # 100 examples: one holds 50, nine hold 5 each, ninety hold 0.5 each -> total 140.
    col = np.array([50.0] + [5.0] * 9 + [0.5] * 90)
    rng = np.random.default_rng(0)
    m = rng.permutation(col)[:, None]
    out = sparsity(m, power_law=False)
    assert out["top_1pct_share_mean"] == pytest.approx(50 / 140)
    assert out["top_10pct_share_mean"] == pytest.approx(95 / 140)
    assert out["top_10pct_share_median"] == pytest.approx(95 / 140)


def test_top_share_rounds_to_at_least_one_example() -> None:
    # 30 examples: 1% -> ceil(0.3) = 1 example; 10% -> exactly 3 examples.
    col = np.arange(1.0, 31.0)
    out = sparsity(col[:, None], power_law=False)
    total = col.sum()
    assert out["top_1pct_share_mean"] == pytest.approx(30 / total)
    assert out["top_10pct_share_mean"] == pytest.approx((30 + 29 + 28) / total)
    custom = sparsity(col[:, None], top_fracs=(0.005,), power_law=False)
    assert custom["top_0p5pct_share_mean"] == pytest.approx(30 / total)


def test_top_share_count_is_immune_to_float_error() -> None:
    # 0.07 * 100 == 7.000000000000001 in floating point: still the top 7 examples, not 8.
    col = np.arange(1.0, 101.0)
    out = sparsity(col[:, None], top_fracs=(0.07,), power_law=False)
    assert out["top_7pct_share_mean"] == pytest.approx(sum(range(94, 101)) / col.sum())


def test_sparsity_power_law_keys_and_json() -> None:
    values = _pareto(4000, 2.5, 1.0, seed=5).reshape(200, 20)
    signs = np.where(np.random.default_rng(6).random(values.shape) < 0.5, -1.0, 1.0)
    out = sparsity(values * signs)
    assert out["powerlaw_alpha"] == pytest.approx(2.5, abs=0.25)
    assert out["powerlaw_n_tail"] >= 10
    assert {"powerlaw_xmin", "powerlaw_ks"} <= out.keys()
    json.dumps(out)
    # too few nonzero values to fit a tail: NaN, not an exception
    tiny = sparsity(np.eye(3))
    assert math.isnan(tiny["powerlaw_alpha"]) and tiny["powerlaw_n_tail"] == 0


def test_sparsity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="top_fracs"):
        sparsity(np.ones((5, 2)), top_fracs=(0.0,))
    with pytest.raises(ValueError, match="infinite"):
        sparsity(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="empty"):
        sparsity(np.zeros((0, 3)))


# ---------------------------------------------------------------------------- power law


def test_power_law_recovers_alpha_with_known_xmin() -> None:
    x = _pareto(20_000, 2.5, 1.0, seed=0)
    fit = power_law_tail(x, xmin=1.0)
    assert fit["alpha"] == pytest.approx(2.5, abs=0.1)
    assert fit["xmin"] == 1.0
    assert fit["n_tail"] == 20_000
    assert fit["alpha_se"] == pytest.approx((fit["alpha"] - 1) / math.sqrt(20_000))
    assert fit["ks"] < 0.02


def test_power_law_estimates_xmin_above_a_lognormal_body() -> None:
    rng = np.random.default_rng(1)
    tail = _pareto(20_000, 2.5, 1.0, seed=2)
    body = np.exp(rng.normal(-1.0, 0.5, size=30_000))
    body = body[body < 1.0][:10_000]
    x = rng.permutation(np.concatenate([tail, body]))
    fit = power_law_tail(x)
    assert fit["alpha"] == pytest.approx(2.5, abs=0.1)
    assert 0.9 <= fit["xmin"] <= 2.0
    # Forcing xmin far into the body biases alpha and worsens the fit.
    low = power_law_tail(x, xmin=float(np.quantile(body, 0.1)))
    assert low["ks"] > fit["ks"]
    assert abs(low["alpha"] - 2.5) > 0.1


def test_power_law_bootstrap_p_value_is_seeded() -> None:
    x = _pareto(500, 2.5, 1.0, seed=3)
    a = power_law_tail(x, xmin=1.0, n_bootstrap=20, seed=7)
    b = power_law_tail(x, xmin=1.0, n_bootstrap=20, seed=7)
    assert a["ks_pvalue"] == b["ks_pvalue"]
    assert 0.0 <= a["ks_pvalue"] <= 1.0
    assert a["n_bootstrap"] == 20


def test_power_law_subsamples_for_xmin_selection_but_fits_all_values() -> None:
    x = _pareto(5000, 2.5, 1.0, seed=4)
    fit = power_law_tail(x, max_points=1000)
    assert fit["n_tail"] == int((x >= fit["xmin"]).sum())


def test_power_law_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="strictly positive"):
        power_law_tail(np.array([1.0, 2.0, -1.0]))
    with pytest.raises(ValueError, match="NaN"):
        power_law_tail(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="min_tail"):
        power_law_tail(np.arange(1.0, 6.0))
    with pytest.raises(ValueError, match="lower xmin"):
        power_law_tail(np.arange(1.0, 101.0), xmin=95.0)
    with pytest.raises(ValueError, match="xmin must be"):
        power_law_tail(np.arange(1.0, 101.0), xmin=-1.0)
    with pytest.raises(ValueError, match="no values"):
        power_law_tail(np.array([]))


# ---------------------------------------------------------------------------- noise invariance


def test_noise_invariance_of_identical_matrices_is_one() -> None:
    m = _random(30, 5)
    out = noise_invariance(m, m.copy())
    for key in ("column_spearman_mean", "column_spearman_median", "spearman", "pearson"):
        assert out[key] == pytest.approx(1.0)


def test_noise_invariance_of_monotone_transform_is_one_in_spearman() -> None:
    m = _random(30, 5)
    out = noise_invariance(m, np.exp(3 * m))
    assert out["column_spearman_mean"] == pytest.approx(1.0)
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] < 0.99


def test_noise_invariance_reversed_columns_and_constant_column() -> None:
    m = _random(30, 3)
    noisy = -m
    noisy[:, 2] = 1.0  # constant: rank correlation undefined -> skipped
    out = noise_invariance(m, noisy)
    assert out["column_spearman_mean"] == pytest.approx(-1.0)
    assert out["column_spearman_median"] == pytest.approx(-1.0)


def test_noise_invariance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        noise_invariance(np.ones((4, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="at least 2 training examples"):
        noise_invariance(np.ones((1, 2)), np.ones((1, 2)))
    bad = np.ones((4, 2))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="noisy contains 1 NaN"):
        noise_invariance(np.ones((4, 2)), bad)


# ---------------------------------------------------------------------------- distance decay


def test_block_matrix_gives_block_ratio_two() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    same = labels[:, None] == labels[None, :]
    m = np.where(same, 2.0, 1.0)
    np.fill_diagonal(m, 50.0)  # self-influence must be ignored
    out = distance_decay(m, labels=labels)
    assert out["within_class_mean"] == pytest.approx(2.0)
    assert out["across_class_mean"] == pytest.approx(1.0)
    assert out["block_ratio"] == pytest.approx(2.0)
    assert out["block_difference"] == pytest.approx(1.0)
    assert out["spearman_vs_different_class"] == pytest.approx(-1.0)


def test_block_ratio_is_nan_when_across_mean_is_not_positive() -> None:
    labels = np.array(["a", "a", "b", "b"])
    same = labels[:, None] == labels[None, :]
    out = distance_decay(np.where(same, 1.0, -1.0), labels=labels)
    assert math.isnan(out["block_ratio"])
    assert out["block_difference"] == pytest.approx(2.0)


def test_influence_equal_to_minus_distance_decays_perfectly() -> None:
    features = np.random.default_rng(0).normal(size=(12, 3))
    d = pairwise_distances(features)
    out = distance_decay(-d, distance=d)
    assert out["spearman_vs_distance"] == pytest.approx(-1.0)
    assert set(out) == {"spearman_vs_distance"}


def test_pairwise_distances_are_euclidean() -> None:
    features = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    d = pairwise_distances(features)
    expected = np.array([[0.0, 5.0, 10.0], [5.0, 0.0, 5.0], [10.0, 5.0, 0.0]])
    np.testing.assert_allclose(d, expected)
    assert d.dtype == np.float64
    images = np.zeros((3, 1, 2, 2))
    images[1] += 1.0
    assert pairwise_distances(images)[0, 1] == pytest.approx(2.0)


def test_distance_decay_rejects_bad_input() -> None:
    m = np.ones((4, 4))
    with pytest.raises(ValueError, match="distance.*or.*labels"):
        distance_decay(m)
    with pytest.raises(ValueError, match="distance must be an \\[n, n\\]"):
        distance_decay(m, distance=np.ones((3, 3)))
    with pytest.raises(ValueError, match="labels must be 1-D"):
        distance_decay(m, labels=[0, 1, 0])
    with pytest.raises(ValueError, match="single class"):
        distance_decay(m, labels=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="no within-class pairs"):
        distance_decay(m, labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="square"):
        distance_decay(np.ones((4, 3)), labels=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="at least 2 rows"):
        pairwise_distances(np.ones((1, 3)))


# ---------------------------------------------------------------------------- summarize


def test_summarize_square_matrix() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    a = _random(5, 5)
    out = summarize(a + a.T, labels=labels)
    assert set(out) == {"symmetry", "sparsity", "distance_decay"}
    assert out["symmetry"]["pearson"] == pytest.approx(1.0)
    json.dumps(out)


def test_summarize_non_square_skips_with_reason() -> None:
    out = summarize(_random(6, 3), labels=np.arange(6))
    assert set(out) == {"sparsity", "skipped"}
    assert "square" in out["skipped"]["symmetry"]
    assert "square" in out["skipped"]["distance_decay"]
    no_labels = summarize(_random(4, 4))
    assert "distance_decay" not in no_labels
    assert "no labels or distance" in no_labels["skipped"]["distance_decay"]
