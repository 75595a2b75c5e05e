"""Counterfactual curricula: edit a real run, train the edit for real, compare with predictions.

A simulator is only useful if its what-ifs come true, so each edit of a held-out run
(remove a group, put it first / last, duplicate the most helpful example, remove the most
helpful examples) is really trained from the run's own start and seed, and every
simulator's predicted effect of the edit is scored against the real one
(`effect_agreement`). The real losses are saved per edit, so a resumed experiment does
not retrain them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from datafluence import store
from datafluence.simfluence.curricula import duplicate, put_first, put_last, remove
from datafluence.simfluence.evaluate import SupportsPredict, effect_agreement
from datafluence.simfluence.held_out import NO_CHANGE
from datafluence.simfluence.logger import train_curriculum
from datafluence.simfluence.setups import Setup
from datafluence.simfluence.simulators import Simulator


def counterfactual_edits(
    setup: Setup,
    linear: Simulator,
    base: np.ndarray,
    group: str,
    *,
    top_fraction: float,
    duplicate_k: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """The edits of curriculum `base`: name -> curriculum, what it does, whose loss it targets.

    Group edits watch the test examples of `group` (all of them if it has none there); the
    "most helpful" edits rank pool examples by `linear`'s mean score over the test set.
    """
    n = len(setup.pool)
    members = np.flatnonzero(setup.pool_groups == group)
    if members.size == 0:
        raise ValueError(
            f"no pool example is in group {group!r}; choose one of "
            f"{sorted(set(setup.pool_groups.tolist()))} (--group)"
        )
    everyone = np.arange(len(setup.test))
    focus = np.flatnonzero(setup.test_groups == group)
    focus = focus if focus.size else everyone  # no test example in the group: watch them all
    helpful = np.asarray(linear.scores().values, dtype=np.float64).mean(axis=1)
    order = np.argsort(-helpful, kind="stable")
    top = order[: max(1, round(top_fraction * n))]
    best = int(order[0])
    g = group
    return {
        f"remove group {g}": dict(
            curriculum=remove(base, members, n, seed=seed),
            focus=focus,
            edit=f"every pool example of group {g} ({members.size}) replaced by random others",
        ),
        f"group {g} first": dict(
            curriculum=put_first(base, members),
            focus=focus,
            edit=f"the run's examples of group {g} moved to its first steps",
        ),
        f"group {g} last": dict(
            curriculum=put_last(base, members),
            focus=focus,
            edit=f"the run's examples of group {g} moved to its last steps",
        ),
        f"duplicate best x{duplicate_k}": dict(
            curriculum=duplicate(base, best, duplicate_k, seed=seed),
            focus=everyone,
            edit=f"{duplicate_k} extra copies of {setup.pool.ids[best]}, the example the "
            "linear simulator finds most helpful on average",
        ),
        f"remove top {top.size}": dict(
            curriculum=remove(base, top, n, seed=seed),
            focus=everyone,
            edit=f"the {top.size} examples the linear simulator finds most helpful replaced by "
            "random others",
        ),
    }


def _real_losses(
    path: Path,
    setup: Setup,
    curriculum: np.ndarray,
    lr: float,
    optimizer: Literal["sgd", "adam"],
    seed: int,
    run: int,
) -> np.ndarray:
    """The edit's real losses: saved ones if they were trained on this very curriculum."""
    if path.exists():
        with np.load(path) as saved:
            if np.array_equal(saved["curriculum"], curriculum):
                return saved["losses"]
    real = train_curriculum(
        setup.make_model,
        setup.pool,
        setup.test,
        setup.task,
        curriculum,
        lr,
        optimizer=optimizer,
        seed=seed,
        run=run,
    )
    with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, curriculum=curriculum, losses=real)
    return real


def compare_counterfactuals(
    folder: Path,
    setup: Setup,
    edits: Mapping[str, Mapping[str, Any]],
    simulators: Mapping[str, SupportsPredict],
    base: np.ndarray,
    base_losses: np.ndarray,
    *,
    lr: float,
    optimizer: Literal["sgd", "adam"],
    seed: int,
    run: int,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Train each edited curriculum for real and compare it with every simulator's answer.

    The base is a run whose real losses are known (index `run` of the collection); an edit
    is trained exactly as that run was (same start, same seed), so the only difference is
    the curriculum. Returns the metrics per edit and, per edit, its curriculum, real losses
    and focus. The do-nothing simulator predicts no effect at all, so it is not scored.
    """
    pool_ids = setup.pool.ids
    out: dict[str, Any] = {}
    runs: dict[str, dict[str, np.ndarray]] = {}
    for name, spec in edits.items():
        path = folder / f"{name.replace(' ', '_')}.npz"
        curriculum = spec["curriculum"]
        real = _real_losses(path, setup, curriculum, lr, optimizer, seed, run)
        entry: dict[str, Any] = {
            "edit": spec["edit"],
            "focus_test_examples": int(len(spec["focus"])),
            "slots_changed": int((curriculum != base).sum()),
        }
        for kind, sim in simulators.items():
            if kind == NO_CHANGE:
                continue
            predicted = sim.predict(curriculum, base_losses[0], pool_ids)
            predicted_base = sim.predict(base, base_losses[0], pool_ids)
            entry[kind] = effect_agreement(
                predicted, predicted_base, real, base_losses, spec["focus"]
            )
        out[name] = entry
        runs[name] = {"curriculum": curriculum, "losses": real, "focus": spec["focus"]}
    return out, runs
