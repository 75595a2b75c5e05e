"""Attribution methods behind one contract (`methods.base.Method`), and their registry.

Each returns Scores [n_train, n_query]. Methods never import each other: what they share
lives in methods/base.py, finetune/, gradients/, curvature/, models/ and text/.
"""

from __future__ import annotations

from typing import Any

from datafluence.methods.base import Method
from datafluence.methods.empirical import EmpiricalInfluence
from datafluence.methods.gradient_similarity import GradientSimilarity
from datafluence.methods.influence import InfluenceFunction
from datafluence.methods.pbrf import PBRF
from datafluence.methods.prompted import PromptedInfluence
from datafluence.methods.representation_similarity import RepresentationSimilarity
from datafluence.methods.tfidf import TextSimilarity, prefiltered
from datafluence.methods.tracin import TracInCP
from datafluence.methods.trak import TRAK
from datafluence.tasks import Task

#: every method by its `name`
REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        EmpiricalInfluence,
        PromptedInfluence,
        InfluenceFunction,
        GradientSimilarity,
        TracInCP,
        TRAK,
        RepresentationSimilarity,
        TextSimilarity,
        PBRF,
    )
}

#: short names (the CLI's --method) for a registered method with preset options
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{
        c: ("influence", {"curvature": c})
        for c in ("ekfac", "kfac", "lissa", "cg", "explicit", "identity", "diagonal", "arnoldi")
    },
    "eif": ("empirical", {}),
    "gradsim": ("gradient_similarity", {"kind": "cosine"}),
    "graddot": ("gradient_similarity", {"kind": "dot"}),
    "repsim": ("representation_similarity", {}),
    "tfidf": ("text_similarity", {"kind": "tfidf"}),
    "bm25": ("text_similarity", {"kind": "bm25"}),
}


def make_method(name: str, task: Task | None, **options: Any) -> Method:
    """A method by registry name or alias, with its options (keywords, as the class takes
    them). Text similarity reads no task: `task` is then ignored."""
    if name in ALIASES:
        base, preset = ALIASES[name]
        clash = sorted(set(preset) & set(options))
        if clash:
            raise ValueError(f"{name!r} sets {clash} itself; use {base!r} to choose them")
        name, options = base, {**preset, **options}
    if name not in REGISTRY:
        known = ", ".join(sorted({*REGISTRY, *ALIASES}))
        raise ValueError(f"unknown method {name!r}; choose one of: {known}")
    cls = REGISTRY[name]
    try:
        if not cls.uses_model:
            return cls(**options)
        return cls(task, **options)  # type: ignore[call-arg]
    except TypeError as err:
        raise TypeError(f"bad options for method {name!r}: {err}") from None


__all__ = [
    "ALIASES",
    "PBRF",
    "REGISTRY",
    "TRAK",
    "EmpiricalInfluence",
    "GradientSimilarity",
    "InfluenceFunction",
    "Method",
    "PromptedInfluence",
    "RepresentationSimilarity",
    "TextSimilarity",
    "TracInCP",
    "make_method",
    "prefiltered",
]
