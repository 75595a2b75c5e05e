"""Metrics over influence matrices: desiderata a good attribution should show."""

from datafluence.metrics.desiderata import (
    distance_decay,
    noise_invariance,
    pairwise_distances,
    power_law_tail,
    sparsity,
    summarize,
    symmetry,
)

__all__ = [
    "distance_decay",
    "noise_invariance",
    "pairwise_distances",
    "power_law_tail",
    "sparsity",
    "summarize",
    "symmetry",
]
