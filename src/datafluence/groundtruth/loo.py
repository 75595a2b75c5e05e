"""Leave-one-out retraining: the change of every query measurement when one training example
is left out, averaged over seeds.

effect(i, j) = mean over seeds s of [ m_j(θ_s(all)) − m_j(θ_s(all but i)) ]

positive = having example i in the training set raises query j's measurement, the sign of
every Scores matrix. It is the effect of ONE copy of i, so it compares with score / N of an
influence function (N = the training-set size); correlations do not care about the scale.
With the same seed the full and the leave-one-out model start from the same initial weights
and (for minibatch trainers) the same shuffling stream, which removes most of the noise that
unrelated runs would add.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from datafluence import store
from datafluence.groundtruth.training import (
    ModelFactory,
    Trainer,
    TrainFn,
    check_seeds,
    describe_train_fn,
    init_fingerprints,
    retrain_and_measure,
)
from datafluence.progress import bar as progress_bar
from datafluence.rows import Rows, resolve_rows
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import Examples, Task


def leave_one_out(
    task: Task,
    model_factory: ModelFactory,
    train: Examples,
    queries: Examples,
    train_fn: TrainFn | None = None,
    rows: Rows = None,
    seeds: int | Sequence[int] = (0,),
    run: RunDir | str | Path | None = None,
    progress: bool = True,
) -> Scores:
    """LOO effects [len(rows), n_query] as Scores (method "loo").

    `train_fn(model_factory, subset, seed) -> model` retrains (default: `Trainer(task)`,
    full-batch L-BFGS). `rows`: the examples to leave out, as `datafluence.rows.resolve_rows`
    reads them (positions, ids, a slice or a mask; None: all).
    parts["per_seed"] [n_seeds, n_rows, n_query] keeps each seed's effect; settings hold the
    full models' measurements. With `run`, every retraining is saved as it finishes (one
    partition each) and a re-run with the same settings only trains what is missing.
    """
    start = time.perf_counter()
    task.check(train, "training")
    task.check(queries, "query")
    if len(train) < 2:
        raise ValueError("leave-one-out needs at least 2 training examples")
    train_fn = Trainer(task) if train_fn is None else train_fn
    seeds = check_seeds(seeds)
    index = resolve_rows(rows, train)
    run = RunDir(run) if isinstance(run, str | Path) else run
    settings = {
        "ground_truth": "leave_one_out",
        "trainer": describe_train_fn(train_fn),
        "seeds": list(seeds),
        **task.settings(),
    }

    def without(i: int) -> Examples:
        keep = [k for k in range(len(train)) if k != i]
        return train[keep]

    def full_for(seed: int) -> torch.Tensor:
        return retrain_and_measure(train_fn, model_factory, train, seed, task, queries)

    n_s, n_r, n_q = len(seeds), len(index), len(queries)
    if run is None:
        full = torch.stack([full_for(s) for s in seeds])  # [S, Q]
        effects = np.empty((n_s, n_r, n_q), dtype=np.float64)
        jobs = [(r, k) for r in range(n_r) for k in range(n_s)]
        for r, k in progress_bar(jobs, progress=progress, desc="LOO", unit="fit"):
            after = retrain_and_measure(
                train_fn, model_factory, without(index[r]), seeds[k], task, queries
            )
            effects[k, r] = (full[k] - after).numpy()
    else:
        key = store.fingerprint(
            {
                **settings,
                "init": init_fingerprints(model_factory, seeds),
                "train": store.examples_fingerprint(train),
                "queries": store.examples_fingerprint(queries),
                "rows": index,
            }
        )
        run.path.mkdir(parents=True, exist_ok=True)
        full_rows = []
        for seed in seeds:  # float64 on disk: the effects are small differences of these
            path = run.path / f"loo-{key}-full-seed{seed}.npy"
            if path.exists():
                full_rows.append(torch.from_numpy(np.load(path)))
            else:
                values = full_for(seed)
                store.atomic_save_npy(path, values.numpy())
                full_rows.append(values)
        full = torch.stack(full_rows)

        def compute(lo: int, hi: int) -> np.ndarray:
            out = []
            for job in range(lo, hi):
                r, k = divmod(job, n_s)
                after = retrain_and_measure(
                    train_fn, model_factory, without(index[r]), seeds[k], task, queries
                )
                out.append((full[k] - after).numpy())
            return np.stack(out)

        table = run.partitioned(
            f"loo-{key}",
            n_r * n_s,
            n_q,
            1,
            compute,
            desc="LOO",
            progress=progress,
            dest=run.path / f"loo-{key}.npy",
        )
        effects = np.asarray(table, dtype=np.float64).reshape(n_r, n_s, n_q).transpose(1, 0, 2)
    settings.update(
        full_measurements=full.tolist(),
        rows=[train.ids[i] for i in index],
        n_train_total=len(train),
        scale="one copy of each example: compare with influence score / N",
        seconds=round(time.perf_counter() - start, 3),
    )
    return Scores(
        effects.mean(axis=0),
        tuple(train.ids[i] for i in index),
        queries.ids,
        method="loo",
        settings=settings,
        parts={"per_seed": effects.astype(np.float32)},
    )
