"""Random curricula for training runs, and the counterfactual edits a simulator answers.

A curriculum is an integer array [T, b] (or [R, T, b] for R runs) of positions in the pool:
step t trains on the multiset curriculum[t]. Every function is pure numpy and seeded, so
the same call always gives the same curriculum; run r of a seed never depends on how many
other runs were drawn (each run has its own generator, seeded by (seed, r)).

Counterfactual edits keep the shape [T, b]: removing examples replaces each of their
occurrences by a random other pool example (so the number of steps and the batch size, and
with them the learning-rate schedule, stay as they were) rather than shortening the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_curriculum(
    n_pool: int,
    steps: int,
    batch_size: int,
    *,
    subset_size: int | None = None,
    seed: int = 0,
    run: int = 0,
    replace: bool = False,
) -> np.ndarray:
    """One run's [T, b] curriculum: a random subset of the pool in a random order.

    The run draws `subset_size` distinct examples (default: the whole pool). Without
    replacement (default) it passes through the subset in epochs, each a fresh random
    permutation, so every example is seen equally often up to one; a batch that straddles
    two epochs may hold an example twice. With `replace=True` each slot is an independent
    uniform draw from the subset (duplicates anywhere).
    """
    p = n_pool if subset_size is None else subset_size
    if n_pool < 1 or steps < 1 or batch_size < 1:
        raise ValueError(
            f"need n_pool, steps and batch_size >= 1, got {n_pool}, {steps}, {batch_size}"
        )
    if not 1 <= p <= n_pool:
        raise ValueError(f"subset_size must be between 1 and the pool size {n_pool}, got {p}")
    rng = np.random.default_rng([int(seed), int(run)])
    subset = rng.choice(n_pool, size=p, replace=False)
    need = steps * batch_size
    if replace:
        stream = rng.choice(subset, size=need, replace=True)
    else:
        epochs = -(-need // p)
        stream = np.concatenate([rng.permutation(subset) for _ in range(epochs)])[:need]
    return stream.reshape(steps, batch_size).astype(np.int64)


def random_curricula(
    n_pool: int,
    runs: int,
    steps: int,
    batch_size: int,
    *,
    subset_size: int | None = None,
    seed: int = 0,
    replace: bool = False,
) -> np.ndarray:
    """[R, T, b]: `random_curriculum` for runs 0..R−1 of one seed."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    return np.stack(
        [
            random_curriculum(
                n_pool,
                steps,
                batch_size,
                subset_size=subset_size,
                seed=seed,
                run=r,
                replace=replace,
            )
            for r in range(runs)
        ]
    )


def remove(
    curricula: np.ndarray,
    group: Sequence[int] | np.ndarray,
    n_pool: int,
    *,
    seed: int = 0,
    candidates: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Every occurrence of the group replaced by a uniform draw from the rest of the pool.

    `candidates` restricts the replacements (e.g. to the run's own subset); by default they
    are all pool positions outside the group.
    """
    c = _as_curricula(curricula, n_pool)
    group_set = _group(group, n_pool)
    pool = np.arange(n_pool) if candidates is None else _group(candidates, n_pool)
    pool = pool[~np.isin(pool, group_set)]
    if pool.size == 0:
        raise ValueError(
            "no examples left to replace the removed group with; give candidates outside the group"
        )
    out = c.copy()
    hit = np.isin(out, group_set)
    rng = np.random.default_rng([int(seed), 1])
    out[hit] = rng.choice(pool, size=int(hit.sum()), replace=True)
    return out if np.ndim(curricula) == 3 else out[0]


def duplicate(curricula: np.ndarray, example: int, k: int, *, seed: int = 0) -> np.ndarray:
    """`k` extra occurrences of one example per run, written over random other slots.

    The displaced examples are dropped, so the run keeps its length and batch size.
    """
    c = _as_curricula(curricula)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    out = c.copy()
    flat = out.reshape(out.shape[0], -1)
    rng = np.random.default_rng([int(seed), 2])
    for r in range(flat.shape[0]):
        free = np.flatnonzero(flat[r] != example)
        if free.size < k:
            raise ValueError(
                f"run {r} has only {free.size} slots not already holding example {example}; "
                f"cannot add {k} copies without changing the run's length"
            )
        flat[r, rng.choice(free, size=k, replace=False)] = example
    return out.reshape(c.shape) if np.ndim(curricula) == 3 else out[0]


def put_first(curricula: np.ndarray, group: Sequence[int] | np.ndarray) -> np.ndarray:
    """Every occurrence of the group moved to the start of its run (others keep their order)."""
    return _move(curricula, group, first=True)


def put_last(curricula: np.ndarray, group: Sequence[int] | np.ndarray) -> np.ndarray:
    """Every occurrence of the group moved to the end of its run (others keep their order)."""
    return _move(curricula, group, first=False)


def _move(curricula: np.ndarray, group: Sequence[int] | np.ndarray, first: bool) -> np.ndarray:
    c = _as_curricula(curricula)
    g = _group(group)
    flat = c.reshape(c.shape[0], -1)
    out = np.empty_like(flat)
    for r in range(flat.shape[0]):
        inside = np.isin(flat[r], g)
        parts = (flat[r][inside], flat[r][~inside])
        out[r] = np.concatenate(parts if first else parts[::-1])
    out = out.reshape(c.shape)
    return out if np.ndim(curricula) == 3 else out[0]


def _as_curricula(curricula: np.ndarray, n_pool: int | None = None) -> np.ndarray:
    c = np.asarray(curricula)
    if c.ndim not in (2, 3) or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(
            f"a curriculum is an integer array [T, b] or [R, T, b] of pool positions, got "
            f"dtype {c.dtype} and shape {c.shape}"
        )
    if (c < 0).any() or (n_pool is not None and (c >= n_pool).any()):
        bound = "" if n_pool is None else f" of {n_pool} examples"
        raise ValueError(
            f"the curriculum names positions outside the pool{bound} (found {int(c.min())} to "
            f"{int(c.max())}); use the pool it was made for"
        )
    return c if c.ndim == 3 else c[None]


def _group(group: Sequence[int] | np.ndarray, n_pool: int | None = None) -> np.ndarray:
    g = np.unique(np.asarray(group, dtype=np.int64).reshape(-1))
    if g.size == 0:
        raise ValueError("the group is empty; name at least one pool position")
    if g[0] < 0 or (n_pool is not None and g[-1] >= n_pool):
        bound = "non-negative" if n_pool is None else f"in 0..{n_pool - 1}"
        raise ValueError(f"group positions must be pool positions ({bound}), got {g.tolist()}")
    return g
