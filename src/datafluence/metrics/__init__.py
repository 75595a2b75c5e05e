"""Metrics over influence matrices: desiderata a good attribution should show (desiderata,
logic) and agreement with ground truth (attribution)."""

from datafluence.metrics.attribution import (
    compare,
    lds,
    loo_correlation,
    mislabel_auc,
    pbrf_agreement,
)
from datafluence.metrics.desiderata import (
    distance_decay,
    noise_invariance,
    pairwise_distances,
    power_law_tail,
    sparsity,
    spurious_sequences,
    summarize,
    symmetry,
)

__all__ = [
    "compare",
    "distance_decay",
    "lds",
    "loo_correlation",
    "mislabel_auc",
    "noise_invariance",
    "pairwise_distances",
    "pbrf_agreement",
    "power_law_tail",
    "sparsity",
    "spurious_sequences",
    "summarize",
    "symmetry",
]
