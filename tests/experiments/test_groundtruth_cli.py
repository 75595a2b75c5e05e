"""`datafluence groundtruth` (loo / lds / pbrf) and `datafluence evaluate RUN ... --against GT`
end to end on the bundled MNIST subset, at tiny sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from datafluence.cli import main
from datafluence.experiments.scores_cli import reference_setup
from datafluence.groundtruth import SubsetRetraining, Trainer
from datafluence.groundtruth import loo as loo_module
from datafluence.groundtruth import subsets as subsets_module
from datafluence.groundtruth.training import measure_all
from datafluence.models import MLP
from datafluence.scores import Scores
from datafluence.store import RunDir

SETUP = ["--train", "16", "--queries", "3", "--epochs", "1"]
RETRAIN = ["--steps", "5", "--seeds", "0"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFLUENCE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def groundtruth(out, kind: str, *extra: str):
    extra = extra or groundtruth_args(kind)
    result = invoke("groundtruth", "--kind", kind, "--out", out, *SETUP, *extra)
    assert result.exit_code == 0, result.output
    return result


def scores(out, method: str, *setup: str):
    result = invoke("scores", "--method", method, "--out", out, *(setup or SETUP))
    assert result.exit_code == 0, result.output


def evaluate_json(against, *runs) -> dict:
    result = invoke("evaluate", *runs, "--against", against, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture()
def estimates(cache):
    scores(cache / "identity", "identity")
    scores(cache / "ekfac", "ekfac")
    return cache / "identity", cache / "ekfac"


@pytest.mark.filterwarnings("ignore:PBRF did not reach")  # 10 evaluations: a wiring check
@pytest.mark.parametrize(
    ("kind", "headline"), [("loo", "pearson"), ("lds", "lds"), ("pbrf", "pearson")]
)
def test_groundtruth_then_evaluate_side_by_side(cache, estimates, kind, headline):
    gt = cache / f"gt-{kind}"
    groundtruth(gt, kind)
    meta = RunDir(gt).meta()
    assert meta["kind"] == kind and meta["status"] == "done"
    assert not (gt / "partitions").exists()
    table = invoke("evaluate", *estimates, "--against", gt)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert headline in lines[1]
    assert any("identity" in line for line in lines[2:]) and any("ekfac" in ln for ln in lines[2:])
    result = evaluate_json(gt, *estimates)
    for run in estimates:
        assert np.isfinite(result[str(run)][headline])
        saved = json.loads((run / "metrics.json").read_text())[f"against:gt-{kind}"]
        assert saved[headline] == pytest.approx(result[str(run)][headline])
    again = invoke("groundtruth", "--kind", kind, "--out", gt, *SETUP, *groundtruth_args(kind))
    assert again.exit_code == 0 and "nothing to do" in again.output


def groundtruth_args(kind: str) -> tuple[str, ...]:
    if kind == "pbrf":
        return ("--rows", "0:3", "--damping", "0.1", "--max-evals", "10")
    return (*RETRAIN, "--subsets", "6") if kind == "lds" else RETRAIN


def test_loo_is_the_documented_recipe(cache):
    """One entry by hand: a fresh seeded MLP trained by full-batch Adam (5 steps) on all 16
    examples, minus one trained without example 2, query log-probabilities."""
    gt = cache / "loo"
    groundtruth(gt, "loo", *RETRAIN, "--rows", "2,5")
    loo = Scores.load(gt)
    model, task, train, queries = reference_setup("mnist-subset", "mlp", 16, 3, None, 1)
    assert loo.method == "loo" and loo.train_ids == (train.ids[2], train.ids[5])
    assert loo.query_ids == queries.ids
    trainer = Trainer(task, optimizer="adam", epochs=5, lr=1e-3, batch_size=None)
    full = measure_all(trainer(MLP, train, 0), task, queries)
    without = measure_all(trainer(MLP, train[[k for k in range(16) if k != 2]], 0), task, queries)
    np.testing.assert_allclose(loo.values[0], (full - without).numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(loo.values).max() > 0


def test_exact_answers_score_one_and_reversed_scores_flip(cache, estimates):
    identity = estimates[0]
    loo, lds = cache / "gt-loo", cache / "gt-lds"
    groundtruth(loo, "loo")
    groundtruth(lds, "lds")
    assert evaluate_json(loo, loo)[str(loo)]["pearson"] == pytest.approx(1.0)
    # a datamodel fitted to the subsets reproduces every measurement exactly (6 subsets,
    # 16 unknowns): its predicted subset effects rank the subsets perfectly
    truth = SubsetRetraining.load(lds)
    exact = np.linalg.lstsq(truth.masks.astype(np.float64), truth.measurements, rcond=None)[0]
    Scores(exact, truth.train_ids, truth.query_ids, method="datamodel").save(cache / "exact")
    Scores(-exact, truth.train_ids, truth.query_ids, method="datamodel").save(cache / "reversed")
    base = Scores.load(identity)
    Scores(-base.values, base.train_ids, base.query_ids, method="negated").save(cache / "negated")
    result = evaluate_json(lds, cache / "exact", cache / "reversed", identity, cache / "negated")
    assert result[str(cache / "exact")]["lds"] == pytest.approx(1.0)
    assert result[str(cache / "reversed")]["lds"] == pytest.approx(-1.0)
    assert result[str(cache / "negated")]["lds"] == pytest.approx(-result[str(identity)]["lds"])
    against_loo = evaluate_json(loo, identity, cache / "negated")
    assert against_loo[str(cache / "negated")]["pearson"] == pytest.approx(
        -against_loo[str(identity)]["pearson"]
    )
    shown = CliRunner().invoke(main, ["show", str(lds)])  # masks, not scores: still described
    assert shown.exit_code == 0 and "6 retrained subsets" in shown.output
    assert "none yet" not in shown.output


def test_mismatched_examples_name_the_fix(cache):
    groundtruth(cache / "gt", "loo")
    scores(cache / "other", "identity", "--train", "12", "--queries", "3", "--epochs", "1")
    result = invoke("evaluate", cache / "other", "--against", cache / "gt")
    assert result.exit_code != 0
    assert "--train 12 vs 16" in result.output and "re-run" in result.output
    unfinished = cache / "unfinished"
    unfinished.mkdir()
    result = invoke("evaluate", unfinished, "--against", cache / "gt")
    assert result.exit_code != 0 and "holds no scores" in result.output


def test_groundtruth_refuses_unused_options_and_other_settings(cache):
    base = ["groundtruth", "--out", cache / "gt", *SETUP]
    refused = invoke(*base, "--kind", "lds", "--rows", "0:3")
    assert refused.exit_code != 0 and "--rows (loo/pbrf only)" in refused.output
    refused = invoke(*base, "--kind", "pbrf", "--seeds", "1")
    assert refused.exit_code != 0 and "--seeds (loo/lds only)" in refused.output
    refused = invoke(*base, "--kind", "loo", "--rows", "a:3")
    assert refused.exit_code != 0 and "0:50" in refused.output
    groundtruth(cache / "gt", "loo", *RETRAIN, "--rows", "0:2")
    other = invoke(*base, "--kind", "loo", *RETRAIN, "--rows", "0:3")
    assert other.exit_code != 0 and "--overwrite" in other.output
    replaced = invoke(*base, "--kind", "loo", *RETRAIN, "--rows", "0:3", "--overwrite")
    assert replaced.exit_code == 0 and Scores.load(cache / "gt").shape == (3, 3)


@pytest.mark.parametrize(
    ("kind", "module", "calls_left"),
    [("loo", loo_module, 16 - 3), ("lds", subsets_module, 6 - 2)],  # jobs not yet saved,
)
def test_interrupted_groundtruth_resumes_with_identical_results(
    cache, monkeypatch, kind, module, calls_left
):
    """Ctrl-C during a retraining; the re-run trains only what was not saved."""
    original = module.retrain_and_measure
    calls: list[int] = []
    stop_at: list[int | None] = [3 if kind == "lds" else 5]  # LOO: the full model comes first

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "retrain_and_measure", counted)
    run = cache / "interrupted"
    args = ["groundtruth", "--kind", kind, "--out", run, *SETUP, *groundtruth_args(kind)]
    stopped = invoke(*args)
    assert stopped.exit_code != 0 and RunDir(run).meta()["status"] == "running"
    stop_at[0], calls[:] = None, []
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert len(calls) == calls_left
    groundtruth(cache / "fresh", kind)
    if kind == "lds":
        a, b = SubsetRetraining.load(run), SubsetRetraining.load(cache / "fresh")
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.measurements, b.measurements)
    else:
        np.testing.assert_array_equal(Scores.load(run).values, Scores.load(cache / "fresh").values)
