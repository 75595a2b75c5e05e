"""Logic desiderata on EIF matrices over a knowledge domain's sentences.

All read one instantiation's matrix (rows = fine-tuned sentence or group, columns = probe
sentences, ids as in the domain file) and the domain's `checks`, so they apply unchanged to
learned and prompted influence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from datafluence.datasets.domains import CONTROL_ID
from datafluence.scores import Scores


def _entry(scores: Scores, row: str, col: str) -> float:
    try:
        i, j = scores.train_ids.index(row), scores.query_ids.index(col)
    except ValueError as err:
        raise ValueError(f"the matrix has no row {row!r} or column {col!r}: {err}") from None
    return float(scores.values[i, j])


def logic_checks(scores: Scores, checks: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """One instantiation: transitivity, consistency, direction, out-of-domain leakage."""
    out: dict[str, float] = {}
    if "transitivity" in checks:
        spec = checks["transitivity"]
        implied = _entry(scores, spec["source"], spec["implied"])
        own = float(np.mean([_entry(scores, spec["source"], p) for p in spec["premises"]]))
        out["transitivity_implied"] = implied
        out["transitivity_premises"] = own
        out["transitivity_ratio"] = implied / own if abs(own) > 1e-12 else float("nan")
    if "consistency" in checks:
        spec = checks["consistency"]
        out["consistency"] = _entry(scores, spec["source"], spec["implied"]) - _entry(
            scores, spec["source"], spec["negation"]
        )
    if "direction" in checks:
        spec = checks["direction"]
        out["direction"] = _entry(scores, spec["source"], spec["correct"]) - _entry(
            scores, spec["source"], spec["reversed"]
        )
    if CONTROL_ID in scores.query_ids:
        j = scores.query_ids.index(CONTROL_ID)
        rows = [i for i, r in enumerate(scores.train_ids) if r != CONTROL_ID]
        out["leakage_mean"] = float(np.mean(scores.values[rows, j]))
        out["leakage_max_abs"] = float(np.max(np.abs(scores.values[rows, j])))
        own_rows = scores.values[[i for i in rows if scores.train_ids[i] in scores.query_ids]]
        scale = float(np.mean(np.abs(own_rows))) if own_rows.size else float("nan")
        out["leakage_relative"] = out["leakage_mean"] / scale if scale > 1e-12 else float("nan")
    return out


def aggregate(per_instance: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and std over instantiations, and the share where consistency/direction > 0."""
    out: dict[str, float] = {"n_instances": len(per_instance)}
    keys = sorted({k for d in per_instance for k in d})
    for key in keys:
        values = np.array([d[key] for d in per_instance if key in d], dtype=float)
        out[f"{key}_mean"] = (
            float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        )
        out[f"{key}_std"] = float(np.nanstd(values)) if np.isfinite(values).any() else float("nan")
        if key in ("consistency", "direction"):
            out[f"{key}_share_positive"] = float(np.mean(values > 0))
        if key == "transitivity_implied":
            out["transitivity_share_positive"] = float(np.mean(values > 0))
    return out


def diffuseness(values: np.ndarray, bins: int = 40) -> dict[str, Any]:
    """The distribution of all EIF values: histogram, share negative, spread."""
    flat = np.asarray(values, dtype=float).ravel()
    if flat.size == 0 or not np.isfinite(flat).all():
        raise ValueError("diffuseness needs a non-empty matrix of finite values")
    counts, edges = np.histogram(flat, bins=bins)
    return {
        "share_negative": float(np.mean(flat < 0)),
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "median_abs": float(np.median(np.abs(flat))),
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }
