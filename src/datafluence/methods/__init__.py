"""Attribution methods; each returns Scores [n_train, n_query]."""

from datafluence.methods.empirical import EmpiricalInfluence
from datafluence.methods.gradient_similarity import GradientSimilarity
from datafluence.methods.influence import InfluenceFunction
from datafluence.methods.prompted import PromptedInfluence

__all__ = ["EmpiricalInfluence", "GradientSimilarity", "InfluenceFunction", "PromptedInfluence"]
