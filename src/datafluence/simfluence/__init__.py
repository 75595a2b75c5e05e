"""Simfluence (Guu et al., 2023): learn per-example simulators of training runs.

Record runs (`RunLogger`, `collect_runs`), fit a simulator of how each training example
moves each test loss (`AdditiveSimulator`, `MultiplicativeSimulator`, `LinearSimulator`),
roll it out on counterfactual curricula (`curricula`) and check it against really training
them (`train_curriculum`), and judge it on held-out runs (`evaluate`, `compare`) against
TracIn-CP (`tracin_cp`: gradient dot products at checkpoints of a reference run) and the
do-nothing reference (`NoChangeSimulator`).
"""

from datafluence.simfluence.counterfactual import compare_counterfactuals, counterfactual_edits
from datafluence.simfluence.curricula import (
    duplicate,
    put_first,
    put_last,
    random_curricula,
    random_curriculum,
    remove,
)
from datafluence.simfluence.evaluate import (
    NoChangeSimulator,
    TracInCPSimulator,
    all_steps_mse,
    compare,
    effect_agreement,
    evaluate,
    final_spearman,
    summarize,
)
from datafluence.simfluence.held_out import (
    NO_CHANGE,
    TRACIN,
    evaluate_held_out,
    linear_finding,
)
from datafluence.simfluence.logger import (
    RunLogger,
    collect_runs,
    train_curriculum,
    trainer_callback,
)
from datafluence.simfluence.setups import Setup, classifier_setup, lm_setup
from datafluence.simfluence.simulators import (
    DEFAULT_LAMBDAS,
    SIMULATORS,
    AdditiveSimulator,
    LinearSimulator,
    MultiplicativeSimulator,
    Simulator,
    load_simulator,
    make_simulator,
    rollout,
)
from datafluence.simfluence.tracin import gradient_dots, load_tracin, save_tracin, tracin_cp

__all__ = [
    "DEFAULT_LAMBDAS",
    "NO_CHANGE",
    "SIMULATORS",
    "TRACIN",
    "AdditiveSimulator",
    "LinearSimulator",
    "MultiplicativeSimulator",
    "NoChangeSimulator",
    "RunLogger",
    "Setup",
    "Simulator",
    "TracInCPSimulator",
    "all_steps_mse",
    "classifier_setup",
    "collect_runs",
    "compare",
    "compare_counterfactuals",
    "counterfactual_edits",
    "duplicate",
    "effect_agreement",
    "evaluate",
    "evaluate_held_out",
    "final_spearman",
    "gradient_dots",
    "linear_finding",
    "lm_setup",
    "load_simulator",
    "load_tracin",
    "make_simulator",
    "put_first",
    "put_last",
    "random_curricula",
    "random_curriculum",
    "remove",
    "rollout",
    "save_tracin",
    "summarize",
    "tracin_cp",
    "train_curriculum",
    "trainer_callback",
]
