"""Bad inputs get clear errors that name the problem, before (or without losing) any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from datafluence.cli import main
from datafluence.finetune import FinetuneRecipe
from datafluence.methods import EmpiricalInfluence
from datafluence.store import RunDir, RunMismatchError
from datafluence.tasks import ClassificationTask, Examples


def method(task, **kwargs) -> EmpiricalInfluence:
    return EmpiricalInfluence(task, progress=False, **kwargs)


def empty_set() -> Examples:
    return Examples({"x": torch.zeros(0, 1, 8, 8), "y": torch.zeros(0, dtype=torch.long)}, ())


# --- empty sets --------------------------------------------------------------------------


def test_empty_training_set(task, make_model, make_examples):
    with pytest.raises(ValueError, match="example set is empty"):
        task.examples(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="training set is empty"):
        method(task).score(make_model(), empty_set(), make_examples(3, prefix="q"))


def test_empty_probe_set(task, make_model, make_examples):
    with pytest.raises(ValueError, match="query set is empty"):
        method(task).score(make_model(), make_examples(3), empty_set())


# --- labels ------------------------------------------------------------------------------


def test_negative_labels(task):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, .*found labels from -1 to 3"):
        task.examples(torch.randn(3, 1, 8, 8), torch.tensor([0, -1, 3]))


def test_labels_beyond_num_classes(make_model):
    task = ClassificationTask(num_classes=5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), found labels from 0 to 5"):
        task.examples(torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("role, where", [("training", "train"), ("query", "queries")])
def test_labels_beyond_model_outputs(task, make_model, make_examples, role, where):
    """num_classes unknown: the model's 5 outputs are the bound."""
    sets = {"train": make_examples(4), "queries": make_examples(3, prefix="q")}
    x = sets[where].tensors["x"]
    sets[where] = task.examples(x, torch.tensor([0, 1, 7, 2][: len(x)]), sets[where].ids)
    with pytest.raises(ValueError, match=rf"{role} label 7 is out of range for a model with 5"):
        method(task).score(make_model(), sets["train"], sets["queries"])


def test_float_labels(task):
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor.*float32"):
        task.examples(torch.randn(3, 1, 8, 8), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        task.examples(torch.randn(2, 1, 8, 8), torch.tensor([[0], [1]]))


def test_non_finite_inputs(task):
    x = torch.randn(3, 1, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="inputs contain NaN or Inf"):
        task.examples(x, torch.tensor([0, 1, 2]))


def test_mismatched_ids(task):
    with pytest.raises(ValueError, match="2 ids given for 3 examples"):
        task.examples(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="ids must be unique"):
        task.examples(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), ["a", "a"])
    with pytest.raises(ValueError, match="same first dimension"):
        Examples({"x": torch.zeros(3, 2), "y": torch.zeros(2, dtype=torch.long)}, ("a", "b"))


# --- shapes ------------------------------------------------------------------------------


def test_probe_images_of_another_size(task, make_model, make_examples):
    train = make_examples(3)
    queries = make_examples(2, prefix="q", side=10)
    with pytest.raises(ValueError, match=r"cannot run on the query.*\(1, 10, 10\)"):
        method(task).score(make_model(), train, queries)
    with pytest.raises(ValueError, match=r"cannot run on the training.*\(1, 10, 10\)"):
        method(task).score(make_model(), queries, train)


def test_model_output_not_logits(task, make_examples):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"must return logits \[batch, n_classes\]"):
        method(task).score(model, make_examples(3), make_examples(2, prefix="q"))


# --- non-finite fine-tuning --------------------------------------------------------------


def exploding_set(task, model, make_examples, bad: int = 4) -> Examples:
    """Training set where example `bad` has a huge (finite) input and a label the model does
    not predict: its first gradient step is ~1e20, so the next loss overflows."""
    normal = make_examples(6, seed=1)
    x = normal.tensors["x"].clone()
    y = normal.tensors["y"].clone()
    x[bad] *= 1e20
    with torch.no_grad():
        y[bad] = (model(x[bad : bad + 1]).argmax() + 1) % 5
    return task.examples(x, y, [f"digit-{i}" for i in range(6)])


@pytest.mark.parametrize("engine", ["batched", "naive"])
def test_non_finite_loss_names_the_example_and_keeps_saved_partitions(
    tmp_path, task, make_examples, engine
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    train = exploding_set(task, model, make_examples)
    queries = make_examples(3, seed=2, prefix="q")
    eif = method(task, engine=engine, steps=2, lr=1.0, chunk_size=2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .*step 2 on digit-4\b"):
        eif.score(model, train, queries, run=RunDir(tmp_path))
    saved = sorted(p.name for p in tmp_path.glob("partitions/empirical-*/rows_*.npy"))
    assert saved == ["rows_000000000_000000002.npy", "rows_000000002_000000004.npy"]

    # nothing lost: the saved rows equal a clean run on the first four examples
    fine = task.examples(train.tensors["x"][:4], train.tensors["y"][:4], train.ids[:4])
    clean = method(task, engine=engine, steps=2, lr=1.0, chunk_size=2).score(model, fine, queries)
    part = next(tmp_path.glob("partitions/empirical-*/rows_000000000_000000002.npy"))
    assert np.abs(clean.values).max() > 1e-2
    assert np.allclose(np.load(part), clean.values[:2], atol=1e-5)


@pytest.mark.parametrize("engine", ["batched", "naive"])
def test_huge_lr_two_steps_names_the_examples(task, make_model, make_examples, engine):
    train = make_examples(4, prefix="img-")
    eif = method(task, engine=engine, steps=2, lr=1e30, chunk_size=4)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .*step 2 on img-0"):
        eif.score(make_model(), train, make_examples(2, prefix="q"))


@pytest.mark.parametrize("engine", ["batched", "naive"])
def test_huge_lr_one_step_names_the_example(task, make_model, make_examples, engine):
    train = make_examples(4, prefix="img-")
    eif = method(task, engine=engine, steps=1, lr=1e30, chunk_size=2)
    with pytest.raises(FloatingPointError, match=r"img-0"):
        eif.score(make_model(), train, make_examples(2, prefix="q"))


def test_nan_weight_is_reported_before_fine_tuning(task, make_model, make_examples):
    model = make_model()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="already non-finite before fine-tuning"):
        method(task).score(model, make_examples(3), make_examples(2, prefix="q"))


# --- run directories ---------------------------------------------------------------------


def test_run_directory_with_another_recipe(tmp_path, task):
    RunDir(tmp_path).open(method(task, lr=0.01).settings())
    with pytest.raises(RunMismatchError, match=r"recipe\.lr: 0\.01 -> 0\.02(.|\n)*--overwrite"):
        RunDir(tmp_path).open(method(task, lr=0.02).settings())
    with pytest.raises(RunMismatchError, match=r"recipe\.optimizer: 'sgd' -> 'adam'"):
        RunDir(tmp_path).open(method(task, lr=0.01, optimizer="adam").settings())
    with pytest.raises(RunMismatchError, match=r"measurement: 'log_prob' -> 'prob'"):
        RunDir(tmp_path).open(method(ClassificationTask(measurement="prob"), lr=0.01).settings())


# --- CLI ---------------------------------------------------------------------------------


def test_unknown_experiment_name(tmp_path):
    result = CliRunner().invoke(main, ["experiment", "resnet-imagenet", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "resnet-imagenet" in result.output
    assert "cnn-fashion-mnist" in result.output
    assert not (tmp_path / "meta.json").exists()


# --- recipes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(steps=0), "steps must be a positive integer, got 0"),
        (dict(steps=1.5), "steps must be a positive integer"),
        (dict(lr=0.0), "lr must be > 0, got 0.0"),
        (dict(lr=-1e-3), "lr must be > 0"),
        (dict(lr=float("nan")), "lr must be > 0"),
        (dict(optimizer="rmsprop"), r"unknown optimizer 'rmsprop'; choose one of .*sgd"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(optimizer="adam", momentum=0.9), "momentum applies to sgd only"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(betas=(0.9, 1.0)), "betas must be two numbers"),
    ],
)
def test_invalid_recipe_values(task, fields, match):
    with pytest.raises(ValueError, match=match):
        FinetuneRecipe(**fields)
    with pytest.raises(ValueError, match=match):
        EmpiricalInfluence(task, **fields)


def test_invalid_method_options(task):
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        EmpiricalInfluence(task, engine="fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        EmpiricalInfluence(task, chunk_size=0)
    with pytest.raises(ValueError, match="unknown measurement 'accuracy'"):
        ClassificationTask(measurement="accuracy")
    with pytest.raises(TypeError):
        EmpiricalInfluence(task, learning_rate=0.1)  # a typo is not silently ignored


@pytest.mark.parametrize("engine", ["batched", "naive"])
def test_trainable_pattern_matching_nothing(task, make_model, make_examples, engine):
    eif = method(task, engine=engine, trainable=("classifier.*",))
    with pytest.raises(
        ValueError, match=r"no parameter name matches trainable=\['classifier\.\*'\]"
    ):
        eif.score(make_model(), make_examples(2), make_examples(2, prefix="q"))
    with pytest.raises(ValueError, match="names look like: body.0.weight"):
        eif.score(make_model(), make_examples(2), make_examples(2, prefix="q"))


def test_trainable_as_plain_string(task, make_model):
    recipe = FinetuneRecipe(trainable="head.*")
    assert recipe.trainable_names(make_model()) == ["head.weight", "head.bias"]
