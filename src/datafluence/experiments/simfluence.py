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
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from datafluence import store  # noqa: E402
from datafluence.datasets import (  # noqa: E402
    ImageSet,
    load_fashion_mnist,
    load_mnist_subset,
)
from datafluence.experiments._cli import cli_errors, comma_floats, comma_list  # noqa: E402
from datafluence.models import TrainRecipe, evaluate_accuracy, train_classifier  # noqa: E402
from datafluence.report.figures import _save as save_figure  # noqa: E402
from datafluence.simfluence import (  # noqa: E402
    SIMULATORS,
    NoChangeSimulator,
    Simulator,
    TracInCPSimulator,
    collect_runs,
    duplicate,
    effect_agreement,
    evaluate,
    load_simulator,
    make_simulator,
    put_first,
    put_last,
    remove,
    summarize,
    tracin_cp,
    train_curriculum,
)
from datafluence.store import RunDir  # noqa: E402
from datafluence.tasks import CausalLMTask, ClassificationTask, Examples, Task  # noqa: E402

CLASSIFIER = "mlp"
DATASETS = ("mnist-subset", "fashion-mnist")
SIM_KINDS = tuple(SIMULATORS)  # additive, multiplicative, linear
TRACIN = "tracin-cp"
NO_CHANGE = "no-change"
SUBSET_DIGITS = 1000


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
        unused = ("texts", "lora_rank", "lora_targets") if not self.is_lm else ()
        unused += ("dataset", "pretrain_size", "pretrain_epochs", "hidden") if self.is_lm else ()
        return {k: v for k, v in out.items() if k not in unused}


@dataclass
class Setup:
    """What the generic part of the experiment needs from a model family."""

    task: Task
    pool: Examples
    test: Examples
    make_model: Callable[[], nn.Module]  # the starting weights, freshly reset on every call
    pool_groups: np.ndarray  # [N] group name of every pool example (class or domain)
    test_groups: np.ndarray  # [M]
    info: dict[str, Any]


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
    setup = (
        _lm_setup(config, rundir, progress)
        if config.is_lm
        else _classifier_setup(config, rundir, data_dir, progress)
    )
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

    per_run = {k: evaluate(sim, held_c, held_l, pool_ids) for k, sim in simulators.items()}
    evaluation = {k: summarize(table) for k, table in per_run.items()}

    tick = time.perf_counter()
    counterfactuals, edited = _counterfactuals(
        rundir, setup, config, simulators, held_c[0], held_l[0]
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
        "finding": _finding(evaluation),
        "counterfactuals": counterfactuals,
    }

    tick = time.perf_counter()
    figures = rundir.figures
    _plot_trajectories(simulators, held_c[0], held_l[0], pool_ids, test_ids, figures)
    _plot_final_losses(simulators, held_c, held_l, pool_ids, evaluation, figures)
    _plot_counterfactuals(edited, simulators["linear"], held_c[0], held_l[0], pool_ids, figures)
    timings["figures"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    rundir.save_metrics(metrics)
    rundir.update_meta(status="done", timings=metrics["timings"])
    log(summary_table(metrics).to_string())
    log("")
    log(counterfactual_table(metrics).to_string())
    return metrics


def _fitted(
    rundir: RunDir,
    kind: str,
    config: SimfluenceConfig,
    curricula: np.ndarray,
    losses: np.ndarray,
    pool_ids: tuple[str, ...],
    test_ids: tuple[str, ...],
) -> Simulator:
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
        with np.load(path) as saved:
            return TracInCPSimulator(
                saved["dots"],
                float(saved["lr"]),
                setup.pool.ids,
                setup.test.ids,
                saved["checkpoint_steps"],
            )
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
    with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, dots=sim.dots, lr=sim.lrs, checkpoint_steps=sim.checkpoint_steps)
    return sim


def _edits(
    setup: Setup, config: SimfluenceConfig, linear: Simulator, base: np.ndarray
) -> dict[str, dict[str, Any]]:
    """The counterfactual curricula: name -> curriculum, what it does, whose loss it targets."""
    n = len(setup.pool)
    group = np.flatnonzero(setup.pool_groups == config.group)
    if group.size == 0:
        raise ValueError(
            f"no pool example is in group {config.group!r}; choose one of "
            f"{sorted(set(setup.pool_groups.tolist()))} (--group)"
        )
    everyone = np.arange(len(setup.test))
    focus = np.flatnonzero(setup.test_groups == config.group)
    focus = focus if focus.size else everyone  # no test example in the group: watch them all
    helpful = np.asarray(linear.scores().values, dtype=np.float64).mean(axis=1)
    order = np.argsort(-helpful, kind="stable")
    top = order[: max(1, round(config.top_fraction * n))]
    best = int(order[0])
    g = config.group
    return {
        f"remove group {g}": dict(
            curriculum=remove(base, group, n, seed=config.seed),
            focus=focus,
            edit=f"every pool example of group {g} ({group.size}) replaced by random others",
        ),
        f"group {g} first": dict(
            curriculum=put_first(base, group),
            focus=focus,
            edit=f"the run's examples of group {g} moved to its first steps",
        ),
        f"group {g} last": dict(
            curriculum=put_last(base, group),
            focus=focus,
            edit=f"the run's examples of group {g} moved to its last steps",
        ),
        f"duplicate best x{config.duplicate_k}": dict(
            curriculum=duplicate(base, best, config.duplicate_k, seed=config.seed),
            focus=everyone,
            edit=f"{config.duplicate_k} extra copies of {setup.pool.ids[best]}, the example the "
            "linear simulator finds most helpful on average",
        ),
        f"remove top {top.size}": dict(
            curriculum=remove(base, top, n, seed=config.seed),
            focus=everyone,
            edit=f"the {top.size} examples the linear simulator finds most helpful replaced by "
            "random others",
        ),
    }


def _counterfactuals(
    rundir: RunDir,
    setup: Setup,
    config: SimfluenceConfig,
    simulators: dict[str, Any],
    base: np.ndarray,
    base_losses: np.ndarray,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Train each edited curriculum for real and compare it with every simulator's answer.

    The base is held-out run 0 (its real losses are known); an edit is trained exactly as
    that run was (same start, same seed), so the only difference is the curriculum.
    Returns the metrics per edit and, per edit, its curriculum, real losses and focus.
    """
    base_run = config.runs  # held-out run 0's index in the collection
    pool_ids = setup.pool.ids
    out: dict[str, Any] = {}
    runs: dict[str, dict[str, np.ndarray]] = {}
    for name, spec in _edits(setup, config, simulators["linear"], base).items():
        path = rundir.path / "counterfactuals" / f"{name.replace(' ', '_')}.npz"
        curriculum = spec["curriculum"]
        real = None
        if path.exists():
            with np.load(path) as saved:
                if np.array_equal(saved["curriculum"], curriculum):
                    real = saved["losses"]
        if real is None:
            real = train_curriculum(
                setup.make_model,
                setup.pool,
                setup.test,
                setup.task,
                curriculum,
                config.lr,
                optimizer=config.optimizer,  # type: ignore[arg-type]
                seed=config.seed,
                run=base_run,
            )
            with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, curriculum=curriculum, losses=real)
        entry: dict[str, Any] = {
            "edit": spec["edit"],
            "focus_test_examples": int(len(spec["focus"])),
            "slots_changed": int((curriculum != base).sum()),
        }
        for kind, sim in simulators.items():
            if kind == NO_CHANGE:
                continue
            predicted = sim.predict(curriculum, base_losses[0], pool_ids)
            predicted_base = sim.predict(base, base_losses[0], pool_ids)
            entry[kind] = effect_agreement(
                predicted, predicted_base, real, base_losses, spec["focus"]
            )
        out[name] = entry
        runs[name] = {"curriculum": curriculum, "losses": real, "focus": spec["focus"]}
    return out, runs


def _finding(evaluation: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The seed's claim: the linear simulator beats additive and TracIn on both metrics."""
    lin = evaluation["linear"]
    out = {}
    for other in ("additive", TRACIN):
        rival = evaluation[other]
        out[f"linear_lower_mse_than_{other}"] = bool(
            lin["mse_all_steps_mean"] < rival["mse_all_steps_mean"]
        )
        out[f"linear_higher_spearman_than_{other}"] = bool(
            lin["spearman_final_mean"] > rival["spearman_final_mean"]
        )
    out["linear_beats_additive_and_tracin_on_both"] = all(out.values())
    return out


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per simulator: held-out all-steps MSE and final-step Spearman, mean ± std."""
    rows = []
    for kind, m in metrics["evaluation"].items():
        rows.append(
            {
                "simulator": kind,
                "all-steps MSE": _pm(m["mse_all_steps_mean"], m["mse_all_steps_std"]),
                "final-step Spearman": _pm(m["spearman_final_mean"], m["spearman_final_std"]),
                "λ": f"{metrics['lambda'][kind]:g}" if kind in metrics["lambda"] else "-",
                "held-out runs": int(m["n_runs"]),
            }
        )
    return pd.DataFrame(rows).set_index("simulator")


def counterfactual_table(metrics: dict[str, Any], kind: str = "linear") -> pd.DataFrame:
    """One row per counterfactual curriculum: the `kind` simulator against real training."""
    rows = []
    for name, entry in metrics["counterfactuals"].items():
        m = entry[kind]
        rows.append(
            {
                "edit": name,
                "MSE": m["mse_all_steps"],
                "Spearman L_T": m["spearman_final"],
                "effect r": m["effect_pearson"],
                "effect ρ L_T": m["effect_spearman_final"],
                "real ΔL_T": m["real_effect_final"],
                "predicted ΔL_T": m["predicted_effect_final"],
                "(TracIn effect r)": entry[TRACIN]["effect_pearson"],
            }
        )
    table = pd.DataFrame(rows).set_index("edit").round(4)
    table.index.name = f"edit ({kind} simulator vs real training)"
    return table


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4g} ± {std:.2g}" if np.isfinite(std) else f"{mean:.4g}"


# ---------------------------------------------------------------------------- classifier path


def _mlp(hidden: int, n_in: int = 28 * 28, n_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
    )


def _split_images(
    config: SimfluenceConfig, data_dir: str | Path | None
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(pre-training, pool, test): disjoint random draws, fixed by the seed."""
    rng = np.random.default_rng([config.seed, 7])
    if config.dataset == "mnist-subset":
        digits = load_mnist_subset()
        need = config.pretrain_size + config.pool_size + config.test_size
        if need > len(digits):
            raise ValueError(
                f"pretrain_size + pool_size + test_size = {need} but the bundled subset holds "
                f"{len(digits)} digits; make them smaller or use --dataset fashion-mnist"
            )
        perm = rng.permutation(len(digits))
        a, b = config.pretrain_size, config.pretrain_size + config.pool_size
        return digits.subset(perm[:a]), digits.subset(perm[a:b]), digits.subset(perm[b:need])
    train = load_fashion_mnist("train", data_dir=data_dir)
    test = load_fashion_mnist("test", data_dir=data_dir)
    if config.pretrain_size + config.pool_size > len(train) or config.test_size > len(test):
        raise ValueError(
            f"Fashion-MNIST has {len(train)} training and {len(test)} test images; ask for fewer"
        )
    perm = rng.permutation(len(train))
    a, b = config.pretrain_size, config.pretrain_size + config.pool_size
    test_perm = rng.permutation(len(test))[: config.test_size]
    return train.subset(perm[:a]), train.subset(perm[a:b]), test.subset(test_perm)


def _classifier_setup(
    config: SimfluenceConfig, rundir: RunDir, data_dir: str | Path | None, progress: bool
) -> Setup:
    pre, pool_set, test_set = _split_images(config, data_dir)
    task = ClassificationTask(num_classes=len(pool_set.classes))
    side = int(np.prod(pool_set.images.shape[1:]))

    def build() -> nn.Module:
        return _mlp(config.hidden, side, len(pool_set.classes))

    path = rundir.path / "model.safetensors"
    if path.exists():
        start = load_file(path)
    else:

        def seeded() -> nn.Module:  # train_classifier seeds only after building the model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                return build()

        model, _ = train_classifier(
            seeded,
            pre.images,
            pre.labels,
            TrainRecipe(epochs=config.pretrain_epochs, batch_size=32, lr=1e-3, seed=config.seed),
            name="simfluence-mlp",
            data_key="",
            use_cache=False,
            progress=progress,
        )
        start = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with store.atomic_path(path) as tmp:
            save_file(start, str(tmp))

    def make_model() -> nn.Module:
        model = build()
        model.load_state_dict(start)
        return model

    start_model = make_model()
    classes = np.array([str(int(y)) for y in range(len(pool_set.classes))])
    return Setup(
        task=task,
        pool=task.examples(pool_set.images, pool_set.labels, pool_set.ids),
        test=task.examples(test_set.images, test_set.labels, test_set.ids),
        make_model=make_model,
        pool_groups=classes[pool_set.labels.numpy()],
        test_groups=classes[test_set.labels.numpy()],
        info={
            "model": f"MLP {side}-{config.hidden}-{len(pool_set.classes)}",
            "dataset": config.dataset,
            "pretrained_on": len(pre),
            "test_accuracy": evaluate_accuracy(start_model, test_set.images, test_set.labels),
        },
    )


# ---------------------------------------------------------------------------- language-model path

# Short sentences about fictional entities, so the facts are new to any pretrained model:
# training on a domain's sentences should lower the loss of that domain's test sentences.
_DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "astronomy": (
        ("Velmora", "Tharsis Minor", "Oskelion", "Brenna-9", "Quillon", "Astrevar"),
        (
            "The planet {s} has {v} moons.",
            "Astronomers found that {s} orbits a {v} star.",
            "A year on {s} lasts {v} days.",
            "The surface of {s} is covered in {v}.",
        ),
        ("three", "red dwarf", "four hundred", "blue ice", "seven", "white", "ninety", "dust"),
    ),
    "botany": (
        (
            "the silverleaf fern",
            "the dusk orchid",
            "marrowvine",
            "the glass tulip",
            "emberroot",
            "the salt lily",
        ),
        (
            "Gardeners know that {s} flowers only in {v}.",
            "The seeds of {s} are carried by {v}.",
            "{s} grows best in {v} soil.",
            "The leaves of {s} turn {v} in autumn.",
        ),
        ("early spring", "the wind", "sandy", "purple", "midwinter", "river water", "clay", "gold"),
    ),
    "geography": (
        ("Varnholt", "Teskara", "Ombrel", "the Lirran Valley", "Kestwick", "Port Sable"),
        (
            "{s} lies on the shore of the {v}.",
            "The main export of {s} is {v}.",
            "Most people in {s} speak {v}.",
            "The river that runs through {s} is called the {v}.",
        ),
        (
            "Grey Sea",
            "copper",
            "Teskaran",
            "Amberflow",
            "Northern Gulf",
            "wool",
            "Old Ombric",
            "Silverrun",
        ),
    ),
    "chemistry": (
        ("norvium", "calistrate", "the compound zephyrol", "brannic acid", "lumenite", "tessaline"),
        (
            "When heated, {s} turns {v}.",
            "Chemists store {s} in {v} containers.",
            "{s} melts at {v} degrees.",
            "Mixed with water, {s} releases {v}.",
        ),
        (
            "bright green",
            "glass",
            "two hundred",
            "a sweet smell",
            "black",
            "lead",
            "forty",
            "bubbles",
        ),
    ),
    "music": (
        (
            "the marrowharp",
            "the Kestrel Quartet",
            "the song Lantern Road",
            "the dulcivox",
            "the composer Ilse Varro",
            "the tidehorn",
        ),
        (
            "{s} is usually played in {v}.",
            "Critics praised {s} for its {v} sound.",
            "{s} became famous in the city of {v}.",
            "Students learn {s} by practising {v}.",
        ),
        (
            "minor keys",
            "warm",
            "Varnholt",
            "scales",
            "summer festivals",
            "hollow",
            "Teskara",
            "slow airs",
        ),
    ),
    "zoology": (
        (
            "the ridgeback otter",
            "the lantern moth",
            "the grey kestrak",
            "the stone newt",
            "the marsh gazelle",
            "the ember finch",
        ),
        (
            "{s} feeds mostly on {v}.",
            "{s} builds its nest from {v}.",
            "A grown {s} weighs about {v}.",
            "{s} is most active during the {v}.",
        ),
        ("snails", "reeds", "two kilograms", "night", "berries", "mud", "forty grams", "dawn"),
    ),
}


def default_texts() -> list[tuple[str, str]]:
    """(domain, sentence) pairs: 6 domains x 6 entities x 4 facts = 144 short sentences."""
    out = []
    for domain, (subjects, templates, values) in _DOMAINS.items():
        for i, subject in enumerate(subjects):
            for j, template in enumerate(templates):
                text = template.format(s=subject, v=values[(i + 2 * j) % len(values)])
                out.append((domain, text[0].upper() + text[1:]))
    return out


def read_texts(path: str | Path) -> list[tuple[str, str]]:
    """One example per line: `domain<TAB>text`, or just `text` (domain "all"); blanks skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; give one text per line")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        domain, _, text = line.partition("\t") if "\t" in line else ("all", "", line)
        out.append((domain.strip(), text.strip()))
    return out


def _lm_setup(config: SimfluenceConfig, rundir: RunDir, progress: bool) -> Setup:
    """LoRA adapters on a causal LM; pool and test are disjoint random draws of the texts."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(
            "the language-model path needs peft: `pip install peft` (or use --model mlp)"
        ) from err
    from datafluence.models.language import load_causal_lm

    items = read_texts(config.texts) if config.texts else default_texts()
    need = config.pool_size + config.test_size
    if need > len(items):
        raise ValueError(
            f"pool_size + test_size = {need} but only {len(items)} texts are available; ask for "
            "fewer or pass a longer --texts file"
        )
    perm = np.random.default_rng([config.seed, 7]).permutation(len(items))
    chosen = [items[i] for i in perm[:need]]
    base, tokenizer = load_causal_lm(config.model, progress=progress)
    for p in base.parameters():
        p.requires_grad_(False)
    task = CausalLMTask(tokenizer)
    texts = [t for _, t in chosen]
    ids = [f"text-{int(i)}" for i in perm[:need]]
    examples = task.examples(texts, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            target_modules=list(config.lora_targets),
            lora_dropout=0.0,
        )
        model = get_peft_model(base, lora)
    path = rundir.path / "model.safetensors"  # the adapters' starting weights
    if path.exists():
        start = load_file(path)
    else:
        start = {
            k: v.detach().clone().contiguous()
            for k, v in model.state_dict().items()
            if "lora_" in k
        }
        with store.atomic_path(path) as tmp:
            save_file(start, str(tmp))

    def make_model() -> nn.Module:
        # One model object: every call resets its adapters to the start (the base is frozen).
        model.load_state_dict(start, strict=False)
        return model

    groups = np.array([d for d, _ in chosen])
    n = config.pool_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Setup(
        task=task,
        pool=examples[:n],
        test=examples[n:],
        make_model=make_model,
        pool_groups=groups[:n],
        test_groups=groups[n:],
        info={
            "model": f"{config.model} + LoRA r={config.lora_rank} on {','.join(config.lora_targets)}",
            "trainable_parameters": trainable,
            "texts": config.texts or "built-in knowledge-domain sentences",
        },
    )


# ---------------------------------------------------------------------------- figures

_STYLE = {
    "linear": dict(color="C0"),
    "additive": dict(color="C1"),
    "multiplicative": dict(color="C2"),
    TRACIN: dict(color="C3", linestyle="--"),
}


def _plot_trajectories(
    simulators: dict[str, Any],
    curriculum: np.ndarray,
    real: np.ndarray,
    pool_ids: tuple[str, ...],
    test_ids: tuple[str, ...],
    folder: Path,
    n_examples: int = 6,
) -> Path:
    """Held-out run 0: real vs simulated loss of test examples spread over how much they moved."""
    change = real[-1] - real[0]
    order = np.argsort(change, kind="stable")
    picks = order[
        np.unique(np.linspace(0, len(order) - 1, min(n_examples, len(order))).round().astype(int))
    ]
    cols = 3
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    steps = np.arange(real.shape[0])
    predicted = {k: simulators[k].predict(curriculum, real[0], pool_ids) for k in _STYLE}
    for ax, z in zip(axes.flat, picks, strict=False):
        ax.plot(steps, real[:, z], color="black", linewidth=2.2, label="real")
        for kind, style in _STYLE.items():
            ax.plot(steps, predicted[kind][:, z], linewidth=1.2, label=kind, **style)
        low, high = real[:, z].min(), real[:, z].max()
        pad = 0.5 * (high - low) + 0.1
        ax.set_ylim(min(0.0, low - pad), high + pad)  # keep a diverging roll-out from hiding it
        ax.set_title(f"{test_ids[z]}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("test loss")
    for ax in list(axes.flat)[len(picks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Held-out run: real vs simulated loss trajectories (rolled out from L_0)")
    fig.tight_layout()
    return save_figure(fig, folder / "trajectories.png")


def _plot_final_losses(
    simulators: dict[str, Any],
    curricula: np.ndarray,
    real: np.ndarray,
    pool_ids: tuple[str, ...],
    evaluation: dict[str, dict[str, float]],
    folder: Path,
) -> Path:
    """Predicted vs real final loss of every test example in every held-out run."""
    kinds = list(_STYLE)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.8 * len(kinds), 3.8), squeeze=False)
    truth = real[:, -1].ravel()
    low, high = float(truth.min()), float(truth.max())
    pad = 0.1 * (high - low) + 0.05
    for ax, kind in zip(axes[0], kinds, strict=True):
        pred = simulators[kind].predict(curricula, real[:, 0], pool_ids)[:, -1].ravel()
        ax.scatter(
            truth,
            np.clip(pred, low - 4 * pad, high + 4 * pad),
            s=6,
            alpha=0.5,
            color=_STYLE[kind]["color"],
        )
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - 4 * pad, high + 4 * pad)
        m = evaluation[kind]
        ax.set_title(
            f"{kind}\nSpearman {m['spearman_final_mean']:.3f}, MSE {m['mse_all_steps_mean']:.3g}",
            fontsize=9,
        )
        ax.set_xlabel("real final loss")
        ax.set_ylabel("predicted final loss (clipped)")
    fig.suptitle("Final losses of the test examples on held-out runs")
    fig.tight_layout()
    return save_figure(fig, folder / "final_losses.png")


def _plot_counterfactuals(
    edited: dict[str, dict[str, np.ndarray]],
    linear: Simulator,
    base: np.ndarray,
    base_losses: np.ndarray,
    pool_ids: tuple[str, ...],
    folder: Path,
) -> Path:
    """Per edit: mean loss of its targeted test examples, real vs linear simulator."""
    fig, axes = plt.subplots(1, len(edited), figsize=(3.6 * len(edited), 3.4), squeeze=False)
    pred_base = linear.predict(base, base_losses[0], pool_ids)
    steps = np.arange(base_losses.shape[0])
    for ax, (name, cf) in zip(axes[0], edited.items(), strict=True):
        pred = linear.predict(cf["curriculum"], base_losses[0], pool_ids)
        focus = cf["focus"]
        ax.plot(steps, base_losses[:, focus].mean(1), color="grey", label="real, original")
        ax.plot(
            steps, cf["losses"][:, focus].mean(1), color="black", linewidth=2, label="real, edited"
        )
        ax.plot(
            steps, pred_base[:, focus].mean(1), color="C0", linestyle=":", label="linear, original"
        )
        ax.plot(steps, pred[:, focus].mean(1), color="C0", linestyle="--", label="linear, edited")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("mean loss of the targeted test examples")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Counterfactual curricula: really trained vs predicted by the linear simulator")
    fig.tight_layout()
    return save_figure(fig, folder / "counterfactuals.png")


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
    "Setup",
    "SimfluenceConfig",
    "command",
    "counterfactual_table",
    "default_texts",
    "read_texts",
    "run",
    "summary_table",
]
