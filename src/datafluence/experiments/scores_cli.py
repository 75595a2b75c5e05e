"""`datafluence scores` and `datafluence evaluate`: any method on a reference classifier or on a
causal language model and the user's own texts, and any run held against a ground-truth run.
Composition only: models, data and methods come from the library.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import click
import numpy as np
import torch
from click.core import ParameterSource
from torch import nn

from datafluence import distributed, store
from datafluence.datasets import load_fashion_mnist, load_mnist_subset
from datafluence.experiments._cli import cli_errors, comma_list
from datafluence.methods import Method, make_method
from datafluence.models import MLP, SmallCNN, TrainRecipe, train_classifier
from datafluence.models.defaults import LM_BLOCKS, default_lm_modules, default_representation_layer
from datafluence.models.training import State, train_classifier_checkpoints
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import ClassificationTask, Examples, Task

if TYPE_CHECKING:
    from datafluence.methods.influence import InfluenceFunction

CURVATURES = ("ekfac", "kfac", "lissa", "cg", "explicit", "identity", "diagonal", "arnoldi")
METHODS = (*CURVATURES, "tracin", "trak", "gradsim", "repsim", "tfidf")
TEXT_METHODS = tuple(m for m in METHODS if m != "tracin")
DAMPED = (*(c for c in CURVATURES if c != "identity"), "trak")
# Curvature-vector products differentiate twice: attention must be the eager kind.
SECOND_ORDER = ("cg", "lissa", "arnoldi", "explicit")
SPURIOUS_THRESHOLD = 2 / 3
IMAGE_OPTIONS = {
    "data": "--data",
    "model_name": "--model",
    "n_train": "--train",
    "n_queries": "--queries",
    "epochs": "--epochs",
    "data_dir": "--data-dir",
}
TEXT_ONLY_OPTIONS = {"lm": "--lm", "per_token": "--per-token", "prefilter": "--prefilter"}


class Reference(NamedTuple):
    """The reference classifier, its data, and (when asked) its training run's checkpoints."""

    model: nn.Module
    task: ClassificationTask
    train: Examples
    queries: Examples
    recipe: TrainRecipe
    checkpoints: list[State] | None  # the weights after every epoch; the last = `model`'s


def reference(
    data: str,
    model_name: str,
    n_train: int,
    n_queries: int,
    data_dir: str | None,
    epochs: int,
    checkpoints: bool = False,
) -> Reference:
    """A classifier trained (and cached) on the first n_train examples, and the queries.

    With `checkpoints`, the same training run also keeps (and caches) its per-epoch weights,
    for TracIn-CP; the final model is the same either way.
    """
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
    recipe = TrainRecipe(epochs=epochs)
    training: dict[str, Any] = {
        "make_model": SmallCNN if model_name == "cnn" else MLP,
        "images": train_set.images,
        "labels": train_set.labels,
        "recipe": recipe,
        "name": f"{model_name}-{data}",
        "data_key": store.tensors_fingerprint({"x": train_set.images, "y": train_set.labels}),
        "progress": False,
    }
    states = None
    if checkpoints:
        model, states, _ = train_classifier_checkpoints(**training)
    else:
        model, _ = train_classifier(**training)
    task = ClassificationTask(num_classes=10)
    train = task.examples(train_set.images, train_set.labels, train_set.ids)
    queries = task.examples(query_set.images, query_set.labels, query_set.ids)
    return Reference(model, task, train, queries, recipe, states)


def reference_setup(
    data: str, model_name: str, n_train: int, n_queries: int, data_dir: str | None, epochs: int
) -> tuple[nn.Module, ClassificationTask, Examples, Examples]:
    """`reference` without checkpoints: model, task, training examples, queries."""
    ref = reference(data, model_name, n_train, n_queries, data_dir, epochs)
    return ref.model, ref.task, ref.train, ref.queries


def text_setup(
    train_file: str, query_file: str, lm: str, method_name: str
) -> tuple[nn.Module | None, Task | None, Examples, Examples]:
    """The user's texts, tokenized for their causal LM; tfidf reads raw texts (no model)."""
    from datafluence.datasets.text_files import read_texts

    train_items, train_ids = read_texts(train_file, "--train-file")
    query_items, query_ids = read_texts(query_file, "--query-file")
    if method_name == "tfidf":  # the texts are the data: no model, no tokenizer
        return (
            None,
            None,
            raw_examples(train_items, train_ids),
            raw_examples(query_items, query_ids),
        )
    from datafluence.models.language import load_causal_lm
    from datafluence.tasks import CausalLMTask

    attention = "eager" if method_name in SECOND_ORDER else None
    model, tokenizer = load_causal_lm(
        None if lm == "default" else lm, progress=False, attn_implementation=attention
    )
    task = CausalLMTask(tokenizer)
    return model, task, task.examples(train_items, train_ids), task.examples(query_items, query_ids)


def raw_examples(items: list[Any], ids: list[str]) -> Examples:
    """Texts as examples without tensors of their own (row numbers), for text similarity."""
    return Examples({"row": torch.arange(len(items))}, tuple(ids), tuple(items))


def select_modules(model: nn.Module, spec: str | None, text: bool) -> list[str] | None:
    """--modules as names for the methods: comma-separated names or globs; "all" (and the
    default on a classifier) = None, every Linear/Conv layer; the default on a language
    model is the library's (`models.defaults.default_lm_modules`)."""
    from datafluence.gradients.layers import resolve_layers

    if spec is None and text:
        return default_lm_modules(model)
    if spec is None or spec.strip() == "all":
        return None
    chosen = comma_list(spec)
    if not chosen:
        raise ValueError("--modules is empty; give module names or globs, or 'all'")
    # names and globs are resolved (and checked, with close names) by the methods' layers
    return [layer.name for layer in resolve_layers(model, chosen)]


def make_cli_method(
    name: str,
    task: Task | None,
    damping: float | None = None,
    damping_factor: float | None = None,
    modules: list[str] | None = None,
    layer: str | None = None,
    checkpoints: list[State] | None = None,
    learning_rate: float | None = None,
    projection_dim: int | None = None,
) -> Method:
    """The method behind a --method name, from the library's registry. tracin needs the
    reference run's `checkpoints` and its `learning_rate` (one per epoch, as Pruthi et al.
    weight SGD checkpoints). --damping / --damping-factor mean the same for every method."""
    if (damping is not None or damping_factor is not None) and name not in DAMPED:
        raise ValueError(
            f"--damping / --damping-factor do not apply to {name} (it is not damped); "
            f"they apply to {', '.join(DAMPED)}"
        )
    if projection_dim is not None and name != "trak":
        raise ValueError("--projection-dim applies to --method trak only")
    options: dict[str, Any] = {}
    if name in DAMPED:
        options.update(damping=damping, damping_factor=damping_factor)
    if name == "tfidf":
        return make_method(name, None)
    options["progress"] = False
    if name in CURVATURES or name in ("gradsim", "trak"):
        options["modules"] = modules
    if name == "tracin":
        if checkpoints is None or learning_rate is None:
            raise ValueError(
                "tracin needs the reference model's epoch checkpoints and training learning "
                "rate (reference(..., checkpoints=True))"
            )
        options.update(checkpoints=checkpoints, learning_rates=learning_rate, modules=modules)
    if name == "trak" and projection_dim is not None:
        options["projection_dim"] = projection_dim
    if name == "repsim":
        options["module"] = layer
    return make_method(name, task, **options)


def check_options(
    ctx: click.Context,
    method_name: str,
    train_file: str | None,
    query_file: str | None,
    per_token: bool,
    prefilter: int | None,
) -> bool:
    """Whether this is a text run; refuses options that do not go together, naming the fix."""

    def given(names: dict[str, str]) -> list[str]:
        return [
            flag
            for name, flag in names.items()
            if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
        ]

    text = train_file is not None or query_file is not None
    if text and (train_file is None or query_file is None):
        raise ValueError("text data needs both --train-file and --query-file")
    if not text:
        if given(TEXT_ONLY_OPTIONS) or method_name == "tfidf":
            flags = given(TEXT_ONLY_OPTIONS) or ["--method tfidf"]
            raise ValueError(
                f"{', '.join(flags)} work on text data only: give --train-file and --query-file "
                "(JSON Lines or .txt), or leave them out for the reference image classifiers"
            )
        return False
    mixed = given(IMAGE_OPTIONS)
    if mixed:
        raise ValueError(
            f"{', '.join(mixed)} describe the reference image setup; with --train-file / "
            "--query-file the data are your texts and the model is --lm: leave them out"
        )
    if method_name not in TEXT_METHODS:
        raise ValueError(
            f"{method_name} cannot run on text data (TracIn-CP needs training checkpoints, "
            f"which one --lm model does not have); on text choose one of {', '.join(TEXT_METHODS)}"
        )
    if per_token and method_name not in CURVATURES:
        raise ValueError(
            f"--per-token splits influence-function scores over training tokens; use it with "
            f"one of {', '.join(CURVATURES)}, not {method_name}"
        )
    if prefilter is not None:
        if prefilter < 1:
            raise ValueError(f"--prefilter must be at least 1 candidate per query, got {prefilter}")
        if method_name == "tfidf":
            raise ValueError(
                "--prefilter narrows model-based methods to BM25 candidates; tfidf "
                "scores every pair cheaply already: leave it out"
            )
        if per_token:
            raise ValueError("--per-token and --prefilter do not combine; run them separately")
    return True


def check_explicit_size(model: nn.Module, modules: list[str] | None) -> None:
    """explicit builds a P x P matrix: refuse it before any work when P is too large."""
    from datafluence.curvature.explicit import MAX_DIM
    from datafluence.gradients.space import ParamSpace

    dim = ParamSpace.of(model, modules).dim
    if dim > MAX_DIM:
        raise ValueError(
            f"explicit needs the {dim:,} x {dim:,} curvature matrix of the chosen modules (at "
            f"most {MAX_DIM:,} parameters); on a language model use ekfac, kfac, cg, lissa or "
            "arnoldi, or name a few small layers with --modules"
        )


def spurious_summary(result: Scores, top: int = 10) -> dict[str, Any]:
    """The share of (train, query) pairs whose influence sits on one or two tokens, and the
    `top` such pairs by |score| (the ones a reader would otherwise take at face value)."""
    from datafluence.metrics import spurious_sequences

    ratio, flags = spurious_sequences(result, SPURIOUS_THRESHOLD)
    values = np.asarray(result.values, dtype=np.float64)
    pairs = np.argwhere(flags)
    order = np.argsort(-np.abs(values[flags]), kind="stable")[:top]
    return {
        "threshold": SPURIOUS_THRESHOLD,
        "share_flagged": float(flags.mean()),
        "n_flagged": int(flags.sum()),
        "top_flagged": [
            {
                "train": result.train_ids[i],
                "query": result.query_ids[j],
                "score": float(values[i, j]),
                "ratio": float(ratio[i, j]),
            }
            for i, j in pairs[order].tolist()
        ],
    }


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
@click.option(
    "--damping",
    type=float,
    default=None,
    help="Absolute damping λ added to the mean curvature (influence functions; TRAK: the mean "
    "kernel). Means the same for every method.",
)
@click.option(
    "--damping-factor",
    type=float,
    default=None,
    help="Relative damping: λ = factor x the mean eigenvalue (default 0.1 for influence "
    "functions, 1e-3 for TRAK). Give this or --damping, not both.",
)
@click.option(
    "--projection-dim",
    type=int,
    default=None,
    help="trak: projection dimension k (default 2048; keep it well below --train).",
)
@click.option(
    "--epochs",
    default=5,
    show_default=True,
    help="Epochs of the reference model (cached). tracin is TracIn-CP over its checkpoint "
    "after every epoch, each weighted by the Adam learning rate (1e-3): Pruthi et al.'s SGD "
    "weighting, an approximation under Adam.",
)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option(
    "--train-file",
    type=click.Path(dir_okay=False),
    default=None,
    help='Training texts: JSON Lines ({"text": ...} or {"prompt": ..., "completion": ...}, '
    'optional "id") or .txt (one per line). Replaces the image setup.',
)
@click.option("--query-file", type=click.Path(dir_okay=False), default=None, help="Query texts.")
@click.option(
    "--lm",
    default="default",
    show_default=True,
    help="Local Hugging Face causal-LM directory, or 'default' (bundled SmolLM2-135M).",
)
@click.option(
    "--modules",
    "modules_spec",
    default=None,
    help="Layers to attribute through: comma-separated names or globs "
    "('model.layers.*.mlp.*'), or 'all'. Default: every layer of a classifier; the MLP "
    f"projections of a language model's last {LM_BLOCKS} blocks.",
)
@click.option(
    "--layer",
    default=None,
    help="repsim: module whose output is compared (default: a language model's last block, "
    "a classifier's last ReLU).",
)
@click.option(
    "--per-token",
    is_flag=True,
    help="Text, influence methods: per-token parts and spurious-sequence flags (metrics.json).",
)
@click.option(
    "--prefilter",
    type=int,
    default=None,
    help="Text: score only each query's top-K BM25 candidates (the rest NaN).",
)
@click.option("--overwrite", is_flag=True, help="Discard a run made with other settings.")
def scores_command(
    method_name: str,
    out: str,
    data: str,
    model_name: str,
    n_train: int,
    n_queries: int,
    damping: float | None,
    damping_factor: float | None,
    projection_dim: int | None,
    epochs: int,
    data_dir: str | None,
    train_file: str | None,
    query_file: str | None,
    lm: str,
    modules_spec: str | None,
    layer: str | None,
    per_token: bool,
    prefilter: int | None,
    overwrite: bool,
) -> None:
    """Attribution scores of one method into a run directory: on a reference classifier, or
    on a causal language model (--lm) and your texts (--train-file, --query-file).

    Under `torchrun --nproc_per_node N` the training rows are shared out across the N
    processes; the result equals a single process's.
    """
    with cli_errors():
        text = check_options(
            click.get_current_context(), method_name, train_file, query_file, per_token, prefilter
        )
        distributed.init_from_env()
        tracin: dict[str, Any] = {}  # the reference run's checkpoints and lr, for TracIn-CP
        with distributed.main_first():  # rank 0 trains/converts and caches, the others load
            if text:
                assert train_file is not None and query_file is not None
                model, task, train, queries = text_setup(train_file, query_file, lm, method_name)
            else:
                ref = reference(
                    data, model_name, n_train, n_queries, data_dir, epochs, method_name == "tracin"
                )
                model, task, train, queries = ref.model, ref.task, ref.train, ref.queries
                if method_name == "tracin":
                    tracin = {"checkpoints": ref.checkpoints, "learning_rate": ref.recipe.lr}
        modules = None if model is None else select_modules(model, modules_spec, text)
        layer_given = layer is not None
        if method_name == "repsim" and model is not None:
            layer = layer or default_representation_layer(model, task)
        if method_name == "explicit" and text and model is not None:
            check_explicit_size(model, modules)
        method = make_cli_method(
            method_name,
            task,
            damping,
            damping_factor,
            modules,
            layer,
            projection_dim=projection_dim,
            **tracin,
        )
        settings: dict[str, Any] = {"command": "scores", "method": method_name}
        meta: dict[str, Any] = {"method": method_name}
        if text:
            settings["texts"] = store.fingerprint(
                [train.ids, train.items, queries.ids, queries.items]
            )
            if model is not None:
                settings["lm"] = lm if lm == "default" else str(Path(lm).resolve())
            meta.update(train_file=str(train_file), query_file=str(query_file))
        else:
            settings.update(
                data=data, model=model_name, n_train=n_train, n_queries=n_queries, epochs=epochs
            )
            if tracin:  # TracIn-CP over the reference run's epochs
                settings["checkpoints"] = {
                    "count": len(tracin["checkpoints"]),
                    "epochs": list(range(1, epochs + 1)),
                    "learning_rate": tracin["learning_rate"],
                    "optimizer": "adam",
                }
        settings["damping"] = damping
        if damping_factor is not None:
            settings["damping_factor"] = damping_factor
        if projection_dim is not None:
            settings["projection_dim"] = projection_dim
        if modules_spec is not None or (text and model is not None):
            settings["modules"] = modules
        if method_name == "repsim" and (text or layer_given):
            settings["layer"] = layer
        if prefilter is not None:
            settings["prefilter"] = prefilter
        if per_token:
            settings["per_token"] = True
        run = RunDir(out).open(settings, overwrite=overwrite, **meta)
        if method_name != "tfidf":  # factors saved in the run: reused when resuming
            with distributed.main_first():  # rank 0 fits and saves, the others load
                method.fit(model, train, run=run)
        if per_token:
            # --per-token is checked to name a curvature: an InfluenceFunction
            influence = cast("InfluenceFunction", method)
            result = influence.token_scores(model, train, queries, run=run)
        elif prefilter is not None:
            from datafluence.methods import prefiltered

            result = prefiltered(method, model, train, queries, k=prefilter, run=run)
        else:
            result = method.score(model, train, queries, run=run)
        if not distributed.is_main():
            return  # every rank holds the same result; rank 0 alone writes and reports it
        result.save(run.path)
        if per_token:
            run.save_metrics({**run.metrics(), "spurious_sequences": spurious_summary(result)})
        run.drop_partitions()
        run.update_meta(status="done")
    values = np.asarray(result.values)
    computed = values[np.isfinite(values)]
    click.echo(
        f"{method_name}: {result.shape[0]} train x {result.shape[1]} queries -> {out}/scores.npy "
        f"(mean {computed.mean():.4g}, max |s| {np.abs(computed).max():.4g}"
        + (f", {computed.size} of {values.size} computed)" if computed.size < values.size else ")")
    )
