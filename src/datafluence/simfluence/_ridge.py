"""Batched ridge regression for the Simfluence designs, one problem per test example.

For test example z the features at step t are blocks [w_1(t, z) x_t, ..., w_P(t, z) x_t],
with x_t the [N] count vector of the batch (shared by every z) and w_p either the observed
previous loss L_{t-1}(z) or 1. All M problems share X, so they are solved together:

* shared design (every w_p = 1, the additive simulator): one solve of XᵀX + λI
  (or of the kernel XXᵀ + λI) with M right-hand sides;
* per-z design (multiplicative, linear): the primal Gram Xᵀ diag(w_p w_q) X is formed for a
  chunk of test examples at once with one sparse pair-incidence product (R*T*b^2 work per
  test example, never R*T*N^2), giving [m, P*N, P*N]; the dual kernel is
  K_z = (Σ_p w_p w_pᵀ) ⊙ XXᵀ, [m, R*T, R*T]. `solver="auto"` takes the smaller system:
  primal when P*N <= R*T (more steps than parameters, the usual case), dual otherwise.

The penalty is λ‖θ‖² added to the *sum* of squared errors over all steps of all runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import linalg, sparse

Solver = Literal["auto", "primal", "dual"]
CACHE_BYTES = 2**23  # matrices of one chunk of test examples (see ridge_path)


def choose_solver(solver: Solver, n_params: int, n_rows: int) -> Literal["primal", "dual"]:
    if solver not in ("auto", "primal", "dual"):
        raise ValueError(f"unknown solver {solver!r}; choose 'auto', 'primal' or 'dual'")
    if solver != "auto":
        return solver
    return "primal" if n_params <= n_rows else "dual"


def ridge_path(
    x: sparse.csr_matrix,
    batches: np.ndarray,
    weights: Sequence[np.ndarray | None],
    y: np.ndarray,
    lams: Sequence[float],
    solver: Literal["primal", "dual"],
    max_bytes: int = 2**28,
) -> np.ndarray:
    """Ridge solutions for every λ: [n_lams, P, N, M].

    x: [rows, N] counts; batches: [rows, b] positions (the same multisets as x);
    weights: P entries, each [rows, M] or None (= all ones); y: [rows, M] targets.
    """
    rows, n = x.shape
    m_total = y.shape[1]
    p = len(weights)
    out = np.empty((len(lams), p, n, m_total))
    if all(w is None for w in weights):
        theta = _shared(x, y, lams, solver)
        out[:, 0] = theta
        return out
    d = p * n if solver == "primal" else rows
    if 8 * d * d > 16 * max_bytes:
        raise MemoryError(
            f"one test example's {solver} system is {d}x{d} ({8 * d * d / 2**30:.1f} GiB); "
            "the primal form grows with the pool (2N for linear), the dual with the steps "
            "(runs x T): use the other solver, fewer runs or a smaller pool, or raise max_bytes"
        )
    # Test examples go through in chunks that bound memory and, where systems are large,
    # keep a chunk's matrices in cache: batching saves Python overhead for small systems,
    # while for large ones the per-system O(d³) work dominates and streaming a big stack
    # through memory made the batch slower than a loop.
    chunk = max(1, min(int(max_bytes // (8 * 2 * d * d)), CACHE_BYTES // (8 * d * d)))
    xxt = (x @ x.T).toarray() if solver == "dual" else None
    for start in range(0, m_total, chunk):
        zs = slice(start, min(start + chunk, m_total))
        m = zs.stop - zs.start
        w = [np.ones((rows, m)) if wp is None else wp[:, zs] for wp in weights]
        yz = y[:, zs]
        if solver == "primal":
            gram = _grams(batches, n, w)
            rhs = np.concatenate([(x.T @ (wp * yz)).T for wp in w], axis=1)  # [m, P*N]
            sols = _solve_path(gram, rhs, lams)  # [n_lams, m, P*N]
            out[:, :, :, zs] = sols.reshape(len(lams), m, p, n).transpose(0, 2, 3, 1)
        else:
            outer = sum(wp.T[:, :, None] * wp.T[:, None, :] for wp in w)  # [m, rows, rows]
            assert xxt is not None  # the dual solver computed it above
            kernel = outer * xxt[None]
            del outer
            alphas = _solve_path(kernel, yz.T, lams)  # [n_lams, m, rows]
            for k in range(len(lams)):
                for q, wp in enumerate(w):
                    out[k, q, :, zs] = x.T @ (wp * alphas[k].T)
    return out


def _shared(x: sparse.csr_matrix, y: np.ndarray, lams: Sequence[float], solver: str) -> np.ndarray:
    """One design for all test examples: one solve per λ with M right-hand sides."""
    if solver == "primal":
        gram = (x.T @ x).toarray()
        rhs = x.T @ y
        return _solve_path(gram[None], rhs.T[None], lams)[:, 0].transpose(0, 2, 1)
    kernel = (x @ x.T).toarray()
    alphas = _solve_path(kernel[None], y.T[None], lams)[:, 0]  # [n_lams, M, rows]
    return np.stack([x.T @ a.T for a in alphas])


def _grams(batches: np.ndarray, n: int, w: list[np.ndarray], max_nnz: int = 2**24) -> np.ndarray:
    """[m, P*N, P*N] Gram matrices Σ_t w_p w_q x_t x_tᵀ, blocks (p, q), built in row chunks."""
    rows, b = batches.shape
    m = w[0].shape[1]
    p = len(w)
    flat = {(i, j): np.zeros((n * n, m)) for i in range(p) for j in range(i, p)}
    step = max(1, max_nnz // (b * b))
    for s in range(0, rows, step):
        c = batches[s : s + step]
        r = c.shape[0]
        pair_rows = (c[:, :, None] * n + c[:, None, :]).reshape(-1)
        cols = np.repeat(np.arange(r), b * b)
        pairs = sparse.coo_matrix(
            (np.ones(pair_rows.size), (pair_rows, cols)), shape=(n * n, r)
        ).tocsr()
        for (i, j), acc in flat.items():
            acc += pairs @ (w[i][s : s + step] * w[j][s : s + step])
    gram = np.empty((m, p * n, p * n))
    for (i, j), acc in flat.items():
        block = acc.reshape(n, n, m).transpose(2, 0, 1)
        gram[:, i * n : (i + 1) * n, j * n : (j + 1) * n] = block
        if i != j:
            gram[:, j * n : (j + 1) * n, i * n : (i + 1) * n] = block.transpose(0, 2, 1)
    return gram


def _solve_path(gram: np.ndarray, rhs: np.ndarray, lams: Sequence[float]) -> np.ndarray:
    """(G + λI)⁻¹ r for a stack of symmetric G [m, d, d] and r [m, d] or [m, k, d].

    One direct solve per λ: measured faster than one shared eigendecomposition for grids
    of up to tens of values (LAPACK's eigh is several times a solve, and slower still on
    the near-singular Grams that rarely-seen examples produce).
    Returns [n_lams, m, d] (or [n_lams, m, k, d]).
    """
    m, d, _ = gram.shape
    eye = np.eye(d)
    multi = rhs.ndim == 3
    r = rhs if multi else rhs[:, None, :]  # [m, k, d]
    sols = np.empty((len(lams), *r.shape))
    for i, lam in enumerate(lams):
        if m == 1:  # one design, many right-hand sides: a Cholesky-based solve
            sols[i, 0] = linalg.solve(
                gram[0] + lam * eye, r[0].T, assume_a="pos", check_finite=False
            ).T
        else:  # one small system per test example, solved as a batch
            sols[i] = _batched_pos_solve(gram + lam * eye, r.transpose(0, 2, 1)).transpose(0, 2, 1)
    return sols if multi else sols[:, :, 0, :]


@functools.cache
def _scipy_batches() -> bool:
    """Whether scipy.linalg.solve takes stacks of systems (SciPy >= 1.15)."""
    try:
        linalg.solve(np.ones((2, 1, 1)), np.ones((2, 1, 1)), assume_a="pos")
    except ValueError:
        return False
    return True


def _batched_pos_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a⁻¹ b for a stack of symmetric positive definite a [m, d, d] and b [m, d, k].

    Cholesky per system (half LU's work; ~30 % faster measured at d = 300 .. 1000) where
    SciPy batches it, LU (numpy) otherwise or if a system is not numerically definite.
    """
    if _scipy_batches():
        try:
            return linalg.solve(a, b, assume_a="pos", check_finite=False)
        except linalg.LinAlgError:
            pass
    return np.linalg.solve(a, b)
