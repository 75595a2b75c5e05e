"""Language-model EIF: the causal-LM task, multi-adapter LoRA vs peft, prompted influence,
knowledge domains and the logic desiderata, on tiny models built in code."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from tiny_lm import CORPUS, bpe_tokenizer, gpt2, llama  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from datafluence.datasets.domains import (  # noqa: E402
    CONTROL_ID,
    available_domains,
    instantiate,
    load_domain,
    nonce_words,
    parse_domain,
)
from datafluence.methods import EmpiricalInfluence  # noqa: E402
from datafluence.methods.prompted import PromptedInfluence  # noqa: E402
from datafluence.metrics import logic  # noqa: E402
from datafluence.scores import Scores  # noqa: E402
from datafluence.tasks import CausalLMTask  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer: pseudo-words split into several pieces."""
    return bpe_tokenizer(CORPUS * 5, vocab_size=320)


ITEMS = [
    ("a wug is a", " blicket."),
    "all blickets have a dax.",
    ("in winter, frogs", " hibernate."),
    "a wug has a dax.",
    "every cat is an animal.",
]


def reference_log_prob(model, tokenizer, prompt: str, completion: str) -> float:
    """Hand-written: BOS + prompt ids + completion ids, sum log p over completion tokens."""
    head = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(logp[len(head) + k - 1, t] for k, t in enumerate(tail)))


# --- the task --------------------------------------------------------------------------


def test_measure_is_summed_completion_log_prob(tokenizer):
    model = llama(tokenizer)
    task = CausalLMTask(tokenizer)
    ex = task.examples(ITEMS)
    got = task.measure(model, ex.tensors)
    for k, item in enumerate(ITEMS):
        prompt, completion = ("", item) if isinstance(item, str) else item
        assert got[k].item() == pytest.approx(
            reference_log_prob(model, tokenizer, prompt, completion), abs=1e-4
        )
    assert got.dtype == torch.float64  # summed in float64: EIF subtracts two such sums
    assert torch.allclose(task.loss(model, ex.tensors).double(), -got)
    # padding never changes a row: each example alone gives the same number
    alone = torch.cat([task.measure(model, ex[[k]].tensors) for k in range(len(ITEMS))])
    assert torch.allclose(alone, got, atol=1e-5)
    # slicing the logits is an optimisation only
    full = CausalLMTask(tokenizer, slice_logits=False).measure(model, ex.tensors)
    assert torch.allclose(full, got, atol=1e-5)


def test_picked_log_probs_blocks_equal_one_call(monkeypatch):
    """The blockwise log-softmax is the one-call formula bit for bit, gradients included,
    when rows split unevenly across blocks."""
    from datafluence import tasks

    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 4).requires_grad_(True)
    ids = torch.randint(0, 50, (3, 7))
    want = logits.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    monkeypatch.setattr(tasks, "LOGSUMEXP_BLOCK", 4 * 50)  # blocks of 4 rows: 21 = 5*4 + 1
    got = tasks.picked_log_probs(logits, ids)
    (got_grad,) = torch.autograd.grad(got.sum(), logits)
    assert got.shape == (3, 7)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


def test_prompt_tokens_are_masked(tokenizer):
    task = CausalLMTask(tokenizer)
    ex = task.examples([("a wug is a", " blicket.")])
    n_prompt = 1 + len(tokenizer("a wug is a", add_special_tokens=False)["input_ids"])
    mask = ex.tensors["target_mask"][0]
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].sum() > 0


@pytest.mark.parametrize(
    "bad, match",
    [
        ([("a wug", "   ")], "empty completion"),
        ([], "empty"),
        ([42], "text or a .prompt, completion. pair"),
    ],
)
def test_bad_lm_examples(tokenizer, bad, match):
    with pytest.raises(ValueError, match=match):
        CausalLMTask(tokenizer).examples(bad)


def test_tokenizer_without_pad_token(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*pad_token = tokenizer.eos_token"):
        CausalLMTask(tok)


def test_too_long_and_foreign_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="more than the model's context of 4"):
        CausalLMTask(tokenizer, max_length=4).examples(["a wug is a blicket."])
    model = llama(tokenizer)
    model.config.max_position_embeddings = 5
    task = CausalLMTask(tokenizer)
    with pytest.raises(ValueError, match="model's context is 5"):
        EmpiricalInfluence(task, progress=False).score(
            model, task.examples(["a wug is a blicket."]), task.examples(["a dax."])
        )


# --- learned EIF: multi-adapter LoRA against peft ---------------------------------------


@pytest.mark.parametrize(
    "arch, targets", [("llama", ("*q_proj", "*v_proj")), ("gpt2", ("*c_attn",))]
)
@pytest.mark.parametrize("optimizer, steps", [("sgd", 1), ("sgd", 3), ("adam", 1)])
def test_lora_batched_equals_peft(tokenizer, arch, targets, optimizer, steps):
    model = llama(tokenizer) if arch == "llama" else gpt2(tokenizer)
    before = copy.deepcopy(model.state_dict())
    task = CausalLMTask(tokenizer)
    ex = task.examples(ITEMS)
    recipe = dict(steps=steps, lr=0.05, optimizer=optimizer, lora_rank=4, lora_targets=targets)
    naive = EmpiricalInfluence(task, engine="naive", progress=False, **recipe).score(model, ex, ex)
    batched = EmpiricalInfluence(
        task, chunk_size=2, probe_chunk_size=4, progress=False, **recipe
    ).score(model, ex, ex, groups=None)
    assert np.abs(naive.values - batched.values).max() < 1e-5
    assert np.abs(naive.values).max() > 1e-2  # the adapters really moved something
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_lora_adam_several_steps_exact_in_float64(tokenizer):
    """Adam normalises tiny gradients, so float32 rounding shows after a few steps;
    in float64 the two implementations agree to rounding."""
    model = llama(tokenizer, dtype=torch.float64)
    task = CausalLMTask(tokenizer)
    ex = task.examples(ITEMS)
    recipe = dict(
        steps=3, lr=0.05, optimizer="adam", lora_rank=4, lora_targets=("*q_proj", "*v_proj")
    )
    naive = EmpiricalInfluence(task, engine="naive", progress=False, **recipe).score(model, ex, ex)
    batched = EmpiricalInfluence(task, chunk_size=3, progress=False, **recipe).score(model, ex, ex)
    assert np.abs(naive.values - batched.values).max() < 1e-6  # float32 storage of the scores


def test_lora_groups_equal_peft_on_the_group(tokenizer):
    model = llama(tokenizer)
    task = CausalLMTask(tokenizer)
    ex = task.examples(ITEMS)
    recipe = dict(
        steps=2, lr=0.05, optimizer="sgd", lora_rank=4, lora_targets=("*q_proj", "*v_proj")
    )
    groups = [[0, 1], [2], [1, 3, 4]]
    naive = EmpiricalInfluence(task, engine="naive", progress=False, **recipe)
    batched = EmpiricalInfluence(task, chunk_size=3, progress=False, **recipe)
    a = naive.score(model, ex, ex, groups=groups)
    b = batched.score(model, ex, ex, groups=groups)
    assert np.abs(a.values - b.values).max() < 1e-5
    assert a.train_ids[0] == "0+1"


def test_full_fine_tuning_of_an_lm_differs_from_lora(tokenizer):
    model = llama(tokenizer)
    task = CausalLMTask(tokenizer)
    ex = task.examples(ITEMS[:3])
    full = EmpiricalInfluence(task, engine="naive", steps=1, lr=0.05, progress=False)
    lora = EmpiricalInfluence(
        task,
        engine="naive",
        steps=1,
        lr=0.05,
        lora_rank=4,
        lora_targets=("*q_proj",),
        progress=False,
    )
    a, b = full.score(model, ex, ex), lora.score(model, ex, ex)
    assert np.all(np.diag(a.values) > 0)  # learning a text makes it more likely
    assert np.abs(a.values - b.values).max() > 1e-3


# --- prompted EIF ------------------------------------------------------------------------


def test_prompted_equals_hand_computation(tokenizer):
    model = llama(tokenizer)
    task = CausalLMTask(tokenizer)
    train = task.examples(
        ["a wug is a blicket.", ("all blickets", " have a dax.")], ids=["s0", "s1"]
    )
    probes = task.examples(
        [("a wug has a", " dax."), "in winter, frogs hibernate."], ids=["q0", "q1"]
    )
    scores = PromptedInfluence(task, progress=False).score(model, train, probes)
    contexts = ["a wug is a blicket.", "all blickets have a dax."]
    queries = [("a wug has a", " dax."), ("", "in winter, frogs hibernate.")]
    for i, context in enumerate(contexts):
        for j, (prompt, completion) in enumerate(queries):
            expected = reference_log_prob(
                model, tokenizer, f"{context}\n{prompt}", completion
            ) - reference_log_prob(model, tokenizer, prompt, completion)
            assert scores.values[i, j] == pytest.approx(expected, abs=1e-4)
    assert scores.settings["template"] == "{context}\n{prompt}"


def test_prompted_resumes_from_partitions(tokenizer, tmp_path):
    from datafluence.store import RunDir

    model = llama(tokenizer)
    task = CausalLMTask(tokenizer)
    ex = task.examples(ITEMS)
    method = PromptedInfluence(task, chunk_size=1, probe_chunk_size=5, progress=False)
    first = method.score(model, ex, ex, run=RunDir(tmp_path).open({"x": 1}))
    files = sorted((tmp_path / "partitions").rglob("rows_*.npy"))
    assert len(files) == len(ITEMS)  # one training row per partition at chunk_size=1
    files[-1].unlink()
    again = method.score(model, ex, ex, run=RunDir(tmp_path).open({"x": 1}))
    assert np.array_equal(first.values, again.values)


def test_prompted_bad_input(tokenizer):
    task = CausalLMTask(tokenizer)
    with pytest.raises(ValueError, match="must contain both"):
        PromptedInfluence(task, template="{context}")
    ex = task.examples(ITEMS)
    stripped = type(ex)(ex.tensors, ex.ids)  # no raw texts kept
    with pytest.raises(ValueError, match="raw texts"):
        PromptedInfluence(task, progress=False).score(llama(tokenizer), stripped, ex)


# --- knowledge domains ---------------------------------------------------------------------


def test_shipped_domains_load_and_instantiate(tokenizer):
    assert {"transitivity", "chain_induces", "belongs_to"} <= set(available_domains())
    for name in available_domains():
        domain = load_domain(name)
        insts = instantiate(domain, tokenizer, 2, seed=3)
        assert len(insts) == 2 and insts[0].words != insts[1].words
        assert insts[0].texts[CONTROL_ID].startswith("in winter")
        for text in insts[0].texts.values():
            assert "{" not in text
        again = instantiate(domain, tokenizer, 2, seed=3)
        assert again[0].texts == insts[0].texts  # seeded
        names, groups = insts[0].rows()
        assert len(names) == len(groups) == len(insts[0].texts) + len(domain.groups)


def test_nonce_words_have_few_rare_pieces(tokenizer):
    words = nonce_words(tokenizer, 6, seed=0, min_tokens=2, max_tokens=3)
    assert len(set(words)) == 6
    for w in words:
        assert 2 <= len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) <= 3


@pytest.mark.parametrize(
    "raw, match",
    [
        (
            {
                "name": "x",
                "placeholders": ["A"],
                "sentences": [{"id": "s", "text": "{A} and {Q}", "role": "premise"}],
            },
            "unknown placeholder.*Q",
        ),
        ({"name": "x", "sentences": []}, "missing field 'placeholders'"),
        (
            {"name": "x", "placeholders": ["A"], "sentences": [{"id": "s", "role": "premise"}]},
            "missing field 'text'",
        ),
        (
            {
                "name": "x",
                "placeholders": ["A"],
                "sentences": [{"id": "s", "text": "{A}", "role": "guess"}],
            },
            "unknown role",
        ),
        (
            {
                "name": "x",
                "placeholders": ["A"],
                "sentences": [{"id": "s", "text": "{A}", "role": "premise"}],
                "groups": {"g": ["t"]},
            },
            "unknown sentences",
        ),
    ],
)
def test_bad_domain_files(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_domain(raw)


def test_domain_file_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "name": "mine",
                "placeholders": ["A"],
                "sentences": [{"id": "s", "text": "a {A}.", "role": "premise"}],
            }
        )
    )
    assert load_domain(path).name == "mine"
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        load_domain("nope")


# --- logic desiderata ----------------------------------------------------------------------


def test_logic_checks_on_a_constructed_matrix():
    rows = ("A_is_B", "Bs_have_C", "A_has_C", "A_lacks_C", "C_has_A", "control", "premises")
    cols = rows[:-1]
    values = np.zeros((len(rows), len(cols)))
    p = rows.index("premises")
    values[p, cols.index("A_is_B")] = 4.0
    values[p, cols.index("Bs_have_C")] = 2.0
    values[p, cols.index("A_has_C")] = 1.5
    values[p, cols.index("A_lacks_C")] = 0.5
    values[p, cols.index("C_has_A")] = -1.0
    values[:5, cols.index("control")] = 0.1
    values[p, cols.index("control")] = 0.3
    scores = Scores(values, rows, cols, method="test")
    checks = load_domain("transitivity").checks
    out = logic.logic_checks(
        scores,
        {k: checks[k] for k in ("transitivity", "consistency")}
        | {"direction": {"source": "premises", "correct": "A_has_C", "reversed": "C_has_A"}},
    )
    assert out["transitivity_implied"] == 1.5
    assert out["transitivity_premises"] == 3.0
    assert out["transitivity_ratio"] == 0.5
    assert out["consistency"] == 1.0
    assert out["direction"] == 2.5
    assert out["leakage_mean"] == pytest.approx((5 * 0.1 + 0.3) / 6)
    agg = logic.aggregate([out, {**out, "consistency": -1.0}])
    assert agg["consistency_share_positive"] == 0.5
    assert agg["consistency_mean"] == 0.0


def test_diffuseness():
    d = logic.diffuseness(np.array([[-1.0, 1.0], [2.0, 3.0]]), bins=4)
    assert d["share_negative"] == 0.25
    assert sum(d["histogram"]["counts"]) == 4
    with pytest.raises(ValueError, match="finite"):
        logic.diffuseness(np.array([np.nan]))


# --- loading models and the experiment end to end ------------------------------------------


def test_load_causal_lm_errors(tmp_path):
    from datafluence.models.language import load_causal_lm

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    bert = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a causal language model"):
        load_causal_lm(tmp_path / "bert")


def test_knowledge_domains_experiment_end_to_end(tokenizer, tmp_path):
    from datafluence.experiments.knowledge_domains import KnowledgeConfig, run
    from datafluence.finetune import FinetuneRecipe
    from datafluence.store import RunMismatchError

    folder = tmp_path / "tiny-llama"
    llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = FinetuneRecipe(
        steps=1, lr=0.05, optimizer="sgd", lora_rank=2, lora_targets=("*q_proj",)
    )
    config = KnowledgeConfig(
        model=str(folder), domains=("belongs_to", "transitivity"), n_instances=2, recipe=recipe
    )
    out = tmp_path / "run"
    metrics = run(out, config, progress=False, log=lambda *a: None)
    for name in ("belongs_to", "transitivity"):
        for mode in ("learned", "prompted"):
            scores = Scores.load(out / name / mode / "inst1")
            assert scores.shape[1] == len(load_domain(name).sentences) + 1  # + control
            m = metrics["domains"][name][mode]
            assert {"consistency_mean", "direction_share_positive", "leakage_mean_mean"} <= set(
                m["logic"]
            )
            assert -1 <= m["symmetry"]["spearman"] <= 1
    assert (out / "transitivity" / "learned" / "inst0" / "scores.npy").exists()
    for figure in ("belongs_to_matrices.png", "eif_histogram.png", "symmetry.png"):
        assert (out / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["diffuseness"]["learned"]["share_negative"] >= 0
    before = (out / "belongs_to" / "learned" / "inst0" / "scores.npy").read_bytes()
    run(out, config, progress=False, log=lambda *a: None)  # a finished run is reused as is
    assert (out / "belongs_to" / "learned" / "inst0" / "scores.npy").read_bytes() == before
    other = KnowledgeConfig(
        model=str(folder), domains=("belongs_to",), n_instances=2, recipe=recipe
    )
    with pytest.raises(RunMismatchError, match="overwrite"):
        run(out, other, progress=False, log=lambda *a: None)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompted_prefix_cache_equals_full_sequences(tokenizer, arch):
    model = llama(tokenizer) if arch == "llama" else gpt2(tokenizer)
    task = CausalLMTask(tokenizer)
    ex = task.examples(ITEMS)
    cached = PromptedInfluence(task, probe_chunk_size=3, progress=False).score(model, ex, ex)
    plain = PromptedInfluence(task, reuse_prefix=False, progress=False).score(model, ex, ex)
    assert np.abs(cached.values - plain.values).max() < 1e-4
    assert np.abs(cached.values).max() > 1e-3
