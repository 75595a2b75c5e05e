"""datafluence: which training examples made a network behave this way, and what does
learning one more example do to everything else it knows?

    import datafluence as dfl
    task = dfl.ClassificationTask()
    scores = dfl.InfluenceFunction(task, "ekfac").score(model, train, queries)

Everything public is reachable from here; names are imported on first use, so
`import datafluence` itself stays light (torch, pandas and transformers load only when a
name that needs them is touched).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # methods, their contract and registry
    **dict.fromkeys(
        (
            "EmpiricalInfluence",
            "PromptedInfluence",
            "InfluenceFunction",
            "GradientSimilarity",
            "TracInCP",
            "TRAK",
            "RepresentationSimilarity",
            "TextSimilarity",
            "PBRF",
            "Method",
            "REGISTRY",
            "ALIASES",
            "make_method",
            "prefiltered",
        ),
        "datafluence.methods",
    ),
    # tasks and data
    **dict.fromkeys(
        ("Task", "ClassificationTask", "CausalLMTask", "RegressionTask", "Examples"),
        "datafluence.tasks",
    ),
    # results and run directories
    "examples": "datafluence.data",
    "Scores": "datafluence.scores",
    "RunDir": "datafluence.store",
    # fine-tuning recipe, curvature strategies, models
    "FinetuneRecipe": "datafluence.finetune",
    "Curvature": "datafluence.curvature",
    "load_causal_lm": "datafluence.models.language",
    "MLP": "datafluence.models",
    "SmallCNN": "datafluence.models",
}
# subpackages reachable as attributes (dfl.metrics.lds, dfl.desiderata.symmetry, ...)
_MODULES: dict[str, str] = {
    "metrics": "datafluence.metrics",
    "desiderata": "datafluence.metrics.desiderata",
    "logic": "datafluence.metrics.logic",
    "attribution": "datafluence.metrics.attribution",
    "methods": "datafluence.methods",
    "curvature": "datafluence.curvature",
    "simfluence": "datafluence.simfluence",
    "datasets": "datafluence.datasets",
    "groundtruth": "datafluence.groundtruth",
}

__all__ = ["__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'datafluence' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from datafluence import curvature, datasets, groundtruth, methods, metrics, simfluence
    from datafluence.curvature import Curvature
    from datafluence.data import examples
    from datafluence.finetune import FinetuneRecipe
    from datafluence.methods import (
        ALIASES,
        PBRF,
        REGISTRY,
        TRAK,
        EmpiricalInfluence,
        GradientSimilarity,
        InfluenceFunction,
        Method,
        PromptedInfluence,
        RepresentationSimilarity,
        TextSimilarity,
        TracInCP,
        make_method,
        prefiltered,
    )
    from datafluence.metrics import attribution, desiderata, logic
    from datafluence.models import MLP, SmallCNN
    from datafluence.models.language import load_causal_lm
    from datafluence.scores import Scores
    from datafluence.store import RunDir
    from datafluence.tasks import CausalLMTask, ClassificationTask, Examples, RegressionTask, Task
