"""`datafluence scores` and `datafluence evaluate`: any method on a reference classifier, and
any run held against a ground-truth run. Composition only: models, data and methods come
from the library.
"""

from __future__ import annotations

import inspect
from typing import Any

import click
import numpy as np
import torch
from torch import nn

from datafluence import distributed, store
from datafluence.datasets import load_fashion_mnist, load_mnist_subset
from datafluence.experiments._cli import cli_errors
from datafluence.models import SmallCNN, TrainRecipe, train_classifier
from datafluence.store import RunDir
from datafluence.tasks import ClassificationTask, Examples

CURVATURES = ("ekfac", "kfac", "lissa", "cg", "explicit", "identity", "diagonal", "arnoldi")
METHODS = (*CURVATURES, "tracin", "trak", "gradsim", "repsim")


class MLP(nn.Module):
    """784-256-256-10 ReLU MLP, the influence-function validation model of Grosse et al."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def reference_setup(
    data: str, model_name: str, n_train: int, n_queries: int, data_dir: str | None, epochs: int
) -> tuple[nn.Module, ClassificationTask, Examples, Examples]:
    """A classifier trained (and cached) on the first n_train examples, and the queries."""
    if data == "mnist-subset":
        images = load_mnist_subset()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        train_set = images.subset(order[:n_train])
        query_set = images.subset(order[n_train : n_train + n_queries])
    else:
        train_set = load_fashion_mnist("train", data_dir).subset(range(n_train))
        query_set = load_fashion_mnist("test", data_dir).subset(range(n_queries))
    if len(train_set) < n_train or len(query_set) < n_queries:
        raise ValueError(
            f"{data} has too few examples for {n_train} training and {n_queries} query examples"
        )
    make = SmallCNN if model_name == "cnn" else MLP
    model, _ = train_classifier(
        make,
        train_set.images,
        train_set.labels,
        TrainRecipe(epochs=epochs),
        name=f"{model_name}-{data}",
        data_key=store.tensors_fingerprint({"x": train_set.images, "y": train_set.labels}),
        progress=False,
    )
    task = ClassificationTask(num_classes=10)
    train = task.examples(train_set.images, train_set.labels, train_set.ids)
    queries = task.examples(query_set.images, query_set.labels, query_set.ids)
    return model, task, train, queries


def make_method(name: str, task: ClassificationTask, model: nn.Module, damping: float | None):
    from datafluence import methods

    if name in CURVATURES:
        return methods.InfluenceFunction(task, curvature=name, damping=damping, progress=False)
    if name == "gradsim":
        return methods.GradientSimilarity(task, kind="cosine", progress=False)
    if name == "tracin":
        return methods.TracInCP(task, checkpoints=None, learning_rates=1.0)
    if name == "trak":
        return methods.TRAK(task, damping=damping)
    last_hidden = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)][-1]
    return methods.RepresentationSimilarity(task, module=last_hidden)


def _takes_run(function: Any) -> bool:
    return "run" in inspect.signature(function).parameters


@click.command("scores")
@click.option("--method", "method_name", type=click.Choice(METHODS), required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--data",
    type=click.Choice(["mnist-subset", "fashion-mnist"]),
    default="mnist-subset",
    show_default=True,
)
@click.option(
    "--model", "model_name", type=click.Choice(["mlp", "cnn"]), default="mlp", show_default=True
)
@click.option("--train", "n_train", default=500, show_default=True, help="Training examples.")
@click.option("--queries", "n_queries", default=50, show_default=True, help="Query examples.")
@click.option("--damping", type=float, default=None, help="Curvature damping (default per method).")
@click.option(
    "--epochs", default=5, show_default=True, help="Epochs of the reference model (cached)."
)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--overwrite", is_flag=True, help="Discard a run made with other settings.")
def scores_command(
    method_name: str,
    out: str,
    data: str,
    model_name: str,
    n_train: int,
    n_queries: int,
    damping: float | None,
    epochs: int,
    data_dir: str | None,
    overwrite: bool,
) -> None:
    """Attribution scores of one method on a reference classifier, into a run directory.

    Under `torchrun --nproc_per_node N` the training rows are shared out across the N
    processes; the result equals a single process's.
    """
    with cli_errors():
        distributed.init_from_env()
        with distributed.main_first():  # rank 0 trains and caches the model, the others load it
            model, task, train, queries = reference_setup(
                data, model_name, n_train, n_queries, data_dir, epochs
            )
        method = make_method(method_name, task, model, damping)
        settings = {
            "command": "scores",
            "method": method_name,
            "data": data,
            "model": model_name,
            "n_train": n_train,
            "n_queries": n_queries,
            "damping": damping,
            "epochs": epochs,
        }
        run = RunDir(out).open(settings, overwrite=overwrite, method=method_name)
        if hasattr(method, "fit"):
            if _takes_run(method.fit):  # factors saved in the run: reused when resuming
                with distributed.main_first():  # rank 0 fits and saves, the others load
                    method.fit(model, train, run=run)
            else:
                method.fit(model, train)
        extra = {"run": run} if _takes_run(method.score) else {}
        result = method.score(model, train, queries, **extra)
        if not distributed.is_main():
            return  # every rank holds the same result; rank 0 alone writes and reports it
        result.save(run.path)
        run.drop_partitions()
        run.update_meta(status="done")
    values = np.asarray(result.values)
    click.echo(
        f"{method_name}: {result.shape[0]} train x {result.shape[1]} queries -> {out}/scores.npy "
        f"(mean {values.mean():.4g}, max |s| {np.abs(values).max():.4g})"
    )
