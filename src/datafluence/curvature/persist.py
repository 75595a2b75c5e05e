"""Fitted curvature in a run directory: tensors in safetensors, a JSON header beside them.

The header records the settings, the model fingerprint and the selected layers, so factors
are reused only for the same model and settings; anything else is a clear error, never a
silent reuse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from datafluence import store
from datafluence.curvature.base import Curvature, FitContext

TENSORS = "curvature.safetensors"
HEADER = "curvature.json"


class FactorMismatchError(store.RunMismatchError):
    """Saved curvature belongs to another model (or another selection of its layers)."""


def header(
    curvature: Curvature, ctx: FitContext, settings: dict[str, Any], model_fp: str
) -> dict[str, Any]:
    return {
        "settings": json.loads(json.dumps(settings, default=str)),
        "model": model_fp,
        "layers": ctx.space.describe(),
        "damping_used": curvature.lambdas,
    }


def save(directory: Path, curvature: Curvature, head: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in curvature.state().items()}
    with store.atomic_path(directory / TENSORS) as tmp:
        save_file(tensors, str(tmp))
    store.atomic_write_json(directory / HEADER, head)


def exists(directory: Path) -> bool:
    return (directory / HEADER).exists() and (directory / TENSORS).exists()


def load(directory: Path, curvature: Curvature, ctx: FitContext, head: dict[str, Any]) -> None:
    """Restore saved curvature after checking it was fitted on this model and settings."""
    saved = store.read_json(directory / HEADER)
    if saved.get("layers") != head["layers"] or saved.get("model") != head["model"]:
        raise FactorMismatchError(
            f"{directory} holds curvature fitted on another model (fingerprint "
            f"{saved.get('model')} with layers {[x['name'] for x in saved.get('layers', [])]}, "
            f"now {head['model']} with {[x['name'] for x in head['layers']]}); fit again with "
            "overwrite=True or use a new run directory"
        )
    if saved.get("settings") != head["settings"]:
        changes = "\n  ".join(store._diff(saved.get("settings"), head["settings"])[:20])
        raise store.RunMismatchError(
            f"{directory} holds curvature fitted with other settings:\n  {changes}\n"
            "fit again with overwrite=True or use a new run directory"
        )
    device = ctx.space.parameters()[0].device
    state = {k: v.to(device) for k, v in load_file(str(directory / TENSORS)).items()}
    curvature.load_state(state, ctx)
