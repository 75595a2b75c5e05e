"""`datafluence scores` / `evaluate` end to end on the bundled MNIST subset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from datafluence.cli import main
from datafluence.experiments.scores_cli import make_cli_method, reference
from datafluence.methods import TracInCP
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
    assert scores(run, "kfac").exit_code == 0
    refused = scores(run, "kfac", "--damping", "0.5")
    assert refused.exit_code != 0 and "--overwrite" in refused.output
    unknown = CliRunner().invoke(main, ["scores", "--method", "magic", "--out", str(run)])
    assert unknown.exit_code != 0 and "ekfac" in unknown.output


def test_tracin_is_tracin_cp_over_the_reference_runs_epochs(cache):
    """--method tracin sums lr x gradient dots over the reference model's epoch checkpoints."""
    run, identity, identity_1 = cache / "tracin", cache / "identity", cache / "identity-1"
    result = scores(run, "tracin", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert scores(identity, "identity", "--epochs", "2").exit_code == 0
    got = Scores.load(run)
    settings = json.loads((run / "meta.json").read_text())["settings"]
    assert settings["checkpoints"] == {
        "count": 2, "epochs": [1, 2], "learning_rate": 1e-3, "optimizer": "adam"
    }  # fmt: skip
    assert len(got.settings["checkpoint_fingerprints"]) == 2

    ref = reference("mnist-subset", "mlp", 60, 5, None, 2, checkpoints=True)
    assert ref.checkpoints is not None and len(ref.checkpoints) == 2
    expected = TracInCP(ref.task, ref.checkpoints, ref.recipe.lr).score(
        ref.model, ref.train, ref.queries
    )
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-5, atol=1e-9)
    # Ground truth: lr x (gradient dots of the 1-epoch model + those of the 2-epoch model),
    # i.e. influence with identity curvature on reference models trained that long.
    assert scores(identity_1, "identity").exit_code == 0  # --epochs 1
    dots_1, dots_2 = Scores.load(identity_1).values, Scores.load(identity).values
    scale = np.abs(got.values).max()
    np.testing.assert_allclose(got.values, 1e-3 * (dots_1 + dots_2), rtol=1e-4, atol=1e-5 * scale)
    # not the final model's gradient dot product alone: the first epoch counts
    assert np.abs(got.values - 2e-3 * dots_2).max() > 0.01 * scale
    with pytest.raises(ValueError, match="checkpoints"):
        make_cli_method("tracin", ref.task)
