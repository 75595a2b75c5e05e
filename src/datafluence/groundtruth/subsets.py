"""Random-subset retraining, the ground truth of the linear datamodeling score (LDS).

M random subsets S_m, each holding round(α N) of the N training examples (drawn without
replacement from a seeded generator); a model is retrained on each subset with every seed
and every query measured; measurements are averaged over seeds. The LDS of an attribution
(metrics.attribution.lds) is then the Spearman correlation, per query, between the predicted
subset effect Σ_{i ∈ S_m} score(i, j) and these measurements (Park et al. 2023, TRAK).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
from datafluence.store import RunDir
from datafluence.tasks import Examples, Task

META_KEY = "subset_retraining"


@dataclass
class SubsetRetraining:
    """Which examples each subset held and what the retrained models measured.

    masks [M, n_train] bool (row m = subset m, columns in `train_ids` order),
    measurements [M, n_query] (mean over seeds), per_seed [n_seeds, M, n_query].
    """

    masks: np.ndarray
    measurements: np.ndarray
    train_ids: tuple[str, ...]
    query_ids: tuple[str, ...]
    alpha: float
    seeds: tuple[int, ...]
    per_seed: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        self.measurements = np.asarray(self.measurements, dtype=np.float64)
        self.train_ids = tuple(str(i) for i in self.train_ids)
        self.query_ids = tuple(str(i) for i in self.query_ids)
        self.seeds = tuple(int(s) for s in self.seeds)
        m = self.masks.shape[0] if self.masks.ndim == 2 else -1
        if self.masks.shape != (m, len(self.train_ids)):
            raise ValueError(
                f"masks must be [n_subsets, n_train] = [M, {len(self.train_ids)}], got "
                f"{self.masks.shape}"
            )
        if self.measurements.shape != (m, len(self.query_ids)):
            raise ValueError(
                f"measurements must be [n_subsets, n_query] = {(m, len(self.query_ids))}, got "
                f"{self.measurements.shape}"
            )
        if self.per_seed is not None:
            self.per_seed = np.asarray(self.per_seed, dtype=np.float64)
            if self.per_seed.shape != (len(self.seeds), *self.measurements.shape):
                raise ValueError(
                    f"per_seed must be [n_seeds, n_subsets, n_query], got {self.per_seed.shape}"
                )

    @property
    def n_subsets(self) -> int:
        return int(self.masks.shape[0])

    def save(self, directory: str | Path) -> Path:
        """Arrays subset_masks.npy, subset_measurements.npy (+ subset_per_seed.npy) and the
        ids and settings under meta.json's "subset_retraining" key; atomic writes."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        store.atomic_save_npy(directory / "subset_masks.npy", self.masks)
        store.atomic_save_npy(directory / "subset_measurements.npy", self.measurements)
        if self.per_seed is not None:
            store.atomic_save_npy(directory / "subset_per_seed.npy", self.per_seed)
        RunDir(directory).update_meta(
            **{
                META_KEY: {
                    "alpha": self.alpha,
                    "seeds": list(self.seeds),
                    "train_ids": list(self.train_ids),
                    "query_ids": list(self.query_ids),
                    "per_seed": self.per_seed is not None,
                    "settings": self.settings,
                }
            }
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SubsetRetraining:
        directory = Path(directory)
        run = RunDir(directory)
        meta = run.meta().get(META_KEY)
        if meta is None or not (directory / "subset_masks.npy").exists():
            raise FileNotFoundError(f"{directory} holds no saved subset retraining")
        per_seed = np.load(directory / "subset_per_seed.npy") if meta["per_seed"] else None
        return cls(
            masks=np.load(directory / "subset_masks.npy"),
            measurements=np.load(directory / "subset_measurements.npy"),
            train_ids=tuple(meta["train_ids"]),
            query_ids=tuple(meta["query_ids"]),
            alpha=float(meta["alpha"]),
            seeds=tuple(meta["seeds"]),
            per_seed=per_seed,
            settings=meta.get("settings", {}),
        )


def random_subsets(n_train: int, n_subsets: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Bool masks [n_subsets, n_train], each with exactly round(α n_train) members."""
    if n_train < 2:
        raise ValueError(f"subsets need at least 2 training examples, got {n_train}")
    if n_subsets < 2:
        raise ValueError(
            f"n_subsets must be at least 2 (a rank correlation needs 2), got {n_subsets}"
        )
    if not (0 < alpha < 1) or not math.isfinite(alpha):
        raise ValueError(f"alpha (the fraction kept) must lie in (0, 1), got {alpha}")
    size = int(round(alpha * n_train))
    if not 0 < size < n_train:
        raise ValueError(
            f"alpha={alpha} keeps {size} of {n_train} examples; every subset must keep at least "
            "one example and leave at least one out"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def subset_retraining(
    task: Task,
    model_factory: ModelFactory,
    train: Examples,
    queries: Examples,
    train_fn: TrainFn | None = None,
    n_subsets: int = 50,
    alpha: float = 0.5,
    seeds: int | Sequence[int] = (0,),
    subset_seed: int = 0,
    run: RunDir | str | Path | None = None,
    progress: bool = True,
) -> SubsetRetraining:
    """Retrain on `n_subsets` random α-subsets with every seed and measure the queries.

    `train_fn(model_factory, subset, seed) -> model` (default: `Trainer(task)`). With
    `run`, each retraining is saved as it finishes (one partition each), a re-run with the
    same settings only trains what is missing, and the finished result is saved there
    (`SubsetRetraining.load(run.path)` reads it back).
    """
    start = time.perf_counter()
    task.check(train, "training")
    task.check(queries, "query")
    train_fn = Trainer(task) if train_fn is None else train_fn
    seeds = check_seeds(seeds)
    masks = random_subsets(len(train), n_subsets, alpha, subset_seed)
    run = RunDir(run) if isinstance(run, str | Path) else run
    settings = {
        "ground_truth": "subset_retraining",
        "trainer": describe_train_fn(train_fn),
        "n_subsets": int(n_subsets),
        "alpha": float(alpha),
        "subset_seed": int(subset_seed),
        "seeds": list(seeds),
        **task.settings(),
    }
    n_s, n_q = len(seeds), len(queries)

    def compute(lo: int, hi: int) -> np.ndarray:
        out = []
        for job in range(lo, hi):
            m, k = divmod(job, n_s)
            subset = train[np.flatnonzero(masks[m]).tolist()]
            out.append(
                retrain_and_measure(
                    train_fn, model_factory, subset, seeds[k], task, queries
                ).numpy()
            )
        return np.stack(out)

    n_jobs = n_subsets * n_s
    if run is None:
        table = np.concatenate(
            [
                compute(job, job + 1)
                for job in progress_bar(
                    range(n_jobs), progress=progress, desc="subsets", unit="fit"
                )
            ]
        )
    else:
        key = store.fingerprint(
            {
                **settings,
                "init": init_fingerprints(model_factory, seeds),
                "train": store.examples_fingerprint(train),
                "queries": store.examples_fingerprint(queries),
            }
        )
        run.path.mkdir(parents=True, exist_ok=True)
        table = run.partitioned(
            f"subsets-{key}",
            n_jobs,
            n_q,
            1,
            compute,
            desc="subsets",
            progress=progress,
            dest=run.path / f"subsets-{key}.npy",
        )
    per_seed = np.asarray(table, dtype=np.float64).reshape(n_subsets, n_s, n_q).transpose(1, 0, 2)
    settings["seconds"] = round(time.perf_counter() - start, 3)
    result = SubsetRetraining(
        masks=masks,
        measurements=per_seed.mean(axis=0),
        train_ids=train.ids,
        query_ids=queries.ids,
        alpha=float(alpha),
        seeds=seeds,
        per_seed=per_seed,
        settings=settings,
    )
    if run is not None:
        result.save(run.path)
    return result
