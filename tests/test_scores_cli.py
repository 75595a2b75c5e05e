"""`datafluence scores` / `evaluate` end to end on the bundled MNIST subset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from datafluence.cli import main
from datafluence.scores import Scores


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFLUENCE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def scores(run, method, *extra):
    args = ["scores", "--method", method, "--out", str(run), "--train", "60", "--queries", "5"]
    return CliRunner().invoke(main, [*args, "--epochs", "1", *extra])


def test_scores_then_evaluate(cache):
    identity, ekfac = cache / "identity", cache / "ekfac"
    assert scores(identity, "identity").exit_code == 0
    result = scores(ekfac, "ekfac")
    assert result.exit_code == 0, result.output
    a, b = Scores.load(identity), Scores.load(ekfac)
    assert a.shape == b.shape == (60, 5) and a.train_ids == b.train_ids
    assert np.isfinite(b.values).all() and not np.allclose(a.values, b.values)
    evaluate = ["evaluate", str(identity), str(ekfac), "--against", str(identity), "--json"]
    result = CliRunner().invoke(main, evaluate)
    assert result.exit_code == 0, result.output
    both = json.loads(result.output)
    assert both[str(identity)]["pearson"] == pytest.approx(1.0)
    assert both[str(ekfac)]["pearson"] < 1
    assert "against:identity" in json.loads((ekfac / "metrics.json").read_text())
    # once the scores are saved, nothing of the working matrices stays behind
    assert not (ekfac / "partitions").exists()
    assert sorted(p.name for p in ekfac.glob("*.npy")) == ["parts.per_layer.npy", "scores.npy"]


def test_scores_refuses_other_settings(cache):
    run = cache / "run"
    assert scores(run, "gradsim").exit_code == 0
    refused = scores(run, "gradsim", "--damping", "0.5")
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    unknown = CliRunner().invoke(main, ["scores", "--method", "magic", "--out", str(run)])
    assert unknown.exit_code != 0 and "ekfac" in unknown.output
