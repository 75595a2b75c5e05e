"""`datafluence <command>`: composes datasets, methods and reports; holds no algorithm."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from datafluence.experiments import EXPERIMENTS


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="datafluence")
def main() -> None:
    """Which training examples made a network behave this way, and what does learning one
    more example do to everything else it knows?"""


@main.command()
@click.argument("name", type=click.Choice(EXPERIMENTS))
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
def experiment(
    name: str,
    out: str,
    n_per_class: int,
    target_class: str,
    noise: str,
    steps: int,
    lr: float,
    optimizer: str,
    epochs: int,
    digits: str,
    data_dir: str | None,
    chunk_size: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Run a paper reproduction into a run directory (resumes if interrupted)."""
    from datafluence.experiments import cnn_fashion_mnist as exp
    from datafluence.finetune import FinetuneRecipe
    from datafluence.models import TrainRecipe

    try:
        config = exp.CNNExperimentConfig(
            n_per_class=n_per_class,
            target_class=target_class,
            noise=_floats(noise),
            recipe=FinetuneRecipe(steps=steps, lr=lr, optimizer=optimizer),
            train=TrainRecipe(epochs=epochs),
            digits=digits,
        )
        exp.run(
            out,
            config,
            data_dir=data_dir,
            overwrite=overwrite,
            chunk_size=chunk_size,
            progress=not quiet,
            log=click.echo,
        )
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"results in {out}/ (scores.npy, metrics.json, figures/)")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--query", default=None, help="Query id (or position) to list the top training examples for."
)
@click.option("-k", "--top", "k", default=5, show_default=True, help="How many training examples.")
def show(run: str, query: str | None, k: int) -> None:
    """Summarise a run directory: method, settings, shape, metrics, top-k for a query."""
    from datafluence.scores import Scores
    from datafluence.store import RunDir

    rundir = RunDir(run)
    meta = rundir.meta()
    if not meta:
        raise click.ClickException(f"{run} has no meta.json; is it a datafluence run directory?")
    click.echo(f"run        {Path(run).resolve()}")
    click.echo(f"status     {meta.get('status', '?')}   created {meta.get('created', '?')}")
    click.echo(f"method     {meta.get('method', meta.get('scores', {}).get('method', '?'))}")
    click.echo("settings   " + json.dumps(meta.get("settings", {}), indent=None)[:2000])
    if "timings" in meta:
        click.echo("timings    " + ", ".join(f"{a}={b:.1f}s" for a, b in meta["timings"].items()))
    try:
        scores = Scores.load(run, mmap=True)
    except FileNotFoundError:
        click.echo("scores     (none yet: the run is unfinished; re-run its command to resume)")
        return
    values = np.asarray(scores.values)
    click.echo(
        f"scores     {scores.shape[0]} train x {scores.shape[1]} queries; "
        f"mean {values.mean():.4g}, min {values.min():.4g}, max {values.max():.4g}"
    )
    metrics = rundir.metrics()
    if metrics:
        click.echo("metrics")
        click.echo(_indent(json.dumps(metrics, indent=2)))
    if query is not None or k:
        q: str | int = query if query is not None else 0
        if isinstance(q, str) and q.lstrip("-").isdigit() and q not in scores.query_ids:
            q = int(q)
        try:
            top = scores.top(k, q)
        except (KeyError, IndexError) as err:
            raise click.ClickException(str(err)) from err
        click.echo(f"top {k} training examples for query {top['query'].iloc[0]!r}")
        click.echo(_indent(top[["rank", "train", "score"]].to_string(index=False)))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
