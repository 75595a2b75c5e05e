"""Mislabel detection: flip a seeded share of the labels, train on them, rank by self-influence.

A classifier trained on corrupted labels can only fit a flipped example by bending towards
it, so the example's self-influence score(i, i) (how much learning it moves its own loss) is
high. Each method ranks the training set by its self-score; a mislabel-detection AUC and the
share of mislabels found when checking the top 5 / 10 / 20 % measure how well (Koh & Liang
2017, Section 5.4; Pruthi et al. 2020, Section 4.1). The training loss itself is the classic
strong baseline, random ranking the floor.

Methods (all "higher = more suspicious"):
  influence-ekfac     ∇L_iᵀ (G + λI)⁻¹ ∇L_i with EK-FAC curvature
  influence-identity  |∇L_i|², the gradient norm² (influence with G = I)
  tracin-cp           Σ_k η_k |∇L_i(θ_k)|² over the checkpoints saved after every epoch
  trak                TRAK's score(i, i) (diagonal of the train x train matrix: O(n²) memory)
  loss                the final model's training loss on the (corrupted) label
  random              a seeded random order

TRAK's projection dimension k should stay below n_train: with k ≥ n the leverage
φ_iᵀ(ΦᵀΦ + λI)⁻¹φ_i tends to 1 for every example and TRAK's self-score collapses onto its
out-to-loss weight 1 − p_i, i.e. the loss ranking (measured: k = 2048 on 800 digits gave
exactly the loss baseline's AUC and curve).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from datafluence import methods, store  # noqa: E402
from datafluence.datasets import ImageSet, load_fashion_mnist, load_mnist_subset  # noqa: E402
from datafluence.experiments._cli import cli_errors, comma_list  # noqa: E402
from datafluence.gradients.capture import chunks  # noqa: E402
from datafluence.metrics.attribution import mislabel_auc  # noqa: E402
from datafluence.models import (  # noqa: E402
    MLP,  # noqa: E402
    SmallCNN,
    TrainRecipe,
    evaluate_accuracy,
)
from datafluence.models.training import train_classifier_checkpoints  # noqa: E402
from datafluence.report.figures import _save as save_figure  # noqa: E402
from datafluence.store import RunDir  # noqa: E402
from datafluence.tasks import ClassificationTask, Examples  # noqa: E402

METHODS = ("influence-ekfac", "influence-identity", "tracin-cp", "trak", "loss", "random")
CHECKED = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class MislabelConfig:
    """Everything that changes the experiment's numbers (saved in meta.json)."""

    data: str = "mnist-subset"  # the bundled 1,000 MNIST digits, or "fashion-mnist"
    n_train: int = 800
    n_test: int = 200
    flip_fraction: float = 0.1
    model: str = "mlp"  # "mlp" (784-h-h-10) or "cnn" (SmallCNN)
    hidden: int = 256  # the MLP's width h
    train: TrainRecipe = field(default_factory=lambda: TrainRecipe(epochs=10, batch_size=32))
    methods: tuple[str, ...] = METHODS
    trak_dim: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data not in ("mnist-subset", "fashion-mnist"):
            raise ValueError(f"data must be 'mnist-subset' or 'fashion-mnist', got {self.data!r}")
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"model must be 'mlp' or 'cnn', got {self.model!r}")
        if self.n_train < 2 or self.n_test < 1:
            raise ValueError(
                f"need n_train >= 2 and n_test >= 1, got n_train={self.n_train}, "
                f"n_test={self.n_test}"
            )
        if not 0 < self.flip_fraction < 1:
            raise ValueError(f"flip_fraction must be in (0, 1), got {self.flip_fraction}")
        flipped = round(self.flip_fraction * self.n_train)
        if not 0 < flipped < self.n_train:
            raise ValueError(
                f"flip_fraction {self.flip_fraction} of {self.n_train} examples flips {flipped}; "
                "the AUC needs at least one flipped and one clean example"
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown or '(none given)'}; choose from {METHODS}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be at least 1, got {self.hidden}")
        if self.trak_dim < 1:
            raise ValueError(f"trak_dim must be at least 1, got {self.trak_dim}")
        if self.train.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.train.epochs}")
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(
    out: str | Path,
    config: MislabelConfig | None = None,
    *,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run (or resume) the experiment into `out`; returns metrics.json's content."""
    config = config or MislabelConfig()
    started = time.perf_counter()
    train_set, test_set = _split(config, data_dir)
    rundir = RunDir(out).open(
        {"experiment": "mislabel-detection", **config.to_dict()}, overwrite=overwrite
    )
    labels, flipped = flip_labels(
        train_set.labels, config.flip_fraction, len(train_set.classes), config.seed
    )
    n_classes = len(train_set.classes)
    task = ClassificationTask(num_classes=n_classes)
    train = task.examples(train_set.images, labels, train_set.ids)

    tick = time.perf_counter()
    checkpoints = _train_checkpoints(rundir, config, train_set.images, labels, progress)
    model = _build(config)
    model.load_state_dict(load_file(checkpoints[-1]))
    model.eval()
    model_info = {
        "test_accuracy": evaluate_accuracy(model, test_set.images, test_set.labels),
        "train_accuracy_given_labels": evaluate_accuracy(model, train_set.images, labels),
        "flipped_fitted": evaluate_accuracy(model, train_set.images[flipped], labels[flipped]),
        "seconds": round(time.perf_counter() - tick, 3),
    }
    log(
        f"{config.model} trained {config.train.epochs} epochs on {len(train)} examples "
        f"({int(flipped.sum())} flipped): test accuracy {model_info['test_accuracy']:.3f}, "
        f"fits {model_info['flipped_fitted']:.0%} of the flipped labels"
    )

    values: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in config.methods:
        path = rundir.path / "self_scores" / f"{name}.npy"
        timing = path.with_suffix(".json")
        if path.exists() and timing.exists():
            values[name] = np.load(path)
            seconds[name] = store.read_json(timing)["seconds"]
            continue
        tick = time.perf_counter()
        values[name] = self_scores(name, model, task, train, checkpoints, config)
        seconds[name] = round(time.perf_counter() - tick, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        store.atomic_save_npy(path, values[name])
        store.atomic_write_json(timing, {"seconds": seconds[name]})
        log(f"{name}: {seconds[name]:.1f}s")

    table = pd.DataFrame(
        {
            "id": train.ids,
            "true_label": train_set.labels.numpy(),
            "given_label": labels.numpy(),
            "flipped": flipped,
            **values,
        }
    )
    with store.atomic_path(rundir.path / "self_scores.csv") as tmp:
        table.to_csv(tmp, index=False)

    results = {}
    for name, v in values.items():
        curve = detection_curve(v, flipped)
        results[name] = {
            "auc": mislabel_auc(v, flipped)["auc"],
            **{f"found_top_{q:.0%}": curve_at(curve, q) for q in CHECKED},
            "seconds": seconds[name],
        }
    metrics = {
        "setup": {
            "dataset": train_set.name,
            "n_train": len(train),
            "n_flipped": int(flipped.sum()),
            "n_test": len(test_set),
            "checkpoints": len(checkpoints),
        },
        "model": model_info,
        "methods": results,
        "oracle": {f"found_top_{q:.0%}": min(1.0, q / config.flip_fraction) for q in CHECKED},
    }
    rundir.save_metrics(metrics)
    plot_curves(
        {n: detection_curve(v, flipped) for n, v in values.items()},
        float(flipped.mean()),
        rundir.figures / "mislabel_curve.png",
        title=f"{train_set.name}: {int(flipped.sum())} of {len(train)} labels flipped",
    )
    rundir.update_meta(status="done", seconds=round(time.perf_counter() - started, 3))
    log(summary_table(metrics).to_string())
    return metrics


# ------------------------------------------------------------------------------- pieces


def flip_labels(
    labels: torch.Tensor, fraction: float, n_classes: int, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """A seeded `fraction` of the labels moved to another class drawn uniformly; the flags."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    new = labels.clone()
    shift = torch.as_tensor(rng.integers(1, n_classes, size=len(chosen)), dtype=labels.dtype)
    new[torch.as_tensor(chosen)] = (labels[torch.as_tensor(chosen)] + shift) % n_classes
    return new, flipped


def self_scores(
    name: str,
    model: nn.Module,
    task: ClassificationTask,
    train: Examples,
    checkpoints: list[Path],
    config: MislabelConfig,
) -> np.ndarray:
    """One method's self-scores [n_train], higher = more likely mislabelled."""
    if name.startswith("influence-"):
        curvature = name.removeprefix("influence-")
        method = methods.InfluenceFunction(task, curvature=curvature, progress=False)
        return method.self_score(model, train).values[:, 0]
    if name == "tracin-cp":
        lrs = [config.train.lr] * len(checkpoints)
        tracin = methods.TracInCP(task, list(checkpoints), lrs, progress=False)
        return tracin.self_score(model, train).values[:, 0]
    if name == "trak":
        trak = methods.TRAK(
            task, projection_dim=config.trak_dim, seed=config.seed, chunk_size=128, progress=False
        )
        return trak.self_score(model, train).values[:, 0]
    if name == "loss":
        with torch.no_grad():
            losses = [task.loss(model, batch) for _, _, batch in chunks(train, 1000)]
        return torch.cat(losses).numpy().astype(np.float32)
    if name == "random":
        return np.random.default_rng(config.seed + 1).random(len(train)).astype(np.float32)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def detection_curve(values: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Share of all mislabels found after checking the top k examples, k = 0..n."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    found = np.cumsum(np.asarray(flipped, dtype=bool)[order])
    return np.concatenate([[0.0], found / max(1, int(np.sum(flipped)))])


def curve_at(curve: np.ndarray, fraction: float) -> float:
    """The curve after checking round(fraction × n) examples."""
    return float(curve[round(fraction * (len(curve) - 1))])


def plot_curves(
    curves: dict[str, np.ndarray], flip_fraction: float, path: Path, title: str = ""
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, curve in curves.items():
        checked = np.linspace(0, 1, len(curve))
        style: dict[str, Any] = {"color": "grey", "linestyle": ":"} if name == "random" else {}
        ax.plot(checked, curve, label=name, linewidth=1.4, **style)
    ax.plot(
        [0, flip_fraction, 1], [0, 1, 1], color="black", linestyle="--", linewidth=0.8,
        label="oracle",
    )  # fmt: skip
    ax.set_xlabel("fraction of training data checked (highest self-score first)")
    ax.set_ylabel("fraction of mislabels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per method: AUC, share found in the top 5/10/20 %, seconds."""
    rows = {
        name: {
            "AUC": m["auc"],
            **{f"found @{q:.0%}": m[f"found_top_{q:.0%}"] for q in CHECKED},
            "seconds": m["seconds"],
        }
        for name, m in metrics["methods"].items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").round(3)


def _split(config: MislabelConfig, data_dir: str | Path | None) -> tuple[ImageSet, ImageSet]:
    """Seeded disjoint training and test examples (test labels are never flipped)."""
    if config.data == "mnist-subset":
        pool = load_mnist_subset()
        order = np.random.default_rng(config.seed).permutation(len(pool))
        if config.n_train + config.n_test > len(pool):
            raise ValueError(
                f"the bundled MNIST subset has {len(pool)} digits, fewer than n_train + n_test = "
                f"{config.n_train + config.n_test}; lower them or use --data fashion-mnist"
            )
        return pool.subset(order[: config.n_train]), pool.subset(
            order[config.n_train : config.n_train + config.n_test]
        )
    train = load_fashion_mnist("train", data_dir)
    test = load_fashion_mnist("test", data_dir)
    if config.n_train > len(train) or config.n_test > len(test):
        raise ValueError(
            f"Fashion-MNIST has {len(train)} training and {len(test)} test images; asked for "
            f"{config.n_train} and {config.n_test}"
        )
    order = np.random.default_rng(config.seed).permutation(len(train))
    return train.subset(order[: config.n_train]), test.subset(range(config.n_test))


def _build(config: MislabelConfig) -> nn.Module:
    """The model at its seeded initialisation (train_classifier seeds only after building)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return SmallCNN() if config.model == "cnn" else MLP(config.hidden)


def _train_checkpoints(
    rundir: RunDir,
    config: MislabelConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    progress: bool,
) -> list[Path]:
    """The weights after every epoch of one training run, for TracIn-CP; the last one is the
    model scored. Kept in the run directory (not the shared cache: the labels are corrupted
    and the run should carry its own model), so a resumed run reuses them.
    """
    folder = rundir.path / "checkpoints"
    paths = [folder / f"epoch_{e:03d}.safetensors" for e in range(1, config.train.epochs + 1)]
    if all(p.exists() for p in paths):
        return paths
    _, states, _ = train_classifier_checkpoints(
        lambda: _build(config),
        images,
        labels,
        config.train,
        name="mislabel",
        data_key="",
        use_cache=False,
        progress=progress,
    )
    folder.mkdir(parents=True, exist_ok=True)
    for state, path in zip(states, paths, strict=True):
        with store.atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return paths


# ------------------------------------------------------------------------------- CLI


@click.command("mislabel-detection")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--data",
    type=click.Choice(["mnist-subset", "fashion-mnist"]),
    default="mnist-subset",
    show_default=True,
    help="The bundled 1,000 MNIST digits, or Fashion-MNIST (idx files or torchvision cache).",
)
@click.option("--train", "n_train", default=800, show_default=True, help="Training examples.")
@click.option("--test", "n_test", default=200, show_default=True, help="Clean test examples.")
@click.option(
    "--flip", "flip_fraction", default=0.1, show_default=True, help="Share of labels flipped."
)
@click.option("--model", type=click.Choice(["mlp", "cnn"]), default="mlp", show_default=True)
@click.option("--hidden", default=256, show_default=True, help="MLP width.")
@click.option("--epochs", default=10, show_default=True, help="Training epochs (= checkpoints).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option(
    "--methods",
    "method_names",
    default=",".join(METHODS),
    show_default=True,
    help="Comma-separated self-score methods.",
)
@click.option("--trak-dim", default=256, show_default=True, help="TRAK projection dimension.")
@click.option("--seed", default=0, show_default=True, help="Split, flips, model init, shuffles.")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None, help="Folder with the idx files."
)
@click.option("--overwrite", is_flag=True, help="Discard a run made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(
    out: str,
    data: str,
    n_train: int,
    n_test: int,
    flip_fraction: float,
    model: str,
    hidden: int,
    epochs: int,
    batch_size: int,
    lr: float,
    method_names: str,
    trak_dim: int,
    seed: int,
    data_dir: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Flip a share of the labels, train, and rank the training set by self-influence."""
    with cli_errors():
        config = MislabelConfig(
            data=data,
            n_train=n_train,
            n_test=n_test,
            flip_fraction=flip_fraction,
            model=model,
            hidden=hidden,
            train=TrainRecipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
            methods=comma_list(method_names),
            trak_dim=trak_dim,
            seed=seed,
        )
        run(out, config, data_dir=data_dir, overwrite=overwrite, progress=not quiet, log=click.echo)
    click.echo(f"results in {out}/ (self_scores.csv, metrics.json, figures/mislabel_curve.png)")
