"""End to end through the CLI on a tiny fake Fashion-MNIST (random pixels, official file names)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from datafluence.cli import main
from datafluence.datasets import write_idx
from datafluence.scores import Scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_DIGITS = 20  # --n-per-class 2 x 10 digit classes


def fake_fashion(directory: Path, seed: int, n_train: int = 200, n_test: int = 50) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        )
        write_idx(
            directory / f"{prefix}-labels-idx1-ubyte.gz",
            rng.integers(0, 10, size=n).astype(np.uint8),
        )
    return directory


def args(out: Path, data: Path, *extra: str, noise: str = "0,0.5") -> list[str]:
    return [
        "experiment",
        "cnn-fashion-mnist",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--n-per-class",
        "2",
        "--noise",
        noise,
        "--quiet",
        "--data-dir",
        str(data),
        *extra,
    ]


def invoke(cli_args: list[str]):
    return CliRunner().invoke(main, cli_args)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fake data, an isolated model cache and HOME, and one finished run (made once)."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATAFLUENCE_CACHE", str(root / "cache"))
        mp.setenv("HOME", str(root / "home"))
        mp.delenv("DATAFLUENCE_DATA", raising=False)
        data = fake_fashion(root / "data", seed=0)
        run = root / "run"
        result = invoke(args(run, data))
        yield {"root": root, "data": data, "run": run, "first": result}


def test_experiment_writes_a_complete_run(env):
    result, run = env["first"], env["run"]
    assert result.exit_code == 0, result.output
    assert "CNN trained" in result.output
    assert f"results in {run}" in result.output
    assert (env["root"] / "cache" / "models").is_dir()  # the isolated cache was used

    scores = np.load(run / "scores.npy")
    assert scores.shape == (N_DIGITS, N_DIGITS) and scores.dtype == np.float32
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    noisy = np.load(run / "noise" / "0.5" / "scores.npy")
    assert noisy.shape == (N_DIGITS, N_DIGITS)
    assert not np.array_equal(noisy, scores)
    loaded = Scores.load(run)
    assert loaded.train_ids == loaded.query_ids and len(loaded.train_ids) == N_DIGITS
    assert all(i.startswith("mnist-test-") for i in loaded.train_ids)

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["noise"]) == {"0", "0.5"}
    for sigma in ("0", "0.5"):
        for key in ("symmetry", "sparsity", "distance_decay"):
            assert key in metrics["noise"][sigma], (sigma, key)
    assert "noise_invariance" in metrics["noise"]["0.5"]
    assert "noise_invariance" not in metrics["noise"]["0"]
    assert metrics["noise"]["0"]["mean"] == pytest.approx(float(scores.mean()), rel=1e-5)
    assert metrics["model"]["from_cache"] is False

    for name in ("eif_matrix.png", "noise.png"):
        figure = run / "figures" / name
        assert figure.read_bytes()[:8] == PNG_MAGIC, name

    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "done"
    assert meta["settings"]["recipe"]["lr"] == 0.001
    assert meta["settings"]["noise"] == [0.0, 0.5]
    assert meta["scores"]["shape"] == [N_DIGITS, N_DIGITS]
    assert (run / "model.safetensors").stat().st_size > 0
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["finetune"]["lr"] == 0.001 and recipe["target_class"] == "Sneaker"
    assert not (run / "partitions").exists()  # dropped once the scores were saved
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_rerun_same_command_reuses_everything(env):
    run = env["run"]
    before = (run / "scores.npy").read_bytes()
    noisy_before = (run / "noise" / "0.5" / "scores.npy").read_bytes()
    result = invoke(args(run, env["data"]))
    assert result.exit_code == 0, result.output
    assert "loaded from cache" in result.output
    assert "EIF σ=" not in result.output  # no scores recomputed
    assert (run / "scores.npy").read_bytes() == before
    assert (run / "noise" / "0.5" / "scores.npy").read_bytes() == noisy_before
    assert json.loads((run / "metrics.json").read_text())["model"]["from_cache"] is True


def test_other_lr_is_refused_unless_overwrite(env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(env["run"], run)
    before = (run / "scores.npy").read_bytes()

    refused = invoke(args(run, env["data"], "--lr", "0.01"))
    assert refused.exit_code != 0
    assert "--overwrite" in refused.output
    assert "recipe.lr: 0.001 -> 0.01" in refused.output
    assert (run / "scores.npy").read_bytes() == before

    result = invoke(args(run, env["data"], "--lr", "0.01", "--overwrite"))
    assert result.exit_code == 0, result.output
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "done" and meta["settings"]["recipe"]["lr"] == 0.01
    after = np.load(run / "scores.npy")
    old = np.load(env["run"] / "scores.npy")
    assert after.shape == (N_DIGITS, N_DIGITS)
    # one SGD step: the change is ~ proportional to lr (first order), so ~10x larger
    ratio = np.abs(after).sum() / np.abs(old).sum()
    assert 5 < ratio < 20


def test_show_summarises_a_run(env):
    result = invoke(["show", str(env["run"])])
    assert result.exit_code == 0, result.output
    assert "status     done" in result.output
    assert f"{N_DIGITS} train x {N_DIGITS} queries" in result.output
    first_query = Scores.load(env["run"]).query_ids[0]
    assert f"top 5 training examples for query {first_query!r}" in result.output
    top_lines = result.output.split("training examples for query")[1].splitlines()[2:7]
    assert [line.split()[0] for line in top_lines] == ["1", "2", "3", "4", "5"]
    assert "strongest 5 opponents (most negative first)" in result.output


def test_show_one_query(env):
    scores = Scores.load(env["run"])
    query = scores.query_ids[7]
    result = invoke(["show", str(env["run"]), "--query", query, "-k", "3"])
    assert result.exit_code == 0, result.output
    assert f"top 3 training examples for query {query!r}" in result.output
    lines = result.output.splitlines()
    at = lines.index("strongest 3 opponents (most negative first)")
    best = scores.top(3, query)["train"].tolist()
    assert [line.split()[1] for line in lines[at - 3 : at]] == best
    worst = scores.bottom(3, query)["train"].tolist()
    assert [line.split()[1] for line in lines[at + 2 : at + 5]] == worst

    by_position = invoke(["show", str(env["run"]), "--query", "7", "-k", "3"])
    assert by_position.exit_code == 0, by_position.output
    assert f"for query {query!r}" in by_position.output


def test_show_unknown_query(env):
    result = invoke(["show", str(env["run"]), "--query", "no-such-digit"])
    assert result.exit_code != 0
    assert "no query with id 'no-such-digit'" in result.output
    assert "mnist-test-" in result.output  # shows what ids look like


def test_show_unfinished_and_foreign_directories(env, tmp_path):
    result = invoke(["show", str(tmp_path)])
    assert result.exit_code != 0 and "no meta.json" in result.output
    run = tmp_path / "half"
    run.mkdir()
    shutil.copy(env["run"] / "meta.json", run / "meta.json")
    result = invoke(["show", str(run)])
    assert result.exit_code == 0 and "scores     (none yet" in result.output


def test_model_cache_distinguishes_training_data_of_the_same_size(env, tmp_path):
    other = fake_fashion(tmp_path / "other-data", seed=1)  # same sizes, other pixels
    result = invoke(args(tmp_path / "run", other, noise="0"))
    assert result.exit_code == 0, result.output
    assert "CNN trained" in result.output
