"""Retraining ground truths: leave-one-out and random-subset retraining (for the LDS).

Generic over a `train_fn(model_factory, train_subset, seed) -> model`; `Trainer` is the
default for small models. Results are plain arrays, resumable per retraining in a RunDir.
The regression task they are often used with is `datafluence.tasks.RegressionTask`.
"""

from datafluence.groundtruth.loo import leave_one_out
from datafluence.groundtruth.subsets import SubsetRetraining, random_subsets, subset_retraining
from datafluence.groundtruth.training import Trainer, init_model, measure_all

__all__ = [
    "SubsetRetraining",
    "Trainer",
    "init_model",
    "leave_one_out",
    "measure_all",
    "random_subsets",
    "subset_retraining",
]
