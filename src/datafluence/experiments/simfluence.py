"""Simfluence (Guu et al., 2023): learn a simulator of training runs, then ask it what-ifs.

Many short fine-tuning runs start from one checkpoint, each on its own random curriculum
(a random half of a training pool, in random order), and every test example's loss is
logged after every step. Three simulators (additive, multiplicative, linear) are fitted on
the training runs, rolled out from L_0 alone on held-out runs, and scored against TracIn-CP
(gradient dot products at every checkpoint of a reference run, learning-rate weighted,
rolled out additively) and the do-nothing reference L_t = L_0: all-steps MSE and final-step
Spearman across test examples, mean ± std over held-out runs. Then counterfactual
curricula (remove a class, duplicate the most helpful example, put a class first / last,
remove the most helpful examples) are really trained and compared with the predictions.

Default model and data, and why: an MLP (784-128-10) started from a *partially trained*
checkpoint (3 Adam epochs on 200 digits kept out of the pool, ~60 % test accuracy) and
fine-tuned with SGD on a pool of 300 of the 1,000 MNIST digits bundled with the package,
measured on 100 others.

* The bundled digits need no download, so the experiment and its tests run wherever the
  package is installed (`--dataset fashion-mnist` reads the official idx files instead).
* An MLP step, with the 100 test losses measured after it, takes ~1.5 ms on one CPU core
  (the SmallCNN ~33 ms), so 48 runs, TracIn at every step and the counterfactual
  re-trainings take seconds and the time budget goes to the simulators' fits, which grow
  with the pool and the test set, not with the model.
* From a partially trained start, fine-tuning moves each test loss its own way: some fall
  towards 0 and saturate, some barely move, some rise. That saturation is what an
  additive roll-out (and TracIn's) cannot follow and the linear simulator's multiplicative
  term can, which is the effect the paper reports.

`--model smollm2-135m` (or a local Hugging Face causal-LM folder) switches to LoRA
fine-tuning of a language model on short texts: `--texts FILE` (one text per line,
optionally `domain<TAB>text`) or, by default, built-in sentences about fictional
entities from six knowledge domains. Groups for the counterfactuals are then domains.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from datafluence.datasets import (
    IMAGE_DATASETS,
    default_texts,
    read_domain_texts,
    split_images,
    split_texts,
)
from datafluence.experiments._cli import cli_errors, comma_floats, comma_list
from datafluence.report.simfluence_figures import (
    plot_counterfactuals,
    plot_final_losses,
    plot_trajectories,
)
from datafluence.report.simfluence_tables import counterfactual_table, summary_table
from datafluence.simfluence import (
    NO_CHANGE,
    SIMULATORS,
    TRACIN,
    NoChangeSimulator,
    Setup,
    Simulator,
    TracInCPSimulator,
    classifier_setup,
    collect_runs,
    compare_counterfactuals,
    counterfactual_edits,
    evaluate_held_out,
    linear_finding,
    lm_setup,
    load_simulator,
    load_tracin,
    make_simulator,
    save_tracin,
    tracin_cp,
)
from datafluence.store import RunDir

CLASSIFIER = "mlp"
DATASETS = IMAGE_DATASETS
SIM_KINDS = tuple(SIMULATORS)  # additive, multiplicative, linear


@dataclass(frozen=True)
class SimfluenceConfig:
    """Everything that changes the experiment's numbers (saved in meta.json).

    `runs` are the training runs (the last `val_runs` of them choose λ, then the simulators
    are refitted on all); `held_out` more runs are only used to evaluate. Each run trains
    `steps` optimizer steps of `batch_size` examples from its own random `subset_fraction`
    of the pool. `model="mlp"` is the classifier path; anything else names a causal LM
    (`"smollm2-135m"` or a local folder) fine-tuned with LoRA on `texts`.
    """

    model: str = CLASSIFIER
    dataset: str = "mnist-subset"
    pool_size: int = 300
    test_size: int = 100
    runs: int = 40
    held_out: int = 8
    val_runs: int = 4
    steps: int = 40
    batch_size: int = 8
    lr: float = 0.03
    optimizer: str = "sgd"
    subset_fraction: float = 0.5
    lams: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    tracin_every: int = 1
    group: str = "3"  # the class (digit / label index) or text domain the group edits use
    duplicate_k: int = 10
    top_fraction: float = 0.1  # share of the pool removed in the "remove most helpful" edit
    seed: int = 0
    # classifier start: an MLP pre-trained on examples kept out of the pool and test set
    pretrain_size: int = 200
    pretrain_epochs: int = 3
    hidden: int = 128
    # language-model path
    texts: str | None = None
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        positive = ("pool_size", "test_size", "runs", "held_out", "steps", "batch_size")
        for name in (*positive, "tracin_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.test_size < 2:
            raise ValueError(f"test_size must be at least 2 (Spearman), got {self.test_size}")
        if not 0 <= self.val_runs < self.runs:
            raise ValueError(
                f"val_runs must be between 0 and runs - 1 = {self.runs - 1}, got {self.val_runs}"
            )
        if len(self.lams) > 1 and self.val_runs < 1:
            raise ValueError("choosing λ from a grid needs val_runs >= 1 (or give one λ)")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 < self.subset_fraction <= 1:
            raise ValueError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if not 0 < self.top_fraction < 1:
            raise ValueError(f"top_fraction must be in (0, 1), got {self.top_fraction}")
        if self.duplicate_k < 1 or self.duplicate_k >= self.steps * self.batch_size:
            raise ValueError(
                f"duplicate_k must be between 1 and steps x batch_size - 1, got {self.duplicate_k}"
            )
        if self.model == CLASSIFIER:
            if self.dataset not in DATASETS:
                raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {DATASETS}")
            if self.pretrain_size < 1 or self.pretrain_epochs < 0 or self.hidden < 1:
                raise ValueError("pretrain_size and hidden must be >= 1, pretrain_epochs >= 0")
        object.__setattr__(self, "lams", tuple(float(v) for v in self.lams))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "group", str(self.group))

    @property
    def is_lm(self) -> bool:
        return self.model != CLASSIFIER

    @property
    def subset_size(self) -> int | None:
        size = max(1, round(self.subset_fraction * self.pool_size))
        return None if size >= self.pool_size else size

    @classmethod
    def for_lm(cls, model: str = "smollm2-135m", **overrides: Any) -> SimfluenceConfig:
        """A reduced language-model run: LoRA (Adam) on 48 short texts, 16 test texts,
        10 + 3 runs of 8 steps of 4 (~10 min on 2 CPU cores with SmolLM2-135M)."""
        defaults: dict[str, Any] = dict(
            model=model,
            pool_size=48,
            test_size=16,
            runs=10,
            held_out=3,
            val_runs=2,
            steps=8,
            batch_size=4,
            lr=1e-3,
            optimizer="adam",
            duplicate_k=4,
            group="astronomy",
            # Summed-token losses are ~50-100 nats (an MLP's ~1), so the A block's features
            # L_{t-1} are ~100x larger and a comparable penalty is ~10^4x larger.
            lams=(0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5),
        )
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        unused: tuple[str, ...] = ("texts", "lora_rank", "lora_targets") if not self.is_lm else ()
        unused += ("dataset", "pretrain_size", "pretrain_epochs", "hidden") if self.is_lm else ()
        return {k: v for k, v in out.items() if k not in unused}


# ---------------------------------------------------------------------------- the experiment


def run(
    out: str | Path,
    config: SimfluenceConfig | None = None,
    *,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment into `out`; returns metrics.json's content.

    `threads` sets torch's threads while it runs (restored after): by default 1 for the
    MLP, whose ops are too small to share (on a busy machine 2 threads made a step ~100x
    slower), and torch's own setting for a language model. On a machine shared with other
    jobs, 1 is also best for the LM, and OPENBLAS_NUM_THREADS=1 for the simulators' fits.

    Saved as it goes, so an interrupted run resumes where it stopped: the start model
    (model.safetensors), every training run (collection/runs/), the TracIn dot products
    (tracin/), each fitted simulator (simulators/) and each really trained counterfactual
    (counterfactuals/). Scores [pool, test] of every simulator go to scores/<kind>/.
    """
    config = config or SimfluenceConfig()
    before = torch.get_num_threads()
    if threads is None:
        threads = before if config.is_lm else 1
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        return _run(out, config, data_dir, overwrite, progress, log)
    finally:
        torch.set_num_threads(before)


def _run(
    out: str | Path,
    config: SimfluenceConfig,
    data_dir: str | Path | None,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], Any],
) -> dict[str, Any]:
    started = time.perf_counter()
    rundir = RunDir(out).open(
        {"experiment": "simfluence", **config.to_dict()},
        overwrite=overwrite,
        method="simfluence",
    )
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    setup = _setup(config, rundir, data_dir, progress)
    timings["setup"] = time.perf_counter() - tick
    log(
        f"pool {len(setup.pool)}, test {len(setup.test)}; start model: "
        + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in setup.info.items()
        )
    )

    tick = time.perf_counter()
    n_total = config.runs + config.held_out
    curricula, losses = collect_runs(
        setup.make_model,
        setup.pool,
        setup.test,
        setup.task,
        n_total,
        config.steps,
        config.batch_size,
        config.lr,
        config.seed,
        rundir.sub("collection"),
        optimizer=config.optimizer,  # type: ignore[arg-type]
        subset_size=config.subset_size,
        progress=progress,
    )
    timings["collect_runs"] = time.perf_counter() - tick
    log(f"{n_total} runs of {config.steps} steps collected in {timings['collect_runs']:.1f}s")
    train_c, train_l = curricula[: config.runs], losses[: config.runs]
    held_c, held_l = curricula[config.runs :], losses[config.runs :]
    pool_ids, test_ids = setup.pool.ids, setup.test.ids

    simulators: dict[str, Any] = {}
    for kind in SIM_KINDS:
        tick = time.perf_counter()
        simulators[kind] = _fitted(rundir, kind, config, train_c, train_l, pool_ids, test_ids)
        timings[f"fit_{kind}"] = time.perf_counter() - tick
        log(f"{kind} simulator: λ = {simulators[kind].lam_:g} ({timings[f'fit_{kind}']:.1f}s)")

    tick = time.perf_counter()
    simulators[TRACIN] = _tracin(rundir, setup, config, train_c[0], progress)
    simulators[NO_CHANGE] = NoChangeSimulator()
    timings["tracin"] = time.perf_counter() - tick
    for kind in (*SIM_KINDS, TRACIN):
        simulators[kind].scores().save(rundir.path / "scores" / kind)

    per_run, evaluation = evaluate_held_out(simulators, held_c, held_l, pool_ids)

    tick = time.perf_counter()
    edits = counterfactual_edits(
        setup,
        simulators["linear"],
        held_c[0],
        config.group,
        top_fraction=config.top_fraction,
        duplicate_k=config.duplicate_k,
        seed=config.seed,
    )
    counterfactuals, edited = compare_counterfactuals(
        rundir.path / "counterfactuals",
        setup,
        edits,
        simulators,
        held_c[0],
        held_l[0],
        lr=config.lr,
        optimizer=config.optimizer,  # type: ignore[arg-type]
        seed=config.seed,
        run=config.runs,  # held-out run 0's index in the collection
    )
    timings["counterfactuals"] = time.perf_counter() - tick

    metrics: dict[str, Any] = {
        "setup": {"pool_size": len(pool_ids), "test_size": len(test_ids), **setup.info},
        "runs": {
            "train": config.runs,
            "held_out": config.held_out,
            "val_runs": config.val_runs,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "subset_size": config.subset_size or len(pool_ids),
            "mean_loss_start": float(losses[:, 0].mean()),
            "mean_loss_end": float(losses[:, -1].mean()),
        },
        "lambda": {k: simulators[k].lam_ for k in SIM_KINDS},
        "lambda_selection": {
            k: simulators[k].selection_.to_dict(orient="records")
            for k in SIM_KINDS
            if simulators[k].selection_ is not None
        },
        "evaluation": evaluation,
        "evaluation_per_run": {
            k: table.drop(columns="run").to_dict(orient="list") for k, table in per_run.items()
        },
        "finding": linear_finding(evaluation),
        "counterfactuals": counterfactuals,
    }

    tick = time.perf_counter()
    figures = rundir.figures
    plot_trajectories(simulators, held_c[0], held_l[0], pool_ids, test_ids, figures)
    plot_final_losses(simulators, held_c, held_l, pool_ids, evaluation, figures)
    plot_counterfactuals(edited, simulators["linear"], held_c[0], held_l[0], pool_ids, figures)
    timings["figures"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    rundir.save_metrics(metrics)
    rundir.update_meta(status="done", timings=metrics["timings"])
    log(summary_table(metrics).to_string())
    log("")
    log(counterfactual_table(metrics).to_string())
    return metrics


def _setup(
    config: SimfluenceConfig, rundir: RunDir, data_dir: str | Path | None, progress: bool
) -> Setup:
    """The model family's data split and start model; the start is saved in the run."""
    start_path = rundir.path / "model.safetensors"
    if config.is_lm:
        items = read_domain_texts(config.texts) if config.texts else default_texts()
        chosen, ids = split_texts(items, config.pool_size, config.test_size, config.seed)
        return lm_setup(
            config.model,
            chosen,
            ids,
            pool_size=config.pool_size,
            lora_rank=config.lora_rank,
            lora_targets=config.lora_targets,
            seed=config.seed,
            start_path=start_path,
            source=config.texts or "built-in knowledge-domain sentences",
            progress=progress,
        )
    pre, pool, test = split_images(
        config.dataset,
        config.pretrain_size,
        config.pool_size,
        config.test_size,
        config.seed,
        data_dir,
    )
    return classifier_setup(
        pre,
        pool,
        test,
        hidden=config.hidden,
        pretrain_epochs=config.pretrain_epochs,
        seed=config.seed,
        start_path=start_path,
        dataset=config.dataset,
        progress=progress,
    )


def _fitted(
    rundir: RunDir,
    kind: str,
    config: SimfluenceConfig,
    curricula: np.ndarray,
    losses: np.ndarray,
    pool_ids: tuple[str, ...],
    test_ids: tuple[str, ...],
) -> Simulator:
    """The `kind` simulator fitted on the training runs (saved, resumable)."""
    path = rundir.path / "simulators" / f"{kind}.npz"
    if path.exists():
        return load_simulator(path)
    lam = config.lams if len(config.lams) > 1 else config.lams[0]
    sim = make_simulator(kind, lam=lam)
    sim.fit(curricula, losses, pool_ids, test_ids, val_runs=config.val_runs)
    sim.save(path)
    return sim


def _tracin(
    rundir: RunDir, setup: Setup, config: SimfluenceConfig, curriculum: np.ndarray, progress: bool
) -> TracInCPSimulator:
    """TracIn-CP from every `tracin_every`-th checkpoint of training run 0 (saved, resumable)."""
    path = rundir.path / "tracin" / "dots.npz"
    if path.exists():
        return load_tracin(path, setup.pool.ids, setup.test.ids)
    sim = tracin_cp(
        setup.make_model,
        setup.pool,
        setup.test,
        setup.task,
        curriculum,
        config.lr,
        optimizer=config.optimizer,  # type: ignore[arg-type]
        seed=config.seed,
        run=0,
        every=config.tracin_every,
        progress=progress,
    )
    save_tracin(sim, path)
    return sim


# ---------------------------------------------------------------------------- CLI


@click.command("simfluence")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--model",
    default=CLASSIFIER,
    show_default=True,
    help="'mlp' (classifier), or a causal LM for LoRA: 'smollm2-135m' or a local folder.",
)
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    default="mnist-subset",
    show_default=True,
    help="Classifier data: bundled MNIST digits, or Fashion-MNIST idx files.",
)
@click.option(
    "--texts",
    type=click.Path(dir_okay=False),
    default=None,
    help="LM text pool, one text per line (optionally 'domain<TAB>text').",
)
@click.option("--pool-size", type=int, default=None, help="Training pool size [300; LM 48].")
@click.option("--test-size", type=int, default=None, help="Test examples [100; LM 16].")
@click.option(
    "--runs", type=int, default=None, help="Training runs, incl. λ validation [40; LM 10]."
)
@click.option("--held-out", type=int, default=None, help="Held-out evaluation runs [8; LM 3].")
@click.option("--val-runs", type=int, default=None, help="Training runs that choose λ [4; LM 2].")
@click.option("--steps", type=int, default=None, help="Steps per run [40; LM 8].")
@click.option("--batch-size", type=int, default=None, help="Examples per step [8; LM 4].")
@click.option("--lr", type=float, default=None, help="Learning rate [0.03 SGD; LM 1e-3 Adam].")
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adam"]),
    default=None,
    help="Optimizer of the runs [sgd; LM adam].",
)
@click.option("--lams", default=None, help="λ grid, comma-separated [0.01,...,1000].")
@click.option(
    "--group",
    default=None,
    help="Class (digit) or text domain the group edits move [3; LM astronomy].",
)
@click.option("--tracin-every", type=int, default=None, help="TracIn checkpoint every k steps [1].")
@click.option("--lora-targets", default=None, help="LoRA target modules [q_proj,v_proj].")
@click.option("--seed", type=int, default=None, help="Seed of data split, curricula, init [0].")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with the Fashion-MNIST idx files.",
)
@click.option(
    "--threads", type=int, default=None, help="Torch threads [1 for the MLP; torch's for an LM]."
)
@click.option("--overwrite", is_flag=True, help="Discard a run made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(
    out: str,
    model: str,
    dataset: str,
    texts: str | None,
    lams: str | None,
    lora_targets: str | None,
    data_dir: str | None,
    threads: int | None,
    overwrite: bool,
    quiet: bool,
    **knobs: Any,
) -> None:
    """Simfluence: fit simulators of training runs, test them on held-out and counterfactual runs."""
    with cli_errors():
        given = {k: v for k, v in knobs.items() if v is not None}
        if lams is not None:
            given["lams"] = comma_floats(lams)
        if lora_targets is not None:
            given["lora_targets"] = comma_list(lora_targets)
        if model == CLASSIFIER:
            config = SimfluenceConfig(model=model, dataset=dataset, **given)
        else:
            config = SimfluenceConfig.for_lm(model, texts=texts, **given)
        run(
            out,
            config,
            data_dir=data_dir,
            overwrite=overwrite,
            progress=not quiet,
            log=click.echo,
            threads=threads,
        )
    click.echo(f"results in {out}/ (metrics.json, figures/, scores/<simulator>/)")


__all__ = [
    "SimfluenceConfig",
    "command",
    "counterfactual_table",
    "run",
    "summary_table",
]
