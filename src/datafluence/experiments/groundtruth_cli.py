"""`datafluence groundtruth` and `datafluence evaluate`: ground truths for the reference
classifier of `datafluence scores` (same data, same ids), and any set of score runs held
against one of them, side by side. Composition only: retraining, PBRF and the metrics come
from the library.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import click
import pandas as pd
from click.core import ParameterSource
from torch import nn

from datafluence.experiments import scores_cli
from datafluence.experiments._cli import cli_errors, comma_list
from datafluence.groundtruth import SubsetRetraining, Trainer, leave_one_out, subset_retraining
from datafluence.groundtruth.subsets import META_KEY as SUBSETS_KEY
from datafluence.metrics.attribution import (
    ScoresLike,
    compare,
    lds,
    loo_correlation,
    pbrf_agreement,
)
from datafluence.scores import Scores
from datafluence.store import RunDir

KINDS = ("loo", "lds", "pbrf")
# the options that fix the reference classifier and its examples, shared with `scores`
SETUP = ("data", "model_name", "n_train", "n_queries", "epochs", "data_dir")
SETUP_KEYS = {"data": "--data", "model": "--model", "n_train": "--train", "n_queries": "--queries"}
RETRAIN = {
    "optimizer": "--optimizer",
    "steps": "--steps",
    "lr": "--lr",
    "l2": "--l2",
    "seeds_text": "--seeds",
}
ONLY_FOR = {  # option -> (kinds it applies to, flag)
    **{name: (("loo", "lds"), flag) for name, flag in RETRAIN.items()},
    "n_subsets": (("lds",), "--subsets"),
    "alpha": (("lds",), "--alpha"),
    "rows": (("loo", "pbrf"), "--rows"),
    "damping": (("pbrf",), "--damping"),
    "max_evals": (("pbrf",), "--max-evals"),
}
RECIPE_HELP = (
    "LOO and LDS retrain a fresh copy of the reference architecture from scratch for every "
    "seed (initial weights seeded by the seed, the same for the full model, every left-out "
    "model and every subset), with full-batch Adam (lr 1e-3, 50 steps, no weight decay) on "
    "the mean cross-entropy, then measure log p(y|x) of every query; effects are averaged "
    "over the seeds. Full batches make each retraining a deterministic, smooth function of "
    "its training set, so a leave-one-out difference is the example's effect, not "
    "minibatch-order noise. These retrained models are not the cached reference model the "
    "estimates were computed on: the ground truth is this recipe's expected effect. Raise "
    "--steps, --seeds and --subsets for larger settings. PBRF (Bae et al. 2022) needs no "
    "retraining: one proximal solve per training row around the reference weights, with "
    "--damping (use the same --damping for `datafluence scores`)."
)


def _reference_options(command: click.Command) -> click.Command:
    """Give `command` the very options (names, defaults, help) `scores` sets the reference
    classifier up with, so the same options mean the same model and example ids."""
    found = {p.name: p for p in scores_cli.scores_command.params if p.name in SETUP}
    missing = [name for name in SETUP if name not in found]
    if missing:  # a renamed option must not silently change what "the same options" means
        raise RuntimeError(f"`datafluence scores` has no options {missing} to share")
    command.params[2:2] = [copy.copy(found[name]) for name in SETUP]
    return command


def parse_rows(text: str | None) -> list[int | str] | None:
    """--rows: comma-separated positions, a:b ranges of positions, or example ids."""
    if text is None:
        return None
    rows: list[int | str] = []
    for item in comma_list(text):
        if ":" in item:
            lo, _, hi = item.partition(":")
            if not (lo.strip().isdigit() and hi.strip().isdigit()):
                raise ValueError(f"--rows range {item!r} must be two positions, like 0:50")
            rows.extend(range(int(lo), int(hi)))
        elif item.isdigit():
            rows.append(int(item))
        else:
            rows.append(item)
    if not rows:
        raise ValueError("--rows is empty; give positions (0,5,9), ranges (0:50) or example ids")
    return rows


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in comma_list(text))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 0")
    return seeds


def check_kind_options(ctx: click.Context, kind: str) -> None:
    """Refuse options the chosen kind does not use (they would be silently ignored)."""
    stray = [
        flag
        for name, (kinds, flag) in ONLY_FOR.items()
        if kind not in kinds and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    ]
    if stray:
        uses = {flag: "/".join(kinds) for kinds, flag in ONLY_FOR.values()}
        detail = ", ".join(f"{flag} ({uses[flag]} only)" for flag in stray)
        raise ValueError(f"--kind {kind} does not use {detail}; leave them out")


def fresh_copy_factory(model: nn.Module):
    """A factory of freshly initialised models of the reference's architecture."""
    make = type(model)
    try:
        probe = make()
    except TypeError as err:
        raise ValueError(
            f"cannot build a fresh {make.__name__} to retrain (it needs arguments: {err})"
        ) from None
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if {k: v.shape for k, v in probe.state_dict().items()} != shapes:
        raise ValueError(f"a fresh {make.__name__}() differs in shape from the reference model")
    return make


@_reference_options
@click.command("groundtruth", epilog=RECIPE_HELP)
@click.option("--kind", type=click.Choice(KINDS), required=True, help="Which ground truth.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "sgd", "lbfgs"]),
    default="adam",
    show_default=True,
    help="LOO/LDS retraining: full-batch optimiser.",
)
@click.option(
    "--steps",
    default=50,
    show_default=True,
    help="LOO/LDS: full-batch steps per retraining (L-BFGS: at most this many iterations).",
)
@click.option("--lr", default=1e-3, show_default=True, help="LOO/LDS: learning rate.")
@click.option("--l2", default=0.0, show_default=True, help="LOO/LDS: weight decay (l2/2)‖θ‖².")
@click.option(
    "--seeds",
    "seeds_text",
    default="0,1",
    show_default=True,
    help="LOO/LDS: initialisation seeds, averaged.",
)
@click.option("--subsets", "n_subsets", default=50, show_default=True, help="LDS: subsets.")
@click.option(
    "--alpha", default=0.5, show_default=True, help="LDS: fraction of training kept per subset."
)
@click.option(
    "--rows",
    default=None,
    help="LOO/PBRF: training rows (positions, a:b ranges or ids; default all).",
)
@click.option("--damping", default=0.01, show_default=True, help="PBRF: proximal damping λ.")
@click.option(
    "--max-evals",
    default=500,
    show_default=True,
    help="PBRF: objective evaluations per row (ReLU networks often use them all).",
)
@click.option("--overwrite", is_flag=True, help="Discard a run made with other settings.")
def groundtruth_command(
    kind: str,
    out: str,
    data: str,
    model_name: str,
    n_train: int,
    n_queries: int,
    epochs: int,
    data_dir: str | None,
    optimizer: str,
    steps: int,
    lr: float,
    l2: float,
    seeds_text: str,
    n_subsets: int,
    alpha: float,
    rows: str | None,
    damping: float,
    max_evals: int,
    overwrite: bool,
) -> None:
    """Ground truth for the reference classifier of `datafluence scores` (same options, same
    training and query ids), into a run directory; resumes if interrupted.

    --kind loo: leave-one-out retraining (Scores, method "loo"); lds: random-subset
    retraining for the linear datamodeling score; pbrf: the proximal Bregman response.
    Hold score runs against it with `datafluence evaluate RUN ... --against OUT`.
    """
    with cli_errors():
        check_kind_options(click.get_current_context(), kind)
        row_list = parse_rows(rows)
        seeds = parse_seeds(seeds_text)
        model, task, train, queries = scores_cli.reference_setup(
            data, model_name, n_train, n_queries, data_dir, epochs
        )
        settings: dict[str, Any] = {
            "command": "groundtruth",
            "kind": kind,
            "data": data,
            "model": model_name,
            "n_train": n_train,
            "n_queries": n_queries,
            "epochs": epochs,
        }
        if kind == "pbrf":
            settings.update(damping=damping, max_evals=max_evals)
        else:
            trainer = Trainer(
                task,
                optimizer=optimizer,  # type: ignore[arg-type]
                epochs=steps,
                max_iter=steps,
                lr=lr,
                batch_size=None,
                l2=l2,
            )
            settings.update(retrain="scratch", trainer=trainer.settings(), seeds=list(seeds))
        if kind == "lds":
            settings.update(n_subsets=n_subsets, alpha=alpha)
        else:
            settings.update(rows=row_list)
        run = RunDir(out).open(settings, overwrite=overwrite, kind=kind, method=kind)
        if run.meta().get("status") == "done":
            click.echo(f"{out} already holds this {kind} ground truth (done); nothing to do")
            return
        start = time.perf_counter()
        if kind == "lds":
            result = subset_retraining(
                task,
                fresh_copy_factory(model),
                train,
                queries,
                trainer,
                n_subsets=n_subsets,
                alpha=alpha,
                seeds=seeds,
                run=run,
                progress=True,
            )
            summary = f"{result.n_subsets} subsets x {len(seeds)} seeds"
        elif kind == "loo":
            scores = leave_one_out(
                task,
                fresh_copy_factory(model),
                train,
                queries,
                trainer,
                rows=row_list,
                seeds=seeds,
                run=run,
                progress=True,
            )
            scores.save(run.path)
            summary = f"{scores.shape[0]} left out x {len(seeds)} seeds"
        else:
            from datafluence.methods import PBRF

            scores = PBRF(task, damping=damping, max_iter=max_evals).score(
                model, train, queries, rows=row_list, run=run
            )
            scores.save(run.path)
            summary = f"{scores.shape[0]} training rows"
        for leftover in [*run.path.glob("loo-*.npy"), *run.path.glob("subsets-*.npy")]:
            leftover.unlink()  # working copies: the result above holds the same numbers
        run.drop_partitions()
        seconds = round(time.perf_counter() - start, 1)
        run.update_meta(status="done", kind=kind, seconds=seconds)
    click.echo(f"{kind}: {summary}, {len(queries)} queries -> {out} ({seconds} s)")


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------

SHOWN = {
    "lds": ["lds"],
    "loo": ["pearson", "spearman"],
    "scores": ["pearson", "spearman", "pearson_overall"],
}


def load_ground_truth(path: str) -> tuple[str, str, Any, Any]:
    """(kind, description, ground truth, metric) from a ground-truth run: subset retraining
    -> LDS, leave-one-out Scores -> LOO correlation, any other Scores (PBRF, or another
    method taken as the reference) -> PBRF-style agreement."""
    if SUBSETS_KEY in RunDir(path).meta():
        truth = SubsetRetraining.load(path)
        return "lds", f"LDS over {truth.n_subsets} retrained subsets", truth, lds
    reference = _load_scores(path, "--against")
    if reference.method == "loo":
        return "loo", "Correlation with leave-one-out retraining", reference, loo_correlation
    return "scores", f"Correlation with {reference.method} scores", reference, pbrf_agreement


def _load_scores(path: str, role: str) -> Scores:
    try:
        return Scores.load(path)
    except FileNotFoundError:
        raise ValueError(
            f"{path} holds no scores ({role}): is its run finished? Re-run its command to "
            "resume it (a subset-retraining ground truth has no scores: give it to --against)"
        ) from None


def _method_name(run: str, scores: Scores) -> str:
    """The run's method as its command named it (e.g. "ekfac"), else the Scores' method."""
    return str(RunDir(run).meta().get("method") or scores.method)


def _setup_of(path: str) -> dict[str, Any]:
    settings = RunDir(path).meta().get("settings") or {}
    return {k: settings[k] for k in SETUP_KEYS if k in settings}


def _mismatch_hint(run: str, against: str) -> str:
    mine, theirs = _setup_of(run), _setup_of(against)
    diffs = [
        f"{SETUP_KEYS[k]} {mine[k]} vs {theirs[k]}"
        for k in SETUP_KEYS
        if k in mine and k in theirs and mine[k] != theirs[k]
    ]
    if diffs:
        return (
            f"; {run} and {against} were made with different options ({', '.join(diffs)}): "
            f"re-run one of them with the other's options"
        )
    return "; score the same training and query examples as the ground truth"


@click.command("evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--against",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Ground-truth run directory (datafluence groundtruth, or any scores run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print {run: metrics} as JSON.")
def evaluate_command(runs: tuple[str, ...], against: str, as_json: bool) -> None:
    """Score runs against a ground truth, side by side: LDS for a subset-retraining run,
    Pearson/Spearman with a leave-one-out run, Pearson/Spearman with any other scores run
    (PBRF). Each run's full result is saved in its metrics.json under "against:<name>"."""
    if len(set(runs)) != len(runs):
        raise click.BadParameter("a run is given twice; list each run once", param_hint="RUNS")
    with cli_errors():
        kind, what, truth, metric = load_ground_truth(against)
        estimates = {run: _load_scores(run, "RUN") for run in runs}
        results: dict[str, dict[str, Any]] = {}

        def recorded(scores: ScoresLike, ground_truth: Any) -> dict[str, Any]:
            run = runs[len(results)]  # compare calls this once per run, in order
            try:
                results[run] = metric(scores, ground_truth)
            except ValueError as err:
                raise ValueError(f"{run}: {err}{_mismatch_hint(run, against)}") from None
            return results[run]

        table = compare(estimates, truth, recorded)
        for run, result in results.items():
            rundir = RunDir(run)
            rundir.save_metrics({**rundir.metrics(), f"against:{Path(against).name}": result})
    if "seconds" not in table.columns:
        table["seconds"] = float("nan")
    if as_json:
        scalars = {
            run: {
                **{k: v for k, v in result.items() if not isinstance(v, list)},
                "seconds": None
                if pd.isna(table.loc[run, "seconds"])
                else table.loc[run, "seconds"],
            }
            for run, result in results.items()
        }
        click.echo(json.dumps(scalars, indent=2))
        return
    view = table[[*SHOWN[kind], "n_undefined", "seconds"]].copy()
    view["n_undefined"] = view["n_undefined"].astype(int)
    view.insert(0, "method", [_method_name(run, estimates[run]) for run in view.index])
    n_train, n_query = len(truth.train_ids), len(truth.query_ids)
    click.echo(f"{what} ({against}: {n_train} train x {n_query} queries)")
    click.echo(view.to_string(float_format=lambda x: f"{x:.3f}"))
