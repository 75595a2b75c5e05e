"""The Simfluence protocol on held-out runs, and a TracIn-CP baseline simulator.

A simulator is judged by rolling it forward from L_0 on a held-out curriculum, on its own
predictions (no teacher forcing), and comparing with the real trajectory:

* all-steps MSE: mean over steps 1..T and test examples of (predicted − real loss)²
  (L_0 is given to the simulator, so it is left out);
* final-step Spearman: rank correlation across test examples of predicted vs real L_T.

Each is reported per held-out run and as mean ± std (ddof=1) over runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from datafluence import stats
from datafluence.scores import Scores
from datafluence.simfluence._checks import (
    check_curricula,
    check_ids,
    check_initial,
    check_losses,
    check_pool,
    pool_fingerprint,
)

METRICS: tuple[str, ...] = ("mse_all_steps", "spearman_final")


class SupportsPredict(Protocol):
    def predict(
        self, curricula: np.ndarray, initial_losses: np.ndarray, pool_ids: Sequence[str]
    ) -> np.ndarray: ...


def all_steps_mse(predicted: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Per-run MSE over steps 1..T and test examples; [R] for [R, T+1, M] inputs.

    A diverged roll-out (Inf/NaN) scores +Inf so that it is never selected.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    if predicted.ndim == 2:
        predicted, real = predicted[None], real[None]
    with np.errstate(over="ignore", invalid="ignore"):
        err = np.mean((predicted[:, 1:] - real[:, 1:]) ** 2, axis=(1, 2))
    return np.where(np.isfinite(err), err, np.inf)


def final_spearman(predicted: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Per-run Spearman correlation across test examples of predicted vs real L_T; [R].

    NaN where it is undefined (fewer than 2 test examples, constant or non-finite values:
    a roll-out that diverged on some examples is not scored on the rest); see
    `datafluence.stats`.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    if predicted.ndim == 2:
        predicted, real = predicted[None], real[None]
    return stats.column_spearman(predicted[:, -1].T, real[:, -1].T)


def evaluate(
    simulator: SupportsPredict,
    curricula: np.ndarray,
    losses: np.ndarray,
    pool_ids: Sequence[str],
) -> pd.DataFrame:
    """One row per held-out run: run, mse_all_steps, spearman_final."""
    pool_ids = check_ids(pool_ids, "pool")
    c = check_curricula(curricula, len(pool_ids), "held-out curricula")
    real = check_losses(losses, c, name="held-out losses")
    predicted = simulator.predict(c, real[:, 0], pool_ids)
    return pd.DataFrame(
        {
            "run": np.arange(c.shape[0]),
            "mse_all_steps": all_steps_mse(predicted, real),
            "spearman_final": final_spearman(predicted, real),
        }
    )


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Mean and std (ddof=1; NaN for a single run) of each metric over held-out runs."""
    out: dict[str, float] = {"n_runs": float(len(table))}
    for name in METRICS:
        values = table[name].to_numpy(dtype=np.float64)
        out[f"{name}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
        out[f"{name}_std"] = (
            float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else np.nan
        )
    return out


def compare(
    simulators: Mapping[str, SupportsPredict],
    curricula: np.ndarray,
    losses: np.ndarray,
    pool_ids: Sequence[str],
) -> pd.DataFrame:
    """One row per simulator (index = its name) with mean ± std of both metrics."""
    rows = {
        name: summarize(evaluate(sim, curricula, losses, pool_ids))
        for name, sim in simulators.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def effect_agreement(
    predicted: np.ndarray,
    predicted_base: np.ndarray,
    real: np.ndarray,
    real_base: np.ndarray,
    focus: np.ndarray | Sequence[int] | None = None,
) -> dict[str, float]:
    """A simulator's answer to a counterfactual curriculum against really training it.

    All four are [T+1, M] trajectories from the same L_0: under the edited curriculum
    (`predicted`, `real`) and under the original one (`*_base`). Besides how close the
    trajectories are (mse_all_steps, spearman_final), the edit's *effect* (edited − base)
    is compared, which is what a counterfactual question asks and what L_0 cannot give
    away: effect_pearson over steps 1..T and test examples, effect_spearman_final across
    test examples at step T, and the mean final effect over the `focus` test examples
    (default: all), real and predicted.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (predicted, predicted_base, real, real_base)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 2:
        raise ValueError(
            f"effect_agreement needs four [T+1, M] trajectories of one shape, got {sorted(shapes)}"
        )
    pred, pred_base, obs, obs_base = arrays
    d_pred, d_real = pred - pred_base, obs - obs_base
    cols = np.arange(pred.shape[1]) if focus is None else np.asarray(focus, dtype=np.int64)
    if cols.size == 0:
        raise ValueError("focus names no test example; give at least one position, or None")
    return {
        "mse_all_steps": float(all_steps_mse(pred, obs)[0]),
        "spearman_final": float(final_spearman(pred, obs)[0]),
        "effect_pearson": stats.pearson(d_pred[1:].ravel(), d_real[1:].ravel()),
        "effect_spearman_final": float(final_spearman(d_pred, d_real)[0]),
        "real_effect_final": float(d_real[-1, cols].mean()),
        "predicted_effect_final": float(d_pred[-1, cols].mean()),
    }


class NoChangeSimulator:
    """L_t = L_0: the reference a simulator must beat to have learnt anything from the runs.

    Its final-step Spearman is the rank correlation of the initial with the final losses,
    which is often high: test examples that start hard tend to stay hard.
    """

    kind = "no-change"

    def predict(
        self,
        curricula: np.ndarray,
        initial_losses: np.ndarray,
        pool_ids: Sequence[str],
    ) -> np.ndarray:
        single = np.ndim(curricula) == 2
        c = check_curricula(curricula, len(check_ids(pool_ids, "pool")))
        l0 = check_initial(initial_losses, c.shape[0], np.shape(initial_losses)[-1])
        out = np.repeat(l0[:, None, :], c.shape[1] + 1, axis=1)
        return out[0] if single else out


class TracInCPSimulator:
    """The additive roll-out TracIn implies: L_t = L_{t−1} − lr_t Σ_{i∈c_t} ⟨∇L_i, ∇L_z⟩.

    The dot products come precomputed, one [N, M] matrix per logged checkpoint; step t
    (parameters θ_{t−1}) uses the latest checkpoint taken at or before t − 1 optimizer
    steps. Pass one checkpoint per step (checkpoint_steps = 0..T−1) for the per-step form.
    Nothing is fitted, so it plugs straight into `evaluate` beside the fitted simulators;
    for held-out runs the checkpoints of a reference run stand in for the run's own.
    """

    kind = "tracin-cp"

    def __init__(
        self,
        dots: np.ndarray,
        lrs: float | Sequence[float] | np.ndarray,
        pool_ids: Sequence[str],
        test_ids: Sequence[str] | None = None,
        checkpoint_steps: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        dots = np.asarray(dots, dtype=np.float64)
        if dots.ndim == 2:
            dots = dots[None]
        if dots.ndim != 3:
            raise ValueError(
                f"dots must be [checkpoints, N pool, M test] (or [N, M]), got shape {dots.shape}"
            )
        self.pool_ids = check_ids(pool_ids, "pool")
        if dots.shape[1] != len(self.pool_ids):
            raise ValueError(
                f"dots have {dots.shape[1]} rows but the pool has {len(self.pool_ids)} ids"
            )
        m = dots.shape[2]
        self.test_ids = check_ids(
            test_ids if test_ids is not None else [str(z) for z in range(m)], "test"
        )
        if len(self.test_ids) != m:
            raise ValueError(f"dots have {m} columns but {len(self.test_ids)} test ids were given")
        if not np.all(np.isfinite(dots)):
            raise ValueError("dots contain NaN/Inf; recompute the gradients at those checkpoints")
        steps = (
            np.arange(dots.shape[0]) if checkpoint_steps is None else np.asarray(checkpoint_steps)
        )
        if steps.shape != (dots.shape[0],) or np.any(np.diff(steps) <= 0):
            raise ValueError(
                f"checkpoint_steps must be {dots.shape[0]} increasing step counts, one per "
                f"checkpoint, got {steps.tolist()}"
            )
        if steps[0] != 0:
            raise ValueError(
                f"the first checkpoint is at step {int(steps[0])}, so the first steps have no "
                "earlier checkpoint; include the starting model (step 0)"
            )
        self.dots = dots
        self.checkpoint_steps = steps.astype(np.int64)
        self.lrs = np.asarray(lrs, dtype=np.float64)
        self._fingerprint = pool_fingerprint(self.pool_ids)

    def _lr(self, steps: int) -> np.ndarray:
        if self.lrs.ndim == 0:
            return np.full(steps, float(self.lrs))
        if self.lrs.shape[0] < steps:
            raise ValueError(
                f"{self.lrs.shape[0]} learning rates given for a {steps}-step curriculum; give "
                "one per step (or a single float)"
            )
        return self.lrs[:steps]

    def predict(
        self,
        curricula: np.ndarray,
        initial_losses: np.ndarray,
        pool_ids: Sequence[str],
    ) -> np.ndarray:
        """Roll forward from L_0: [T+1, M] for one curriculum, [R, T+1, M] for several."""
        check_pool(self._fingerprint, len(self.pool_ids), pool_ids)
        single = np.ndim(curricula) == 2
        c = check_curricula(curricula, len(self.pool_ids))
        l0 = check_initial(initial_losses, c.shape[0], len(self.test_ids))
        R, T, _ = c.shape
        lr = self._lr(T)
        which = np.searchsorted(self.checkpoint_steps, np.arange(T), side="right") - 1
        out = np.empty((R, T + 1, l0.shape[1]))
        out[:, 0] = l0
        for t in range(T):
            out[:, t + 1] = out[:, t] - lr[t] * self.dots[which[t]][c[:, t]].sum(axis=1)
        return out[0] if single else out

    def scores(self) -> Scores:
        """TracIn-CP: Σ_k lr_k ⟨∇L_i, ∇L_z⟩_k over checkpoints; positive = lowers the loss."""
        lr = self._lr(int(self.checkpoint_steps[-1]) + 1)[self.checkpoint_steps]
        values = np.einsum("k,kij->ij", lr, self.dots)
        return Scores(
            values,
            self.pool_ids,
            self.test_ids,
            method="tracin-cp",
            settings={"checkpoint_steps": self.checkpoint_steps.tolist()},
        )
