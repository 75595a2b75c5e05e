"""The mislabel-detection experiment on a tiny setting, and the pieces it is built from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from datafluence.cli import main
from datafluence.experiments.mislabel_detection import (
    METHODS,
    MislabelConfig,
    _build,
    _split,
    curve_at,
    detection_curve,
    flip_labels,
)
from datafluence.methods import TracInCP
from datafluence.models import TrainRecipe, train_classifier

# 30 % of 150 digits flipped, 10 epochs: a setting where a wrong self-score cannot pass
TINY = [
    "--train", "150", "--test", "50", "--flip", "0.3", "--epochs", "10", "--hidden", "128",
    "--trak-dim", "64", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("mislabel") / "run"
    result = CliRunner().invoke(
        main, ["experiment", "mislabel-detection", "--out", str(out), *TINY]
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cli_writes_files_and_detects_mislabels(finished) -> None:
    out, printed = finished
    assert (out / "figures" / "mislabel_curve.png").stat().st_size > 1000
    assert len(list((out / "checkpoints").glob("epoch_*.safetensors"))) == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["setup"]["n_train"] == 150 and metrics["setup"]["n_flipped"] == 45
    assert set(metrics["methods"]) == set(METHODS)
    table = np.genfromtxt(out / "self_scores.csv", delimiter=",", names=True, dtype=None)
    assert len(table) == 150 and table["flipped"].sum() == 45
    assert (table["true_label"] != table["given_label"]).sum() == 45
    for name in ("influence-ekfac", "influence-identity", "tracin-cp", "trak", "loss"):
        assert metrics["methods"][name]["auc"] > 0.7, (name, metrics["methods"][name])  # ~4σ
        assert metrics["methods"][name]["found_top_20%"] > 0.35  # chance: 0.2 ± 0.05
    assert 0.3 < metrics["methods"]["random"]["auc"] < 0.7
    for m in metrics["methods"].values():
        assert 0 <= m["found_top_5%"] <= m["found_top_10%"] <= m["found_top_20%"] <= 1
        assert m["found_top_20%"] <= metrics["oracle"]["found_top_20%"] + 1e-12
    assert "influence-ekfac" in printed and "AUC" in printed and "found @10%" in printed
    assert json.loads((out / "meta.json").read_text())["status"] == "done"


def test_rerun_resumes_and_other_settings_are_refused(finished) -> None:
    out, _ = finished
    kept = sorted((out / "self_scores").glob("*.npy")) + [
        out / "checkpoints" / "epoch_010.safetensors"
    ]
    stamps = [p.stat().st_mtime_ns for p in kept]
    runner = CliRunner()
    again = runner.invoke(main, ["experiment", "mislabel-detection", "--out", str(out), *TINY])
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # nothing recomputed
    refused = runner.invoke(
        main, ["experiment", "mislabel-detection", "--out", str(out), *TINY, "--flip", "0.2"]
    )
    assert refused.exit_code != 0
    assert "other settings" in refused.output and "flip_fraction" in refused.output


def test_checkpoints_are_one_run_and_equal_the_shorter_trainings(finished) -> None:
    """The saved epoch-e weights (one training run) are exactly a run stopped after e epochs
    (the e separate trainings the experiment used to do), so its numbers are unchanged."""
    out, _ = finished
    config = MislabelConfig(
        n_train=150, n_test=50, flip_fraction=0.3, hidden=128,
        train=TrainRecipe(epochs=10, batch_size=32), trak_dim=64,
    )  # fmt: skip  # = TINY
    train_set, _ = _split(config, None)
    labels, _ = flip_labels(train_set.labels, 0.3, 10, config.seed)
    for epoch in (1, 4, 10):
        recipe = TrainRecipe(epochs=epoch, batch_size=32)
        model, _ = train_classifier(
            lambda: _build(config), train_set.images, labels, recipe, "m", "", False, False
        )
        saved = load_file(out / "checkpoints" / f"epoch_{epoch:03d}.safetensors")
        assert saved.keys() == model.state_dict().keys()
        for name, value in model.state_dict().items():
            torch.testing.assert_close(saved[name], value, rtol=0, atol=0)


def test_flip_labels_moves_exactly_the_flagged_labels_to_another_class() -> None:
    labels = torch.arange(200) % 10
    new, flipped = flip_labels(labels, 0.25, 10, seed=3)
    assert flipped.sum() == 50
    assert (new[torch.as_tensor(flipped)] != labels[torch.as_tensor(flipped)]).all()
    assert torch.equal(new[torch.as_tensor(~flipped)], labels[torch.as_tensor(~flipped)])
    assert int(new.min()) >= 0 and int(new.max()) <= 9
    again, flags = flip_labels(labels, 0.25, 10, seed=3)
    assert torch.equal(again, new) and (flags == flipped).all()
    assert not (flip_labels(labels, 0.25, 10, seed=4)[1] == flipped).all()


def test_detection_curve_by_hand() -> None:
    values = np.array([0.9, 0.1, 0.8, 0.3, 0.2])
    flipped = np.array([True, False, False, True, False])
    # checked in order 0 (hit), 2, 3 (hit), 4, 1
    assert detection_curve(values, flipped).tolist() == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert curve_at(detection_curve(values, flipped), 0.2) == 0.5
    assert curve_at(detection_curve(values, flipped), 0.6) == 1.0


def test_tracin_self_score_is_the_diagonal_of_its_scores(make_model, make_examples, task) -> None:
    model, other = make_model(seed=0), make_model(seed=1)
    train = make_examples(9)
    checkpoints = [other.state_dict(), model.state_dict()]
    for dim in (None, 16):
        tracin = TracInCP(task, checkpoints, [0.5, 2.0], projection_dim=dim, chunk_size=4)
        diagonal = np.diag(tracin.score(model, train, train).values)
        np.testing.assert_allclose(
            tracin.self_score(model, train).values[:, 0], diagonal, rtol=1e-5, atol=1e-5
        )
    # for m = -L it is the learning-rate weighted squared gradient norm: positive
    assert (TracInCP(task, checkpoints, 1.0).self_score(model, train).values[:, 0] > 0).all()


def test_bad_settings_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="flip_fraction"):
        MislabelConfig(flip_fraction=1.5)
    with pytest.raises(ValueError, match="flips 0"):
        MislabelConfig(n_train=10, flip_fraction=0.01)
    with pytest.raises(ValueError, match="unknown methods"):
        MislabelConfig(methods=("influence-ekfac", "eif"))
    with pytest.raises(ValueError, match="data must be"):
        MislabelConfig(data="cifar")
    result = CliRunner().invoke(
        main,
        ["experiment", "mislabel-detection", "--out", str(tmp_path / "run"), "--train", "990"],
    )
    assert result.exit_code != 0 and "bundled MNIST subset has 1000 digits" in result.output
    assert not (tmp_path / "run").exists()  # refused before claiming the directory
