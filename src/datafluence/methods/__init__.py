"""Attribution methods; each returns Scores [n_train, n_query]. Methods never import each
other: what they share lives in finetune/, gradients/, curvature/, models/ and text/."""

from datafluence.methods.empirical import EmpiricalInfluence
from datafluence.methods.gradient_similarity import GradientSimilarity
from datafluence.methods.influence import InfluenceFunction
from datafluence.methods.pbrf import PBRF
from datafluence.methods.prompted import PromptedInfluence
from datafluence.methods.representation_similarity import RepresentationSimilarity
from datafluence.methods.tfidf import TextSimilarity, prefiltered
from datafluence.methods.tracin import TracInCP
from datafluence.methods.trak import TRAK

__all__ = [
    "PBRF",
    "TRAK",
    "EmpiricalInfluence",
    "GradientSimilarity",
    "InfluenceFunction",
    "PromptedInfluence",
    "RepresentationSimilarity",
    "TextSimilarity",
    "TracInCP",
    "prefiltered",
]
