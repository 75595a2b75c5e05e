"""Attribution methods; each returns Scores [n_train, n_query]."""

from datafluence.methods.empirical import EmpiricalInfluence

__all__ = ["EmpiricalInfluence"]
