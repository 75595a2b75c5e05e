"""Simfluence simulators (Guu et al., 2023): per-example parameters that replay training.

For each test example z and a step with batch c_t (a multiset of pool positions),
α(c_t) = Σ_{i∈c_t} A_i(z) and β(c_t) = Σ_{i∈c_t} B_i(z):

* additive (the TracIn ideal)   L_t = L_{t−1} + β(c_t)
* multiplicative                L_t = α(c_t) · L_{t−1}
* linear                        L_t = α(c_t) · L_{t−1} + β(c_t)

Fitting is ridge regression with teacher forcing (the observed L_{t−1} on the right), for
all M test examples at once (see `_ridge`). Prior: A is shrunk towards `a_prior`, by
default 1/b, so that α = 1 ("the step leaves the loss alone") is what the data must argue
against; the paper's plain ridge (A towards 0, i.e. α towards 0, "the loss collapses") is
`a_prior=0.0`. B is always shrunk towards 0. Concretely, with a = A − a_prior and
n_t = |c_t|, the regression is L_t − a_prior·n_t·L_{t−1} = (x_t·a)·L_{t−1} + x_t·B.

λ is chosen on held-out runs: every λ of the grid is fitted on the training runs, rolled
out on the validation runs, and the lowest all-steps MSE wins; by default the simulator is
then refitted on all runs with that λ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, cast

import numpy as np
import pandas as pd

from datafluence import store
from datafluence.scores import Scores
from datafluence.simfluence._checks import (
    check_curricula,
    check_ids,
    check_initial,
    check_losses,
    check_pool,
    count_matrix,
    pool_fingerprint,
)
from datafluence.simfluence._ridge import Solver, choose_solver, ridge_path
from datafluence.simfluence.evaluate import all_steps_mse

DEFAULT_LAMBDAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
MIN_VAL_RUNS = 1


class Simulator:
    """Shared fit / predict / scores; subclasses only say which parameters they have.

    Attributes after `fit`: A_ [N, M] (None for additive), B_ [N, M] (None for
    multiplicative), lam_, solver_, a_prior_, batch_size_, loss_level_ [M],
    occurrences_ [N] (how often each pool example was seen; unseen ones keep the prior),
    selection_ (DataFrame of λ vs validation MSE, when validation runs were given).
    """

    kind: ClassVar[str]
    has_a: ClassVar[bool]
    has_b: ClassVar[bool]

    def __init__(
        self,
        lam: float | Sequence[float] = DEFAULT_LAMBDAS,
        *,
        a_prior: float | Literal["no_change"] = "no_change",
        solver: Solver = "auto",
        refit: bool = True,
        max_bytes: int = 2**28,
    ) -> None:
        lams = (
            (float(cast(float, lam)),)
            if np.ndim(lam) == 0
            else tuple(float(v) for v in cast(Sequence[float], lam))
        )
        if not lams or any(not np.isfinite(v) or v <= 0 for v in lams):
            raise ValueError(
                f"lam must be a positive number or a non-empty grid of them, got {lam}"
            )
        if a_prior != "no_change" and (isinstance(a_prior, str) or not np.isfinite(float(a_prior))):
            raise ValueError(f"a_prior must be 'no_change' or a finite number, got {a_prior!r}")
        choose_solver(solver, 1, 1)  # validates the name
        self.lams = tuple(sorted(lams))
        self.a_prior = a_prior
        self.solver = solver
        self.refit = refit
        self.max_bytes = int(max_bytes)
        self.A_: np.ndarray | None = None
        self.B_: np.ndarray | None = None
        self.selection_: pd.DataFrame | None = None
        self._fitted = False

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        curricula: np.ndarray | Sequence[np.ndarray],
        losses: np.ndarray | Sequence[np.ndarray],
        pool_ids: Sequence[str],
        test_ids: Sequence[str] | None = None,
        *,
        val_curricula: np.ndarray | None = None,
        val_losses: np.ndarray | None = None,
        val_runs: int = 0,
    ) -> Self:
        """Fit on runs: curricula [R, T, b] pool positions, losses [R, T+1, M] (L_0..L_T).

        Validation runs come either explicitly (val_curricula, val_losses) or as the last
        `val_runs` of the given runs; they are required when `lam` is a grid.
        """
        pool = check_ids(pool_ids, "pool")
        c = check_curricula(curricula, len(pool))
        n_test = None if test_ids is None else len(test_ids)
        loss = check_losses(losses, c, n_test)
        m = loss.shape[2]
        tests = check_ids(test_ids if test_ids is not None else [str(z) for z in range(m)], "test")
        vc, vl = self._validation(c, loss, val_curricula, val_losses, val_runs, len(pool), m)
        if val_runs:
            c, loss = c[:-val_runs], loss[:-val_runs]
        n_val = 0 if vc is None else vc.shape[0]
        if len(self.lams) > 1 and n_val < MIN_VAL_RUNS:
            raise ValueError(
                f"choosing λ from {len(self.lams)} values needs at least {MIN_VAL_RUNS} held-out "
                f"run(s), got {n_val}; pass val_runs=k (the last k runs are held out) or "
                "val_curricula/val_losses, or give a single lam"
            )

        self.pool_ids, self.test_ids = pool, tests
        self.selection_ = None
        self._fingerprint = pool_fingerprint(pool)
        self.batch_size_ = int(c.shape[2])
        self.a_prior_ = (
            1.0 / self.batch_size_ if self.a_prior == "no_change" else float(self.a_prior)
        )
        thetas, solver = self._solve(c, loss, self.lams)
        if vc is not None:
            assert vl is not None  # `_validation` gives both or neither
            mses = [
                float(all_steps_mse(self._rollout(*self._unpack(th), vc, vl[:, 0]), vl).mean())
                for th in thetas
            ]
            self.selection_ = pd.DataFrame({"lam": self.lams, "val_mse": mses})
            best = int(np.argmin(mses))  # ties go to the smaller λ (the grid is sorted)
        else:
            best = 0
        self.lam_ = self.lams[best]
        if vc is not None and self.refit:
            c = np.concatenate([c, vc])
            loss = np.concatenate([loss, vl])
            thetas, solver = self._solve(c, loss, (self.lam_,))
            best = 0
        self.A_, self.B_ = self._unpack(thetas[best])
        self.solver_ = solver
        self.n_runs_ = int(c.shape[0])
        self.loss_level_ = loss[:, :-1].mean(axis=(0, 1))
        self.occurrences_ = np.bincount(c.reshape(-1), minlength=len(pool))
        self._fitted = True
        return self

    def _validation(
        self,
        c: np.ndarray,
        loss: np.ndarray,
        val_curricula: np.ndarray | None,
        val_losses: np.ndarray | None,
        val_runs: int,
        n_pool: int,
        m: int,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if (val_curricula is None) != (val_losses is None):
            raise ValueError("give both val_curricula and val_losses, or neither")
        if val_curricula is not None:
            if val_runs:
                raise ValueError("give either val_runs or val_curricula/val_losses, not both")
            vc = check_curricula(val_curricula, n_pool, "val_curricula")
            vl = check_losses(val_losses, vc, m, "val_losses")  # type: ignore[arg-type]
            if vc.shape[2] != c.shape[2] or (self.refit and vc.shape[1] != c.shape[1]):
                raise ValueError(
                    f"validation runs have (T, b) = {vc.shape[1:]} but training runs "
                    f"{c.shape[1:]}; held-out runs need the same batch size (and, to be "
                    "refitted on, the same length): pass matching runs or refit=False"
                )
            return vc, vl
        if val_runs < 0 or val_runs >= c.shape[0]:
            raise ValueError(
                f"val_runs={val_runs} must leave at least one of the {c.shape[0]} runs for "
                "training; collect more runs or hold out fewer"
            )
        if not val_runs:
            return None, None
        return c[-val_runs:], loss[-val_runs:]

    def _blocks(self, lprev: np.ndarray) -> list[np.ndarray | None]:
        """Weights of the feature blocks: L_{t−1} for the A block, 1 (None) for the B block."""
        return ([lprev] if self.has_a else []) + ([None] if self.has_b else [])

    def _solve(
        self, c: np.ndarray, loss: np.ndarray, lams: Sequence[float]
    ) -> tuple[np.ndarray, str]:
        R, T, b = c.shape
        n = len(self.pool_ids)
        x = count_matrix(c, n)
        lprev = loss[:, :-1].reshape(R * T, -1)
        lnext = loss[:, 1:].reshape(R * T, -1)
        # The A prior makes a step of b examples scale the loss by a_prior * b.
        y = lnext - (self.a_prior_ * b if self.has_a else 1.0) * lprev
        weights = self._blocks(lprev)
        solver = choose_solver(self.solver, len(weights) * n, R * T)
        thetas = ridge_path(x, c.reshape(R * T, b), weights, y, lams, solver, self.max_bytes)
        return thetas, solver

    def _unpack(self, theta: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        a = theta[0] + self.a_prior_ if self.has_a else None
        b = theta[-1] if self.has_b else None
        return a, b

    # ------------------------------------------------------------------ using

    def predict(
        self,
        curricula: np.ndarray,
        initial_losses: np.ndarray,
        pool_ids: Sequence[str],
    ) -> np.ndarray:
        """Roll forward from L_0 on its own outputs: [T+1, M] (or [R, T+1, M] for [R, T, b]).

        `pool_ids` must be the pool the curricula index; a simulator fitted on another pool
        is refused rather than silently mis-indexed.
        """
        self._check_fitted()
        check_pool(self._fingerprint, len(self.pool_ids), pool_ids)
        single = np.ndim(curricula) == 2
        c = check_curricula(curricula, len(self.pool_ids))
        l0 = check_initial(initial_losses, c.shape[0], len(self.test_ids))
        out = self._rollout(self.A_, self.B_, c, l0)
        return out[0] if single else out

    @staticmethod
    def _rollout(
        a: np.ndarray | None, b: np.ndarray | None, c: np.ndarray, l0: np.ndarray
    ) -> np.ndarray:
        R, T, _ = c.shape
        out = np.empty((R, T + 1, l0.shape[1]))
        out[:, 0] = l0
        with np.errstate(over="ignore", invalid="ignore"):
            for t in range(T):
                batch = c[:, t]  # [R, b]
                nxt = out[:, t] if a is None else a[batch].sum(axis=1) * out[:, t]
                out[:, t + 1] = nxt if b is None else nxt + b[batch].sum(axis=1)
        return out

    def scores(self, level: float | np.ndarray | None = None) -> Scores:
        """Per-example influence as Scores [pool, test]; positive = lowers the test loss.

        values[i, z] = −[(A_i − 1/b)·ℓ_z + B_i]: how much one more occurrence of i in a
        step lowers z's loss when the loss is at level ℓ_z, relative to a step that leaves
        it alone (α = 1, β = 0). ℓ defaults to the mean observed loss of z during training
        (`loss_level_`); `level=0` gives −B alone. Additive: −B; multiplicative: −(A − 1/b)ℓ.
        The raw A and B are in `parts`.
        """
        self._check_fitted()
        m = len(self.test_ids)
        lvl = self.loss_level_ if level is None else np.broadcast_to(np.asarray(level, float), (m,))
        effect = np.zeros((len(self.pool_ids), m))
        parts: dict[str, np.ndarray] = {}
        if self.A_ is not None:
            effect += (self.A_ - 1.0 / self.batch_size_) * lvl[None]
            parts["A"] = self.A_.astype(np.float32)
        if self.B_ is not None:
            effect += self.B_
            parts["B"] = self.B_.astype(np.float32)
        return Scores(
            -effect,
            self.pool_ids,
            self.test_ids,
            method=f"simfluence-{self.kind}",
            settings=self.settings(level=[float(v) for v in lvl]),
            parts=parts,
        )

    def settings(self, **extra: Any) -> dict[str, Any]:
        self._check_fitted()
        return {
            "kind": self.kind,
            "lam": self.lam_,
            "lams": list(self.lams),
            "a_prior": self.a_prior_,
            "batch_size": self.batch_size_,
            "solver": self.solver_,
            "n_runs": self.n_runs_,
            "n_unseen": int((self.occurrences_ == 0).sum()),
            "pool_fingerprint": self._fingerprint,
            **extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted simulator to one .npz file (atomically); `load_simulator` reads it."""
        self._check_fitted()
        meta = {
            "kind": self.kind,
            "lams": list(self.lams),
            "a_prior": self.a_prior,
            "solver": self.solver,
            "refit": self.refit,
            "max_bytes": self.max_bytes,
            "lam_": self.lam_,
            "solver_": self.solver_,
            "a_prior_": self.a_prior_,
            "batch_size_": self.batch_size_,
            "n_runs_": self.n_runs_,
            "pool_ids": list(self.pool_ids),
            "test_ids": list(self.test_ids),
        }
        arrays = {"loss_level": self.loss_level_, "occurrences": self.occurrences_}
        for name, value in (("A", self.A_), ("B", self.B_)):
            if value is not None:
                arrays[name] = value
        if self.selection_ is not None:
            arrays["selection"] = self.selection_[["lam", "val_mse"]].to_numpy()
        path = Path(path)
        with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        return path

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit() first")


class AdditiveSimulator(Simulator):
    """L_t = L_{t−1} + Σ B_i: each example shifts the loss by a fixed amount (TracIn-ideal)."""

    kind = "additive"
    has_a = False
    has_b = True


class MultiplicativeSimulator(Simulator):
    """L_t = (Σ A_i) · L_{t−1}: each example scales the loss."""

    kind = "multiplicative"
    has_a = True
    has_b = False


class LinearSimulator(Simulator):
    """L_t = (Σ A_i) · L_{t−1} + Σ B_i: the paper's full model."""

    kind = "linear"
    has_a = True
    has_b = True


SIMULATORS: dict[str, type[Simulator]] = {
    cls.kind: cls for cls in (AdditiveSimulator, MultiplicativeSimulator, LinearSimulator)
}


def make_simulator(kind: str, **kwargs: Any) -> Simulator:
    """A simulator by name: 'additive', 'multiplicative' or 'linear'."""
    if kind not in SIMULATORS:
        raise ValueError(f"unknown simulator {kind!r}; choose one of {sorted(SIMULATORS)}")
    return SIMULATORS[kind](**kwargs)


def rollout(
    A: np.ndarray | None,
    B: np.ndarray | None,
    curricula: np.ndarray,
    initial_losses: np.ndarray,
) -> np.ndarray:
    """Simulate L_t = (Σ_{i∈c_t} A_i)·L_{t−1} + Σ_{i∈c_t} B_i from given parameters [N, M].

    A=None gives the additive model, B=None the multiplicative one. For synthetic runs
    with known parameters, and for what-ifs on hand-edited parameters.
    Returns [T+1, M] for one curriculum [T, b], [R, T+1, M] for [R, T, b].
    """
    if A is None and B is None:
        raise ValueError("give A, B or both")
    params = [np.asarray(p, dtype=np.float64) for p in (A, B) if p is not None]
    n, m = params[0].shape
    if any(p.shape != (n, m) for p in params):
        raise ValueError(f"A and B must share one shape [N, M], got {[p.shape for p in params]}")
    single = np.ndim(curricula) == 2
    c = check_curricula(curricula, n)
    l0 = check_initial(initial_losses, c.shape[0], m)
    a = None if A is None else np.asarray(A, dtype=np.float64)
    b = None if B is None else np.asarray(B, dtype=np.float64)
    out = Simulator._rollout(a, b, c, l0)
    return out[0] if single else out


def load_simulator(path: str | Path) -> Simulator:
    """A fitted simulator from the file `Simulator.save` wrote."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; save a fitted simulator there first")
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        arrays = {name: saved[name] for name in saved.files if name != "meta"}
    sim = make_simulator(
        meta["kind"],
        lam=meta["lams"],
        a_prior=meta["a_prior"],
        solver=meta["solver"],
        refit=meta["refit"],
        max_bytes=meta["max_bytes"],
    )
    sim.pool_ids, sim.test_ids = tuple(meta["pool_ids"]), tuple(meta["test_ids"])
    sim._fingerprint = pool_fingerprint(sim.pool_ids)
    sim.lam_, sim.solver_, sim.a_prior_ = meta["lam_"], meta["solver_"], meta["a_prior_"]
    sim.batch_size_, sim.n_runs_ = meta["batch_size_"], meta["n_runs_"]
    sim.A_, sim.B_ = arrays.get("A"), arrays.get("B")
    sim.loss_level_, sim.occurrences_ = arrays["loss_level"], arrays["occurrences"]
    if "selection" in arrays:
        sim.selection_ = pd.DataFrame(arrays["selection"], columns=["lam", "val_mse"])
    sim._fitted = True
    return sim
