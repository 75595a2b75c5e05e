"""`datafluence <command>`: composes datasets, methods and reports; holds no algorithm."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click
import numpy as np

from datafluence.experiments import EXPERIMENTS, groundtruth_cli, scores_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="datafluence")
def main() -> None:
    """Which training examples made a network behave this way, and what does learning one
    more example do to everything else it knows?"""
    from datafluence.runtime import tune_allocator

    tune_allocator()  # activations reuse freed memory instead of page-faulting: 2-3x on CPU


class _ExperimentGroup(click.Group):
    """Lists the known experiments when an unknown name is given."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[override]
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            known = ", ".join(sorted(self.list_commands(ctx)))
            raise click.UsageError(f"unknown experiment {name!r}; choose one of: {known}")
        return super().resolve_command(ctx, args)


@main.group(cls=_ExperimentGroup)
def experiment() -> None:
    """Run a paper reproduction into a run directory (resumes if interrupted)."""


for _name, _module in EXPERIMENTS.items():
    experiment.add_command(importlib.import_module(_module).command, _name)

main.add_command(scores_cli.scores_command)
main.add_command(groundtruth_cli.groundtruth_command)
main.add_command(groundtruth_cli.evaluate_command)


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
    # a sub-run (e.g. one noise level or instantiation) keeps only its scores' settings
    settings = meta.get("settings") or meta.get("scores", {}).get("settings", {})
    click.echo("settings   " + json.dumps(settings, indent=None)[:2000])
    if "timings" in meta:
        click.echo("timings    " + ", ".join(f"{a}={b:.1f}s" for a, b in meta["timings"].items()))
    try:
        scores = Scores.load(run, mmap=True)
    except FileNotFoundError:
        if not _show_subsets(run):
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
            top, bottom = scores.top(k, q), scores.bottom(k, q)
        except (KeyError, IndexError) as err:
            raise click.ClickException(str(err)) from err
        click.echo(f"top {k} training examples for query {top['query'].iloc[0]!r}")
        click.echo(_indent(top[["rank", "train", "score"]].to_string(index=False)))
        click.echo(f"strongest {k} opponents (most negative first)")
        click.echo(_indent(bottom[["rank", "train", "score"]].to_string(index=False)))


def _show_subsets(run: str) -> bool:
    """A subset-retraining ground truth (LDS) holds masks and measurements, not scores."""
    from datafluence.groundtruth import SubsetRetraining

    try:
        truth = SubsetRetraining.load(run)
    except FileNotFoundError:
        return False
    values = truth.measurements
    click.echo(
        f"subsets    {truth.n_subsets} retrained subsets (α = {truth.alpha}, seeds "
        f"{list(truth.seeds)}) of {len(truth.train_ids)} training examples x "
        f"{len(truth.query_ids)} queries; measurements mean {values.mean():.4g}, "
        f"min {values.min():.4g}, max {values.max():.4g}"
    )
    click.echo("           (an LDS ground truth: `datafluence evaluate RUN --against` this run)")
    return True


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
