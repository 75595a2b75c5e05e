"""`datafluence scores` on a causal LM and the user's texts: every text method end to end on a
tiny Llama saved to disk, EK-FAC equal to InfluenceFunction called directly, per-token parts
summing to the scores, the BM25 pre-filter, and a clear error for each bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
from tiny_lm import bpe_tokenizer, tiny_llama  # noqa: E402

from datafluence.cli import main  # noqa: E402
from datafluence.scores import Scores  # noqa: E402

TRAIN = [
    {"id": "wug", "text": "a wug is a blicket."},
    {"id": "dax", "text": "all blickets have a dax."},
    {"id": "frog", "prompt": "in winter, frogs", "completion": " hibernate in the mud."},
    {"id": "bird", "text": "a bird has a nest."},
    {"id": "cat", "prompt": "every cat", "completion": " is an animal."},
    {"id": "rain", "text": "the dog causes the rain."},
]
QUERIES = [
    {"id": "q-wug", "prompt": "a wug has", "completion": " a dax."},
    {"id": "q-rain", "text": "the dog causes rain."},
    {"id": "q-bird", "text": "a bird has a nest in winter."},
]
TRAIN_IDS = tuple(t["id"] for t in TRAIN)
QUERY_IDS = tuple(q["id"] for q in QUERIES)
# the MLP projections of the last two of three blocks: the default --modules on an LM
DEFAULT_MODULES = [
    f"model.layers.{b}.mlp.{p}" for b in (1, 2) for p in ("gate_proj", "up_proj", "down_proj")
]


def item_of(row: dict) -> str | tuple[str, str]:
    return (row["prompt"], row["completion"]) if "prompt" in row else row["text"]


def text_of(row: dict) -> str:
    return f"{row['prompt']} {row['completion']}" if "prompt" in row else row["text"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A randomly initialised 3-block Llama and a small BPE tokenizer, saved like any HF model."""
    corpus = [" ".join(text_of(r) for r in TRAIN + QUERIES)]
    tokenizer = bpe_tokenizer(corpus * 5, vocab_size=300)
    model = tiny_llama(
        tokenizer,
        num_hidden_layers=3,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("lm") / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", TRAIN), write_jsonl(tmp_path / "q.jsonl", QUERIES)


def scores(out, method, files, *extra, lm=None):
    train, queries = files
    args = ["scores", "--method", method, "--out", str(out)]
    args += ["--train-file", train, "--query-file", queries]
    args += [] if lm is None else ["--lm", str(lm)]
    return CliRunner().invoke(main, [*args, *extra])


def ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.mark.parametrize("method", ["identity", "ekfac", "gradsim", "repsim", "tfidf"])
def test_text_methods_end_to_end(tmp_path, files, lm_dir, method):
    ok(scores(tmp_path / "run", method, files, lm=lm_dir))
    result = Scores.load(tmp_path / "run")
    assert result.shape == (len(TRAIN), len(QUERIES))
    assert result.train_ids == TRAIN_IDS and result.query_ids == QUERY_IDS
    assert np.isfinite(result.values).all() and np.abs(result.values).max() > 0
    settings = json.loads((tmp_path / "run" / "meta.json").read_text())["settings"]
    if method in ("identity", "ekfac", "gradsim"):
        assert settings["modules"] == DEFAULT_MODULES
        assert result.settings["layers"] == DEFAULT_MODULES or method == "gradsim"
    if method == "repsim":  # the last block's output, mean-pooled
        assert settings["layer"] == "model.layers.2" == result.settings["module"]
        assert result.settings["pooling"] == "mean"
        assert np.all(result.values <= 1 + 1e-6)
    if method == "tfidf":  # the exact TF-IDF of the texts: identical texts would score 1
        assert "lm" not in settings and result.method == "tfidf"


def test_cli_ekfac_equals_influence_function_in_python(tmp_path, files, lm_dir):
    from datafluence.methods import InfluenceFunction
    from datafluence.models.language import load_causal_lm
    from datafluence.tasks import CausalLMTask

    ok(scores(tmp_path / "run", "ekfac", files, lm=lm_dir))
    cli = Scores.load(tmp_path / "run")
    model, tokenizer = load_causal_lm(lm_dir, progress=False)
    task = CausalLMTask(tokenizer)
    train = task.examples([item_of(r) for r in TRAIN], TRAIN_IDS)
    queries = task.examples([item_of(r) for r in QUERIES], QUERY_IDS)
    direct = InfluenceFunction(task, "ekfac", modules=DEFAULT_MODULES, progress=False).score(
        model, train, queries
    )
    np.testing.assert_allclose(cli.values, direct.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cli.parts["per_layer"], direct.parts["per_layer"], rtol=1e-5)


def test_module_globs_and_second_order_methods(tmp_path, files, lm_dir):
    """A glob picks the matching layers; cg loads eager attention (SDPA has no double
    backward on CPU) and runs."""
    glob = "model.layers.*.mlp.down_proj"
    ok(scores(tmp_path / "cg", "cg", files, "--modules", glob, lm=lm_dir))
    result = Scores.load(tmp_path / "cg")
    assert result.settings["layers"] == [f"model.layers.{b}.mlp.down_proj" for b in range(3)]
    assert np.isfinite(result.values).all()
    bad = scores(tmp_path / "bad", "identity", files, "--modules", "model.*.nothing*", lm=lm_dir)
    assert bad.exit_code != 0 and "matches no" in bad.output


def test_per_token_parts_sum_to_the_scores(tmp_path, files, lm_dir):
    from datafluence.metrics import spurious_sequences

    ok(scores(tmp_path / "tok", "ekfac", files, "--per-token", lm=lm_dir))
    ok(scores(tmp_path / "plain", "ekfac", files, lm=lm_dir))
    tokens, plain = Scores.load(tmp_path / "tok"), Scores.load(tmp_path / "plain")
    per_token = tokens.parts["per_token"]
    assert per_token.shape[1:] == (len(TRAIN), len(QUERIES)) and per_token.shape[0] > 5
    scale = np.abs(plain.values).max()
    np.testing.assert_allclose(per_token.sum(0), tokens.values, atol=1e-5 * scale)
    np.testing.assert_allclose(tokens.values, plain.values, rtol=1e-5, atol=1e-5 * scale)
    flags = json.loads((tmp_path / "tok" / "metrics.json").read_text())["spurious_sequences"]
    ratio, expected = spurious_sequences(tokens)
    assert flags["share_flagged"] == pytest.approx(expected.mean())
    assert flags["n_flagged"] == int(expected.sum())
    top = flags["top_flagged"]
    assert len(top) == min(10, int(expected.sum()))
    for pair in top:
        i, j = TRAIN_IDS.index(pair["train"]), QUERY_IDS.index(pair["query"])
        assert expected[i, j] and pair["ratio"] == pytest.approx(ratio[i, j])
    sizes = [abs(p["score"]) for p in top]
    assert sizes == sorted(sizes, reverse=True)


def test_prefilter_scores_only_the_bm25_top_k(tmp_path, files, lm_dir):
    from datafluence.text.bm25 import bm25_candidates

    k = 2
    ok(scores(tmp_path / "pre", "identity", files, "--prefilter", str(k), lm=lm_dir))
    ok(scores(tmp_path / "all", "identity", files, lm=lm_dir))
    pre, full = Scores.load(tmp_path / "pre"), Scores.load(tmp_path / "all")
    candidates = bm25_candidates([text_of(r) for r in TRAIN], [text_of(r) for r in QUERIES], k)
    for j in range(len(QUERIES)):
        kept = np.flatnonzero(np.isfinite(pre.values[:, j]))
        assert sorted(kept.tolist()) == sorted(candidates[j].tolist())
        np.testing.assert_allclose(pre.values[kept, j], full.values[kept, j], rtol=1e-5)
    assert np.isnan(pre.values).sum() == (len(TRAIN) - k) * len(QUERIES)


def test_plain_text_files_and_tfidf_needs_no_model(tmp_path):
    (tmp_path / "train.txt").write_text("a wug is a blicket.\n\nthe dog causes the rain.\n")
    (tmp_path / "q.txt").write_text("the dog causes rain.\n")
    files = (str(tmp_path / "train.txt"), str(tmp_path / "q.txt"))
    # --lm points nowhere: tfidf never loads a model
    ok(scores(tmp_path / "run", "tfidf", files, lm=tmp_path / "no-model"))
    result = Scores.load(tmp_path / "run")
    assert result.train_ids == ("1", "3") and result.query_ids == ("1",)  # line numbers
    assert result.values[1, 0] > result.values[0, 0] >= 0


BAD_LINES = [
    ("{not json", "is not valid JSON"),
    ('{"prompt": "a wug"}', 'no "text" or "completion"'),
    ('{"txt": "a wug"}', 'no "text" or "completion"'),
    ('{"text": 3}', "must be a string"),
    ('["a wug"]', "not an object"),
]


@pytest.mark.parametrize(("line", "match"), BAD_LINES)
def test_bad_lines_name_the_file_and_line(tmp_path, lm_dir, line, match):
    good = json.dumps(TRAIN[0])
    (tmp_path / "train.jsonl").write_text(f"{good}\n{line}\n")
    files = (str(tmp_path / "train.jsonl"), write_jsonl(tmp_path / "q.jsonl", QUERIES))
    result = scores(tmp_path / "run", "identity", files, lm=lm_dir)
    assert result.exit_code != 0
    assert match in result.output and "train.jsonl:2" in result.output


def test_bad_inputs(tmp_path, files, lm_dir, monkeypatch):
    def fails(result, *needles):
        assert result.exit_code != 0, result.output
        for needle in needles:
            assert needle in result.output, result.output

    out = tmp_path / "run"
    missing = (str(tmp_path / "nope.jsonl"), files[1])
    fails(scores(out, "identity", missing, lm=lm_dir), "does not exist")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    fails(scores(out, "identity", (str(tmp_path / "empty.jsonl"), files[1])), "holds no examples")
    twice = write_jsonl(tmp_path / "twice.jsonl", [TRAIN[0], TRAIN[1], TRAIN[0]])
    fails(scores(out, "identity", (twice, files[1]), lm=lm_dir), "'wug'", "line 1")
    fails(scores(out, "identity", files, "--train", "10", lm=lm_dir), "--train", "leave them out")
    fails(scores(out, "tracin", files, lm=lm_dir), "cannot run on text", "ekfac")
    fails(scores(out, "gradsim", files, "--per-token", lm=lm_dir), "--per-token", "ekfac")
    fails(scores(out, "tfidf", files, "--prefilter", "2"), "--prefilter")
    one = CliRunner().invoke(
        main, ["scores", "--method", "ekfac", "--out", str(out)] + ["--train-file", files[0]]
    )
    fails(one, "--query-file")
    image = CliRunner().invoke(main, ["scores", "--method", "tfidf", "--out", str(out)])
    fails(image, "--train-file")
    lm_only = CliRunner().invoke(
        main, ["scores", "--method", "ekfac", "--out", str(out), "--lm", str(lm_dir)]
    )
    fails(lm_only, "text data only")
    fails(scores(out, "identity", files, lm=tmp_path / "no-model"), "does not exist")
    # explicit builds a P x P matrix: refused by size before any work, naming the way out
    monkeypatch.setattr("datafluence.curvature.explicit.MAX_DIM", 100)
    fails(scores(out, "explicit", files, lm=lm_dir), "explicit needs", "--modules", "ekfac")
    assert not out.exists()  # no bad input ever claimed the run directory
