"""Input checks shared by the simulators, curricula helpers and evaluation.

Simulators index parameters by pool position, so a bad position, a ragged run or a NaN
loss would silently produce garbage; every entry point goes through these checks instead
and fails with a message that names the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

from datafluence import store


def pool_fingerprint(pool_ids: Sequence[str]) -> str:
    """A short hash of the ordered pool ids: positions only mean something within one pool."""
    return store.fingerprint([str(i) for i in pool_ids])


def check_ids(ids: Sequence[str], role: str) -> tuple[str, ...]:
    ids = tuple(str(i) for i in ids)
    if not ids:
        raise ValueError(f"{role} ids are empty; give one id per {role} example")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{role} ids must be unique; found duplicates")
    return ids


def _stack(runs: np.ndarray | Sequence[np.ndarray], name: str, length_axis: int) -> np.ndarray:
    """Stack a list of per-run arrays, refusing ragged runs with a clear message."""
    if isinstance(runs, np.ndarray):
        return runs
    arrays = [np.asarray(r) for r in runs]
    if not arrays:
        raise ValueError(f"no runs given in {name}; give at least one run")
    lengths = sorted({a.shape[length_axis] if a.ndim > length_axis else -1 for a in arrays})
    if len(lengths) > 1:
        raise ValueError(
            f"runs of unequal length in {name} (step counts {lengths}); simulators need runs "
            "of a common length T: truncate them to the shortest, or fit them separately"
        )
    return np.stack(arrays)


def check_curricula(
    curricula: np.ndarray | Sequence[np.ndarray], n_pool: int, name: str = "curricula"
) -> np.ndarray:
    """[R, T, b] integer positions into the pool (a single [T, b] run is promoted)."""
    c = _stack(curricula, name, 0)
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3:
        raise ValueError(
            f"{name} must be an integer array [runs, steps, batch] of pool positions, got "
            f"shape {c.shape}"
        )
    if c.size and not np.issubdtype(c.dtype, np.integer):
        if np.issubdtype(c.dtype, np.floating) and np.all(np.mod(c, 1) == 0):
            c = c.astype(np.int64)
        else:
            raise ValueError(
                f"{name} must hold integer positions into the pool, got dtype {c.dtype}; "
                "map example ids to positions (pool_ids.index) first"
            )
    if c.shape[1] == 0 or c.shape[2] == 0:
        raise ValueError(f"{name} has shape {c.shape}: every run needs at least one non-empty step")
    bad = (c < 0) | (c >= n_pool)
    if bad.any():
        r, t, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} names position {int(c[r, t, j])} (run {r}, step {t}) outside the pool of "
            f"{n_pool} examples; positions must index pool_ids (0..{n_pool - 1}): use the pool "
            "the curricula were made for"
        )
    return c.astype(np.int64, copy=False)


def check_losses(
    losses: np.ndarray | Sequence[np.ndarray],
    curricula: np.ndarray,
    n_test: int | None = None,
    name: str = "losses",
) -> np.ndarray:
    """[R, T+1, M] finite float64 losses matching the curricula's runs and steps."""
    loss = _stack(losses, name, 0)
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim == 2:
        loss = loss[None]
    if loss.ndim != 3:
        raise ValueError(
            f"{name} must be a float array [runs, steps + 1, test examples] (L_0 .. L_T), got "
            f"shape {loss.shape}"
        )
    R, T = curricula.shape[:2]
    if loss.shape[0] != R:
        raise ValueError(f"{name} hold {loss.shape[0]} runs but the curricula hold {R}")
    if loss.shape[1] != T + 1:
        raise ValueError(
            f"runs of unequal length: {name} have {loss.shape[1]} entries per run but the "
            f"curricula have {T} steps; losses need T + 1 = {T + 1} entries (L_0 before "
            "training, then one per step)"
        )
    if n_test is not None and loss.shape[2] != n_test:
        raise ValueError(
            f"{name} hold {loss.shape[2]} test examples but {n_test} test ids were given"
        )
    bad = ~np.isfinite(loss)
    if bad.any():
        r, t, z = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contain {int(bad.sum())} NaN/Inf values (first: run {r}, step {t}, test "
            f"example {z}); drop diverged runs or test examples before fitting"
        )
    return loss


def count_matrix(curricula: np.ndarray, n_pool: int) -> sparse.csr_matrix:
    """[R*T, N] counts of each pool position per step: the design shared by all test examples."""
    R, T, b = curricula.shape
    rows = np.repeat(np.arange(R * T), b)
    data = np.ones(R * T * b, dtype=np.float64)
    x = sparse.coo_matrix((data, (rows, curricula.reshape(-1))), shape=(R * T, n_pool))
    return x.tocsr()  # duplicates are summed: a multiset


def check_pool(fitted: str, n_fitted: int, pool_ids: Sequence[str]) -> None:
    """Positions index a pool: refuse curricula made for another pool."""
    given = pool_fingerprint(pool_ids)
    if given != fitted:
        raise ValueError(
            f"pool ids mismatch: the simulator was fitted on a pool with fingerprint {fitted} "
            f"({n_fitted} examples) but these curricula index a pool with fingerprint {given} "
            f"({len(pool_ids)} examples); positions only mean something in their own pool: pass "
            "the pool_ids the simulator was fitted on, or refit it on this pool"
        )


def check_initial(initial_losses: np.ndarray, n_runs: int, n_test: int) -> np.ndarray:
    l0 = np.asarray(initial_losses, dtype=np.float64)
    if l0.ndim == 1:
        l0 = np.broadcast_to(l0, (n_runs, l0.shape[0]))
    if l0.shape != (n_runs, n_test):
        raise ValueError(
            f"initial_losses must be [M] or [runs, M] = [{n_runs}, {n_test}], got shape "
            f"{np.shape(initial_losses)}"
        )
    if not np.all(np.isfinite(l0)):
        raise ValueError(
            "initial_losses contain NaN/Inf; give the measured L_0 of each test example"
        )
    return l0
