"""The first paper's Figure 1: a Fashion-MNIST CNN fine-tuned on single MNIST digits.

Each of n digits per class is labelled as one fashion class (default "Sneaker", the shoe)
and the CNN is fine-tuned on it alone; every digit's change in log p(that class) is measured.
Rows and columns are the same digits, grouped by digit class, so block structure (digits
of a class move each other) and symmetry are visible. Repeated with Gaussian input noise on
the fine-tuned example to measure noise invariance.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from datafluence import store
from datafluence.datasets import (
    FASHION_CLASSES,
    add_gaussian_noise,
    load_fashion_mnist,
    load_mnist,
    load_mnist_subset,
    take_per_class,
)
from datafluence.experiments._cli import cli_errors, comma_floats
from datafluence.finetune import FinetuneRecipe
from datafluence.finetune.recipe import Optimizer
from datafluence.methods import EmpiricalInfluence
from datafluence.metrics import desiderata
from datafluence.models import SmallCNN, TrainRecipe, evaluate_accuracy, train_classifier
from datafluence.report import plot_matrix, plot_noise
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import ClassificationTask, Examples

DEFAULT_TARGET = "Sneaker"


@dataclass(frozen=True)
class CNNExperimentConfig:
    """Everything that changes the experiment's numbers (saved in meta.json)."""

    n_per_class: int = 10
    target_class: str = DEFAULT_TARGET
    noise: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    recipe: FinetuneRecipe = field(default_factory=lambda: FinetuneRecipe(steps=1, lr=1e-3))
    train: TrainRecipe = field(default_factory=lambda: TrainRecipe(epochs=4))
    noise_seed: int = 0
    digits: str = "bundled"  # "bundled" subset, or "mnist" (full test set via load_mnist)

    def __post_init__(self) -> None:
        if self.n_per_class < 1:
            raise ValueError(f"n_per_class must be at least 1, got {self.n_per_class}")
        if self.target_class not in FASHION_CLASSES:
            raise ValueError(
                f"unknown target class {self.target_class!r}; choose one of {list(FASHION_CLASSES)}"
            )
        if any(s < 0 for s in self.noise):
            raise ValueError(f"noise levels must be >= 0, got {self.noise}")
        if self.digits not in ("bundled", "mnist"):
            raise ValueError(f"digits must be 'bundled' or 'mnist', got {self.digits!r}")
        object.__setattr__(self, "noise", tuple(sorted({float(s) for s in self.noise} | {0.0})))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(
    out: str | Path,
    config: CNNExperimentConfig | None = None,
    *,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    chunk_size: int = 50,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run (or resume) the experiment into `out`; returns metrics.json's content."""
    config = config or CNNExperimentConfig()
    started = time.perf_counter()
    rundir = RunDir(out).open(
        {"experiment": "cnn-fashion-mnist", **config.to_dict()},
        overwrite=overwrite,
        method="empirical",
    )
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    fashion_train = load_fashion_mnist("train", data_dir=data_dir)
    fashion_test = load_fashion_mnist("test", data_dir=data_dir)
    model, cached = train_classifier(
        SmallCNN,
        fashion_train.images,
        fashion_train.labels,
        config.train,
        name="cnn-fashion-mnist",
        data_key=store.tensors_fingerprint(
            {"images": fashion_train.images, "labels": fashion_train.labels}
        ),
        progress=progress,
    )
    accuracy = evaluate_accuracy(model, fashion_test.images, fashion_test.labels)
    timings["model"] = time.perf_counter() - tick
    log(f"CNN {'loaded from cache' if cached else 'trained'}: test accuracy {accuracy:.4f}")
    _save_checkpoint(rundir, model, config)

    digits_all = load_mnist("test", data_dir=data_dir) if config.digits == "mnist" else None
    digits = take_per_class(digits_all or load_mnist_subset(), config.n_per_class)
    target = FASHION_CLASSES.index(config.target_class)
    task = ClassificationTask(num_classes=len(FASHION_CLASSES))
    labels = torch.full((len(digits),), target, dtype=torch.long)
    probes = task.examples(digits.images, labels, digits.ids)
    digit_of = [str(int(c)) for c in digits.labels]
    method = EmpiricalInfluence(task, config.recipe, chunk_size=chunk_size, progress=progress)

    matrices: dict[float, Scores] = {}
    for sigma in config.noise:
        tick = time.perf_counter()
        sub = rundir if sigma == 0 else rundir.sub(f"noise/{sigma:g}")
        if (sub.path / "scores.npy").exists():
            matrices[sigma] = Scores.load(sub.path)
            continue
        images = add_gaussian_noise(digits.images, sigma, seed=config.noise_seed)
        train = Examples({"x": images, "y": labels}, probes.ids)
        scores = method.score(model, train, probes, run=sub)
        scores.settings["noise_sigma"] = sigma
        scores.save(sub.path)
        sub.drop_partitions()
        matrices[sigma] = scores
        timings[f"eif_sigma_{sigma:g}"] = time.perf_counter() - tick
        log(
            f"EIF σ={sigma:g}: {scores.shape[0]}x{scores.shape[1]} in {timings[f'eif_sigma_{sigma:g}']:.1f}s"
        )

    distance = desiderata.pairwise_distances(digits.images.reshape(len(digits), -1).numpy())
    clean = matrices[0.0]
    metrics: dict[str, Any] = {
        "model": {"test_accuracy": accuracy, "from_cache": cached},
        "target_class": config.target_class,
        "noise": {},
    }
    for sigma, scores in matrices.items():
        entry = {
            "symmetry": desiderata.symmetry(scores),
            "sparsity": desiderata.sparsity(scores),
            "distance_decay": {
                **desiderata.distance_decay(scores, labels=digit_of),
                "spearman_vs_input_distance": desiderata.distance_decay(scores, distance=distance)[
                    "spearman_vs_distance"
                ],
            },
            "mean": float(np.mean(scores.values)),
            "share_negative": float(np.mean(scores.values < 0)),
        }
        if sigma:
            entry["noise_invariance"] = desiderata.noise_invariance(clean, scores)
        metrics["noise"][f"{sigma:g}"] = entry
    rundir.save_metrics(metrics)

    name = config.target_class
    plot_matrix(
        clean,
        rundir.figures / "eif_matrix.png",
        row_labels=digit_of,
        col_labels=digit_of,
        title=f"EIF: fine-tune on one digit labelled {name!r}, Δ log p({name}) of every digit",
        xlabel="probe digit",
        ylabel="fine-tuned on digit",
    )
    invariance = {0.0: 1.0}
    invariance.update(
        {
            s: metrics["noise"][f"{s:g}"]["noise_invariance"]["column_spearman_mean"]
            for s in config.noise
            if s
        }
    )
    plot_noise(matrices, invariance, rundir.figures / "noise.png", labels=digit_of)
    timings["total"] = time.perf_counter() - started
    rundir.update_meta(status="done", timings={k: round(v, 3) for k, v in timings.items()})
    log(summary_table(metrics).to_string())
    return metrics


def _save_checkpoint(rundir: RunDir, model: torch.nn.Module, config: CNNExperimentConfig) -> None:
    """The starting weights and the exact recipe, so any entry can be re-derived by hand."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with store.atomic_path(rundir.path / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    store.atomic_write_json(
        rundir.path / "recipe.json",
        {
            "model": "datafluence.models.SmallCNN(n_classes=10)",
            "finetune": config.recipe.to_dict(),
            "eif": "EIF[i, j] = log p_θi(target | digit_j) - log p_θ(target | digit_j), "
            "θi = finetune steps on (digit_i + noise, target) from model.safetensors, eval mode",
            "target_class": config.target_class,
            "target_index": FASHION_CLASSES.index(config.target_class),
            "model_training": config.train.to_dict(),
        },
    )


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per noise level: the headline desiderata."""
    rows = []
    for sigma, m in metrics["noise"].items():
        rows.append(
            {
                "σ": sigma,
                "mean EIF": m["mean"],
                "share < 0": m["share_negative"],
                "symmetry ρ": m["symmetry"]["spearman"],
                "asymmetry": m["symmetry"]["asymmetry_index"],
                "block ratio": m["distance_decay"]["block_ratio"],
                "ρ vs distance": m["distance_decay"]["spearman_vs_input_distance"],
                "Gini": m["sparsity"]["gini_mean"],
                "top-10% share": m["sparsity"]["top_10pct_share_mean"],
                "ρ vs clean": m.get("noise_invariance", {}).get("column_spearman_mean", 1.0),
            }
        )
    return pd.DataFrame(rows).set_index("σ").round(3)


@click.command("cnn-fashion-mnist")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--n-per-class", default=10, show_default=True, help="Digits per digit class.")
@click.option(
    "--target-class",
    default="Sneaker",
    show_default=True,
    help="Fashion class every digit is labelled as.",
)
@click.option(
    "--noise",
    default="0,0.25,0.5,1.0",
    show_default=True,
    help="Input noise levels σ (comma-separated).",
)
@click.option("--steps", default=1, show_default=True, help="Fine-tuning steps K per example.")
@click.option("--lr", default=1e-3, show_default=True, help="Fine-tuning learning rate.")
@click.option(
    "--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd", show_default=True
)
@click.option(
    "--epochs", default=4, show_default=True, help="Epochs of the base CNN's training (cached)."
)
@click.option(
    "--digits",
    type=click.Choice(["bundled", "mnist"]),
    default="bundled",
    show_default=True,
    help="Bundled 1,000-digit MNIST subset, or the full MNIST test set.",
)
@click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None, help="Folder with the idx files."
)
@click.option("--chunk-size", default=50, show_default=True, help="Copies fine-tuned at once.")
@click.option("--overwrite", is_flag=True, help="Discard a run made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(
    out: str,
    n_per_class: int,
    target_class: str,
    noise: str,
    steps: int,
    lr: float,
    optimizer: Optimizer,
    epochs: int,
    digits: str,
    data_dir: str | None,
    chunk_size: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """CNN on Fashion-MNIST fine-tuned on single MNIST digits (the EIF paper's Figure 1)."""
    with cli_errors():
        config = CNNExperimentConfig(
            n_per_class=n_per_class,
            target_class=target_class,
            noise=comma_floats(noise),
            recipe=FinetuneRecipe(steps=steps, lr=lr, optimizer=optimizer),
            train=TrainRecipe(epochs=epochs),
            digits=digits,
        )
        run(
            out,
            config,
            data_dir=data_dir,
            overwrite=overwrite,
            chunk_size=chunk_size,
            progress=not quiet,
            log=click.echo,
        )
    click.echo(f"results in {out}/ (scores.npy, metrics.json, figures/)")
