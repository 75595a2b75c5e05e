"""The shared correlation helpers against scipy.stats, and their one policy for NaN, Inf,
constant and too-short inputs; plus `resolve_rows`, the one reading of `rows=`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats as sps

from datafluence import stats
from datafluence.rows import resolve_rows
from datafluence.tasks import Examples


def scipy_pearson(a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():  # ConstantInputWarning, NaN warnings: the result is NaN
        warnings.simplefilter("ignore")
        return float(sps.pearsonr(a, b).statistic)


def scipy_spearman(a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sps.spearmanr(a, b).statistic)


def random_pairs(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Correlated, independent, tied, reversed and tiny/huge-scale pairs."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    a = rng.normal(size=n)
    return [
        (a, a + rng.normal(scale=0.5, size=n)),
        (a, rng.normal(size=n)),
        (rng.integers(0, 3, size=n).astype(float), rng.integers(0, 4, size=n).astype(float)),
        (a, -(a**3)),
        (a * 1e-200, a * 1e200 + rng.normal(scale=1e199, size=n)),
    ]


@pytest.mark.parametrize("seed", range(10))
def test_pearson_and_spearman_match_scipy_on_random_data(seed):
    for a, b in random_pairs(seed):
        assert stats.pearson(a, b) == pytest.approx(scipy_pearson(a, b), abs=1e-12)
        assert stats.spearman(a, b) == pytest.approx(scipy_spearman(a, b), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_column_versions_match_scipy_column_by_column(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(25, 7))
    b = 0.3 * a + rng.normal(size=(25, 7))
    b[:, 2] = np.round(b[:, 2])  # ties
    a[:, 4] = 1.5  # a constant column: undefined
    b[3, 5] = np.nan  # a NaN: undefined
    pearson = stats.column_pearson(a, b)
    spearman = stats.column_spearman(a, b)
    assert pearson.shape == spearman.shape == (7,)
    for j in range(7):
        want = scipy_pearson(a[:, j], b[:, j])
        assert pearson[j] == pytest.approx(want, abs=1e-12, nan_ok=True)
        want = scipy_spearman(a[:, j], b[:, j])
        assert spearman[j] == pytest.approx(want, abs=1e-12, nan_ok=True)
        assert pearson[j] == pytest.approx(stats.pearson(a[:, j], b[:, j]), nan_ok=True)
        assert spearman[j] == pytest.approx(stats.spearman(a[:, j], b[:, j]), nan_ok=True)
    assert np.isnan(pearson[[4, 5]]).all() and np.isfinite(pearson[[0, 1, 2, 3, 6]]).all()


def test_nan_anywhere_is_undefined_like_scipy_propagate():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    for side in (0, 1):
        x, y = a.copy(), b.copy()
        (x, y)[side][7] = np.nan
        assert np.isnan(scipy_pearson(x, y)) and np.isnan(scipy_spearman(x, y))
        assert np.isnan(stats.pearson(x, y)) and np.isnan(stats.spearman(x, y))


def test_inf_is_undefined_too():
    """scipy would rank an Inf as the largest value; here it makes the result undefined."""
    a = np.arange(6.0)
    b = a.copy()
    b[-1] = np.inf
    assert np.isnan(stats.pearson(a, b)) and np.isnan(stats.spearman(a, b))
    assert np.isnan(stats.column_spearman(a[:, None], -b[:, None])[0])


def test_constant_and_too_short_inputs_are_undefined():
    a = np.arange(5.0)
    for const in (np.zeros(5), np.full(5, 0.1), np.full(5, 3e300)):
        assert np.isnan(scipy_pearson(a, const)) and np.isnan(scipy_spearman(a, const))
        for x, y in ((a, const), (const, a), (const, const)):
            assert np.isnan(stats.pearson(x, y)) and np.isnan(stats.spearman(x, y))
    for n in (0, 1):
        assert np.isnan(stats.pearson(np.ones(n), np.ones(n)))
        assert np.isnan(stats.spearman(np.arange(n), np.arange(n)))
        assert stats.column_pearson(np.ones((n, 3)), np.ones((n, 3))).shape == (3,)
    assert stats.pearson([1, 2], [3, 5]) == pytest.approx(1.0)  # two points: defined, ±1


def test_results_stay_in_range_and_monotone_maps_give_one():
    rng = np.random.default_rng(3)
    a = rng.normal(size=1000)
    assert -1.0 <= stats.pearson(a, 3 * a + 1) <= 1.0
    assert stats.pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert stats.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert stats.spearman(a, -np.exp(a)) == pytest.approx(-1.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="1-D arrays of the same length"):
        stats.pearson(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="1-D"):
        stats.spearman(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        stats.column_spearman(np.ones((3, 2)), np.ones((3, 3)))


# --- resolve_rows ------------------------------------------------------------------------


def five() -> Examples:
    return Examples({"x": torch.zeros(5, 2)}, ("a", "b", "c", "d", "e"))


@pytest.mark.parametrize(
    ("rows", "want"),
    [
        (None, [0, 1, 2, 3, 4]),
        ([3, 1], [3, 1]),
        (["e", "a"], [4, 0]),
        ([0, "c"], [0, 2]),
        ((4,), [4]),
        (range(1, 4), [1, 2, 3]),
        (slice(None, None, 2), [0, 2, 4]),
        (slice(-2, None), [3, 4]),
        (np.array([2, 0], dtype=np.int32), [2, 0]),
        (np.array(["b", "d"]), [1, 3]),
        (np.array([True, False, False, True, False]), [0, 3]),
        (torch.tensor([1, 4]), [1, 4]),
        (torch.tensor([False, True, True, False, False]), [1, 2]),
        ([np.int64(2), torch.tensor(3)], [2, 3]),
    ],
)
def test_resolve_rows_reads_every_form(rows, want):
    got = resolve_rows(rows, five())
    assert got == want and all(type(k) is int for k in got)


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        ([5], ValueError, r"row 5 is outside the training set \(positions 0..4\)"),
        ([-1], ValueError, "row -1 is outside"),
        (["nope"], ValueError, "no training example with id 'nope'"),
        ([1, 1], ValueError, r"duplicates \(1\)"),
        ([1, "b"], ValueError, r"duplicates \(1 and 'b'\)"),
        ([], ValueError, "empty"),
        (np.array([], dtype=int), ValueError, "empty"),
        (slice(7, None), ValueError, "empty"),
        ([1.5], TypeError, "positions or ids, got 1.5"),
        (np.array([1.0, 2.0]), TypeError, "positions or ids, got 1.0"),
        ([True], TypeError, "positions or ids, got True"),
        ("a", TypeError, r"rows=\['a'\]"),
        (3, TypeError, r"rows=\[3\]"),
        ({1, 2}, TypeError, "ordered"),
        (np.zeros((2, 2), dtype=int), ValueError, "1-D"),
        (np.array([True, False]), ValueError, "one flag per training row"),
    ],
)
def test_resolve_rows_names_the_bad_row(rows, error, match):
    with pytest.raises(error, match=match):
        resolve_rows(rows, five())


def test_resolve_rows_role_names_the_set():
    with pytest.raises(ValueError, match="no query example with id 'z'"):
        resolve_rows(["z"], five(), role="query")
