"""`import datafluence as dfl` is the one way in: every public name, imported lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import datafluence as dfl
from datafluence import methods, metrics, scores, store, tasks


def test_import_is_light_and_loads_no_heavy_dependency():
    code = (
        "import sys, datafluence as dfl; "
        "heavy = [m for m in ('torch', 'pandas', 'transformers', 'scipy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves_to_the_library_object():
    for name in dfl.__all__:
        assert getattr(dfl, name) is not None, name
    assert dfl.InfluenceFunction is methods.InfluenceFunction
    assert dfl.REGISTRY is methods.REGISTRY and dfl.make_method is methods.make_method
    assert dfl.ClassificationTask is tasks.ClassificationTask
    assert dfl.Scores is scores.Scores and dfl.RunDir is store.RunDir
    assert dfl.metrics is metrics and dfl.desiderata.symmetry is metrics.symmetry
    exported = [getattr(dfl, n) for n in dfl.__all__]
    assert all(any(cls is e for e in exported) for cls in methods.REGISTRY.values())
    assert "InfluenceFunction" in dir(dfl)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Influence'"):
        _ = dfl.Influence
