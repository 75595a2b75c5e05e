"""The simfluence experiment on tiny settings: files, metrics, resume, refusal, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from datafluence.datasets import default_texts, read_domain_texts
from datafluence.experiments.simfluence import (
    SimfluenceConfig,
    command,
    counterfactual_table,
    run,
    summary_table,
)
from datafluence.scores import Scores
from datafluence.store import RunMismatchError

TINY = dict(
    pool_size=40,
    test_size=12,
    runs=6,
    held_out=2,
    val_runs=1,
    steps=8,
    batch_size=4,
    lams=(0.1, 10.0),
)
KINDS = ("additive", "multiplicative", "linear", "tracin-cp")
TINY_FLAGS = [
    "--pool-size", "40", "--test-size", "12", "--runs", "6", "--held-out", "2",
    "--val-runs", "1", "--steps", "8", "--batch-size", "4", "--lams", "0.1,10",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("simfluence") / "run"
    lines: list[str] = []
    config = SimfluenceConfig(**TINY)
    threads = torch.get_num_threads()
    metrics = run(out, config, progress=False, log=lines.append)
    assert torch.get_num_threads() == threads  # the MLP ran on one thread, then restored
    return out, config, metrics, lines


def test_run_writes_scores_figures_and_metrics(finished) -> None:
    out, _, metrics, lines = finished
    for name in ("trajectories", "final_losses", "counterfactuals"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    assert (out / "model.safetensors").exists() and (out / "tracin" / "dots.npz").exists()
    assert len(list((out / "collection" / "runs").glob("run_*.npz"))) == 8
    for kind in KINDS:
        scores = Scores.load(out / "scores" / kind)
        assert scores.shape == (40, 12) and scores.method.endswith(kind)
    assert set(Scores.load(out / "scores" / "linear").parts) == {"A", "B"}

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved) == {
        "setup", "runs", "lambda", "lambda_selection", "evaluation", "evaluation_per_run",
        "finding", "counterfactuals", "timings",
    }  # fmt: skip
    assert set(saved["evaluation"]) == {*KINDS, "no-change"}
    for entry in saved["evaluation"].values():
        assert entry["n_runs"] == 2
        for key in ("mse_all_steps_mean", "mse_all_steps_std", "spearman_final_mean"):
            assert key in entry
        assert np.isfinite(entry["mse_all_steps_mean"])
    assert saved["evaluation"]["no-change"]["mse_all_steps_mean"] > 0
    assert all(len(v["mse_all_steps"]) == 2 for v in saved["evaluation_per_run"].values())
    assert set(saved["lambda"]) == {"additive", "multiplicative", "linear"}
    assert all(lam in (0.1, 10.0) for lam in saved["lambda"].values())
    assert "linear_beats_additive_and_tracin_on_both" in saved["finding"]
    assert saved["runs"]["subset_size"] == 20 and saved["setup"]["pool_size"] == 40

    edits = saved["counterfactuals"]
    assert list(edits) == [
        "remove group 3", "group 3 first", "group 3 last", "duplicate best x10", "remove top 4",
    ]  # fmt: skip
    for entry in edits.values():
        assert entry["slots_changed"] > 0 and entry["edit"]
        for kind in KINDS:
            assert set(entry[kind]) == {
                "mse_all_steps", "spearman_final", "effect_pearson", "effect_spearman_final",
                "real_effect_final", "predicted_effect_final",
            }  # fmt: skip
    assert len(list((out / "counterfactuals").glob("*.npz"))) == 5
    assert list(summary_table(saved).index) == [*KINDS, "no-change"]
    assert len(counterfactual_table(saved)) == 5
    printed = "\n".join(lines)
    assert "all-steps MSE" in printed and "final-step Spearman" in printed and "±" in printed
    assert json.loads((out / "meta.json").read_text())["status"] == "done"


def test_rerun_resumes_only_what_is_missing(finished) -> None:
    out, config, metrics, _ = finished
    kept = [
        out / "collection" / "runs" / "run_000.npz",
        out / "simulators" / "additive.npz",
        out / "tracin" / "dots.npz",
        out / "counterfactuals" / "group_3_first.npz",
        out / "model.safetensors",
    ]
    stamps = [p.stat().st_mtime_ns for p in kept]
    dropped = [
        out / "collection" / "runs" / "run_007.npz",
        out / "simulators" / "linear.npz",
        out / "counterfactuals" / "remove_group_3.npz",
        out / "metrics.json",
    ]
    for p in dropped:
        p.unlink()
    again = run(out, config, progress=False, log=lambda _: None)
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    assert all(p.exists() for p in dropped)
    strip = {k: v for k, v in again.items() if k != "timings"}
    assert strip == {k: v for k, v in metrics.items() if k != "timings"}


def test_other_settings_are_refused_and_the_cli_resumes(finished) -> None:
    out, config, _, _ = finished
    with pytest.raises(RunMismatchError, match="lr"):
        run(out, SimfluenceConfig(**{**TINY, "lr": 0.05}), progress=False)
    runner = CliRunner()
    refused = runner.invoke(command, ["--out", str(out), *TINY_FLAGS, "--lr", "0.05", "--quiet"])
    assert refused.exit_code != 0 and "other settings" in refused.output
    resumed = runner.invoke(command, ["--out", str(out), *TINY_FLAGS, "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert "final-step Spearman" in resumed.output and "results in" in resumed.output


def test_config_checks_and_lm_defaults(tmp_path) -> None:
    with pytest.raises(ValueError, match="val_runs"):
        SimfluenceConfig(runs=4, val_runs=4)
    with pytest.raises(ValueError, match="dataset"):
        SimfluenceConfig(dataset="cifar")
    with pytest.raises(ValueError, match="bundled subset"):
        run(tmp_path / "big", SimfluenceConfig(pool_size=900, test_size=100), progress=False)
    lm = SimfluenceConfig.for_lm(steps=5)
    assert lm.is_lm and lm.optimizer == "adam" and lm.steps == 5
    assert "dataset" not in lm.to_dict() and "texts" in lm.to_dict()
    assert "texts" not in SimfluenceConfig().to_dict()
    texts = default_texts()
    assert len(texts) == 144 and len({t for _, t in texts}) == 144
    assert len({d for d, _ in texts}) == 6
    path = tmp_path / "texts.txt"
    path.write_text("a\tThe cat sat.\n\nPlain line here.\n")
    assert read_domain_texts(path) == [("a", "The cat sat."), ("all", "Plain line here.")]


def test_language_model_path_runs_on_a_tiny_local_llama(tmp_path) -> None:
    """LoRA on a causal LM from a local folder, texts from a file with domains."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from tiny_lm import bpe_tokenizer, tiny_llama

    lines = [f"a\tthe wug number {i} is a blicket." for i in range(8)]
    lines += [f"b\tfrogs of type {i} sleep in the mud." for i in range(8)]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n")
    tokenizer = bpe_tokenizer([line.split("\t")[1] for line in lines] * 3, vocab_size=300)
    model = tiny_llama(
        tokenizer,
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    lm = SimfluenceConfig.for_lm(
        str(folder),
        texts=str(tmp_path / "texts.txt"),
        pool_size=10,
        test_size=4,
        runs=3,
        held_out=1,
        val_runs=1,
        steps=3,
        batch_size=2,
        lr=1e-2,
        duplicate_k=2,
        lams=(1.0,),
        group="a",
    )
    metrics = run(tmp_path / "run", lm, progress=False, log=lambda _: None, threads=1)
    assert metrics["setup"]["trainable_parameters"] == 2 * 8 * (16 + 16)  # q and v: A and B
    assert set(metrics["evaluation"]) == {*KINDS, "no-change"}
    assert len(metrics["counterfactuals"]) == 5
    assert Scores.load(tmp_path / "run" / "scores" / "linear").shape == (10, 4)
    dots = np.load(tmp_path / "run" / "tracin" / "dots.npz")["dots"]
    assert dots.shape == (3, 10, 4) and np.abs(dots[1:]).max() > 0
