"""The EIF paper's language-model study: learned (fine-tuned) versus prompted influence on
synthetic knowledge domains.

For each domain and each instantiation (fresh nonce words), every sentence, and each group
of premises, is either learned (a fresh LoRA adapter fine-tuned on it) or placed in the
prompt; every sentence of the domain (and an out-of-domain control) is then measured.
Logic desiderata (transitivity, consistency, direction, leakage), symmetry and diffuseness
are compared between the two modes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from datafluence import store
from datafluence.datasets.domains import Instance, available_domains, instantiate, load_domain
from datafluence.experiments._cli import cli_errors, comma_list
from datafluence.finetune import FinetuneRecipe
from datafluence.finetune.recipe import Optimizer
from datafluence.methods import EmpiricalInfluence
from datafluence.methods.prompted import DEFAULT_TEMPLATE, PromptedInfluence
from datafluence.metrics import desiderata, logic
from datafluence.models.language import DEFAULT_LM, load_causal_lm
from datafluence.report.figures import plot_histograms, plot_mode_matrices, plot_symmetry_bars
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import CausalLMTask

MODES = ("learned", "prompted")
LORA_TARGETS = ("*q_proj", "*k_proj", "*v_proj", "*o_proj", "*gate_proj", "*up_proj", "*down_proj")


@dataclass(frozen=True)
class KnowledgeConfig:
    """Everything that changes the numbers (saved in meta.json)."""

    model: str = DEFAULT_LM
    domains: tuple[str, ...] = ("transitivity", "chain_induces", "belongs_to")
    modes: tuple[str, ...] = MODES
    n_instances: int = 3
    seed: int = 0
    recipe: FinetuneRecipe = field(
        default_factory=lambda: FinetuneRecipe(
            steps=5, lr=5e-4, optimizer="adam", lora_rank=8, lora_targets=LORA_TARGETS
        )
    )
    template: str = DEFAULT_TEMPLATE
    group_joiner: str = " "

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.n_instances < 1:
            raise ValueError(f"n_instances must be at least 1, got {self.n_instances}")
        for name in self.domains:
            load_domain(name)  # clear error for unknown names or broken files

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows(instance: Instance, joiner: str) -> tuple[list[str], list[list[int]], list[str]]:
    """Row names, index groups (for learning) and texts (for prompting) of one instance."""
    names, groups = instance.rows()
    texts = list(instance.texts.values())
    contexts = [joiner.join(texts[i] for i in g) for g in groups]
    return names, groups, contexts


def run(
    out: str | Path,
    config: KnowledgeConfig | None = None,
    *,
    overwrite: bool = False,
    chunk_size: int = 16,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run (or resume) the study into `out`; returns metrics.json's content."""
    config = config or KnowledgeConfig()
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(
        None if config.model == DEFAULT_LM else config.model, progress
    )
    settings = {
        "experiment": "knowledge-domains",
        **config.to_dict(),
        "model_fingerprint": store.model_fingerprint(model),
    }
    rundir = RunDir(out).open(settings, overwrite=overwrite, method="empirical")
    limit = getattr(model.config, "max_position_embeddings", None)
    task = CausalLMTask(tokenizer, max_length=limit)
    learned = EmpiricalInfluence(
        task,
        config.recipe,
        # Hugging Face forwards cannot be vmapped: full fine-tuning runs one copy at a time
        engine="batched" if config.recipe.lora_rank else "naive",
        chunk_size=chunk_size,
        probe_chunk_size=256,
        progress=progress,
    )
    prompted = PromptedInfluence(task, config.template, progress=progress)

    metrics: dict[str, Any] = {"model": config.model, "domains": {}}
    mean_matrices: dict[str, dict[str, Scores]] = {}
    all_values: dict[str, list[np.ndarray]] = {m: [] for m in config.modes}
    timings: dict[str, float] = {}
    for name in config.domains:
        domain = load_domain(name)
        instances = instantiate(domain, tokenizer, config.n_instances, seed=config.seed)
        metrics["domains"][name] = {"instances": [i.words for i in instances]}
        mean_matrices[name] = {}
        for mode in config.modes:
            tick = time.perf_counter()
            per_instance, symmetry, matrices = [], [], []
            for inst in instances:
                sub = rundir.sub(f"{name}/{mode}/inst{inst.index}")
                scores = _scores(sub, inst, mode, task, model, learned, prompted, config)
                matrices.append(scores.values)
                per_instance.append(logic.logic_checks(scores, domain.checks))
                n = len(inst.texts)
                symmetry.append(desiderata.symmetry(scores.values[:n, :n]))
            stacked = np.stack(matrices)
            all_values[mode].append(stacked.ravel())
            mean_matrices[name][mode] = Scores(
                stacked.mean(0), scores.train_ids, scores.query_ids, method=mode
            )
            metrics["domains"][name][mode] = {
                "logic": logic.aggregate(per_instance),
                "per_instance": per_instance,
                "symmetry": {
                    key: float(np.nanmean([s[key] for s in symmetry])) for key in symmetry[0]
                },
                "diffuseness": logic.diffuseness(stacked),
            }
            timings[f"{name}/{mode}"] = time.perf_counter() - tick
            log(
                f"{name} {mode}: {len(instances)} instantiations in {timings[f'{name}/{mode}']:.1f}s"
            )
    metrics["diffuseness"] = {
        mode: logic.diffuseness(np.concatenate(v)) for mode, v in all_values.items() if v
    }
    rundir.save_metrics(metrics)

    for name, by_mode in mean_matrices.items():
        plot_mode_matrices(
            by_mode,
            rundir.figures / f"{name}_matrices.png",
            title=f"{name}: EIF (mean over instantiations); rows = learned / prompted sentence",
        )
    plot_histograms(
        {mode: np.concatenate(v) for mode, v in all_values.items() if v},
        rundir.figures / "eif_histogram.png",
        title="All EIF values, learned vs prompted",
    )
    plot_symmetry_bars(
        {
            name: {mode: m[mode]["symmetry"]["spearman"] for mode in config.modes}
            for name, m in metrics["domains"].items()
        },
        rundir.figures / "symmetry.png",
    )
    timings["total"] = time.perf_counter() - started
    rundir.update_meta(status="done", timings={k: round(v, 3) for k, v in timings.items()})
    log(summary_table(metrics).to_string())
    return metrics


def _scores(
    sub: RunDir,
    inst: Instance,
    mode: str,
    task: CausalLMTask,
    model: Any,
    learned: EmpiricalInfluence,
    prompted: PromptedInfluence,
    config: KnowledgeConfig,
) -> Scores:
    """One instantiation's matrix, loaded when already computed (the run's settings match)."""
    if (sub.path / "scores.npy").exists():
        return Scores.load(sub.path)
    probes = task.examples(list(inst.texts.values()), ids=list(inst.texts))
    names, groups, contexts = _rows(inst, config.group_joiner)
    if mode == "learned":
        scores = learned.score(model, probes, probes, groups=groups, run=sub)
    else:
        train = task.examples(contexts, ids=names)
        scores = prompted.score(model, train, probes, run=sub)
    scores = Scores(
        scores.values,
        tuple(names),
        scores.query_ids,
        method=scores.method,
        settings={**scores.settings, "words": inst.words, "texts": inst.texts},
    )
    scores.save(sub.path)
    sub.drop_partitions()
    return scores


def summary_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per domain and mode: the headline logic desiderata."""
    rows = []
    for name, by_mode in metrics["domains"].items():
        for mode in MODES:
            if mode not in by_mode:
                continue
            m = by_mode[mode]
            lg = m["logic"]
            rows.append(
                {
                    "domain": name,
                    "mode": mode,
                    "implied": lg.get("transitivity_implied_mean"),
                    "implied/premises": lg.get("transitivity_ratio_mean"),
                    "consistency": lg.get("consistency_mean"),
                    "cons>0": lg.get("consistency_share_positive"),
                    "direction": lg.get("direction_mean"),
                    "dir>0": lg.get("direction_share_positive"),
                    "leakage": lg.get("leakage_mean_mean"),
                    "share<0": m["diffuseness"]["share_negative"],
                    "symmetry ρ": m["symmetry"]["spearman"],
                }
            )
    return pd.DataFrame(rows).set_index(["domain", "mode"]).round(3)


@click.command("knowledge-domains")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--model", default=DEFAULT_LM, show_default=True, help="Local HF causal-LM folder.")
@click.option(
    "--domains",
    default="transitivity,chain_induces,belongs_to",
    show_default=True,
    help=f"Comma-separated shipped names ({', '.join(available_domains())}) or JSON files.",
)
@click.option("--modes", default="learned,prompted", show_default=True)
@click.option("--instances", default=3, show_default=True, help="Instantiations per domain.")
@click.option("--steps", default=5, show_default=True, help="Fine-tuning steps K.")
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="adam")
@click.option(
    "--lora-rank", default=8, show_default=True, help="0 = full fine-tuning (naive loop)."
)
@click.option("--lora-targets", default=",".join(LORA_TARGETS), show_default=True)
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True, help="Prompted join.")
@click.option("--seed", default=0, show_default=True, help="Nonce-word seed.")
@click.option("--chunk-size", default=16, show_default=True, help="Adapters trained at once.")
@click.option("--overwrite", is_flag=True, help="Discard a run made with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(
    out: str,
    model: str,
    domains: str,
    modes: str,
    instances: int,
    steps: int,
    lr: float,
    optimizer: Optimizer,
    lora_rank: int,
    lora_targets: str,
    template: str,
    seed: int,
    chunk_size: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Learned vs prompted EIF of a causal LM on synthetic knowledge domains."""
    with cli_errors():
        recipe = FinetuneRecipe(
            steps=steps,
            lr=lr,
            optimizer=optimizer,
            lora_rank=lora_rank,
            lora_targets=comma_list(lora_targets) if lora_rank else (),
        )
        config = KnowledgeConfig(
            model=model,
            domains=comma_list(domains),
            modes=comma_list(modes),
            n_instances=instances,
            seed=seed,
            recipe=recipe,
            template=template.replace("\\n", "\n"),
        )
        run(
            out,
            config,
            overwrite=overwrite,
            chunk_size=chunk_size,
            progress=not quiet,
            log=click.echo,
        )
    click.echo(f"results in {out}/ (per domain and mode: scores; metrics.json, figures/)")
