"""Prefix-tree packing of LM probes: the trie layout, and packed measurements equal to the
ordinary padded ones on tiny Llama and GPT-2 models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from tiny_lm import CORPUS, CharTokenizer, bpe_tokenizer, gpt2, llama  # noqa: E402  # noqa: E402

from datafluence.finetune.prefix_pack import (  # noqa: E402
    measure_packed,
    pack_probes,
    packing_matches,
)
from datafluence.tasks import CausalLMTask  # noqa: E402

# shared prefixes, a duplicate, a probe that is a prefix of another, prompt/completion pairs
# whose prompt tokens are scored in one probe and not in another
PROBES = [
    "a wug has a dax.",
    "a wug has a cat.",
    "a wug is a blicket.",
    ("a wug has", " a dax."),
    "a wug has a dax.",
    "a wug",
    ("in winter, frogs", " hibernate."),
    "every cat is an animal. the dog causes the rain.",
    "all blickets have a dax.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS * 5, vocab_size=320)


def test_trie_layout_on_characters() -> None:
    """'abd', 'ac', 'ab' and 'bc' after the start token: only the nodes whose output predicts
    a scored token, ^, ^a, ^ab and ^b, in one row (the last tokens are read by nothing), each
    attending to exactly its ancestors and itself, at the position of its depth."""
    task = CausalLMTask(CharTokenizer())
    probes = task.examples(["abd", "ac", "ab", "bc"])
    pack = pack_probes(probes.tensors, pad_id=0, width=8)
    assert pack.input_ids.shape == (1, 8)
    a, b, c, d = (2 + CharTokenizer.alphabet.index(x) for x in "abcd")
    assert pack.input_ids[0, :4].tolist() == [1, a, b, b]  # ^ a ab b, then padding
    assert (pack.input_ids[0, 4:] == 0).all()
    assert pack.position_ids[0, :4].tolist() == [0, 1, 2, 1]
    allowed = pack.allowed[0].int()
    assert allowed[:4, :4].tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 0, 0, 1],
    ]
    assert torch.equal(allowed[4:, 4:], torch.eye(4, dtype=torch.int))  # padding: self only
    # edges: (context node, token); the shared ^->a edge is computed once, used 3 times
    edges = {
        (int(n), int(t)): pack.edge_use[e]
        for e, (n, t) in enumerate(zip(pack.edge_node, pack.edge_token, strict=True))
    }
    assert set(edges) == {(0, a), (1, b), (2, d), (1, c), (0, b), (3, c)}
    assert edges[(0, a)].tolist() == [1, 1, 1, 0] and edges[(1, b)].tolist() == [1, 0, 1, 0]
    assert edges[(3, c)].tolist() == [0, 0, 0, 1]


def test_rows_hold_at_most_width_nodes_and_split_the_trie() -> None:
    task = CausalLMTask(CharTokenizer())
    words = ["abcd", "abce", "abdf", "bcde", "bcdf", "cdef", "a"]
    pack = pack_probes(task.examples(words).tensors, pad_id=0, width=6)
    assert pack.input_ids.shape[1] == 6 and len(pack.input_ids) > 1
    # every probe's scored tokens are found once each: 4 per 4-letter word, 1 for "a"
    assert pack.edge_use.sum(0).tolist() == [4, 4, 4, 4, 4, 4, 1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("width, probe_rows", [(None, 256), (16, 1)])
def test_packed_measurement_equals_padded(tokenizer, arch, width, probe_rows, monkeypatch):
    from datafluence.finetune import prefix_pack

    model = llama(tokenizer) if arch == "llama" else gpt2(tokenizer)
    task = CausalLMTask(tokenizer)
    probes = task.examples(PROBES)
    if width is not None:  # narrow rows: several rows, one per forward
        monkeypatch.setattr(prefix_pack, "WIDTHS", (width,))
    pack = pack_probes(probes.tensors, tokenizer.pad_token_id)
    nodes = int((pack.input_ids != tokenizer.pad_token_id).sum())
    assert nodes < int(probes.tensors["attention_mask"].sum())  # prefixes really are shared
    got = measure_packed(model, task, probes.tensors, copies=2, probe_rows=probe_rows)
    want = task.measure(model, probes.tensors).detach()
    assert got.shape == (2, len(PROBES))
    torch.testing.assert_close(got[0], want, rtol=0, atol=5e-5)
    torch.testing.assert_close(got[1], want, rtol=0, atol=5e-5)
    prob = CausalLMTask(tokenizer, measurement="prob")
    torch.testing.assert_close(
        measure_packed(model, prob, probes.tensors)[0], want.exp(), rtol=1e-4, atol=0
    )


def test_models_that_change_logits_after_the_projection_are_not_packed(tokenizer):
    """Logit scaling (as Cohere's `logit_scale`) happens after the vocabulary projection,
    which packing computes itself: the check sees the difference and the engine measures
    padded rows instead."""
    from datafluence.methods import EmpiricalInfluence

    model = llama(tokenizer)
    task = CausalLMTask(tokenizer)
    probes = task.examples(PROBES)
    assert packing_matches(model, task, probes.tensors)

    class Scaled(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 4.0 * out.logits
            return out

    scaled = llama(tokenizer)
    scaled.__class__ = Scaled
    assert not packing_matches(scaled, task, probes.tensors)
    recipe = dict(steps=1, lr=0.05, lora_rank=4, lora_targets=("*q_proj", "*v_proj"))
    naive = EmpiricalInfluence(task, engine="naive", progress=False, **recipe)
    batched = EmpiricalInfluence(task, progress=False, **recipe)
    want = naive.score(scaled, probes[:3], probes).values
    got = batched.score(scaled, probes[:3], probes).values
    assert abs(want - got).max() < 1e-5


def test_long_probes_are_measured_padded(tokenizer, monkeypatch):
    from datafluence.finetune import lora
    from datafluence.methods import EmpiricalInfluence

    model = llama(tokenizer)
    task = CausalLMTask(tokenizer)
    probes = task.examples(PROBES)
    calls = []
    original = lora.measure_packed
    monkeypatch.setattr(
        lora, "measure_packed", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    recipe = dict(steps=1, lr=0.05, lora_rank=4, lora_targets=("*q_proj", "*v_proj"))
    packed = EmpiricalInfluence(task, progress=False, **recipe).score(model, probes[:2], probes)
    assert calls  # short probes: packed
    calls.clear()
    monkeypatch.setattr(lora, "MAX_PACKED_LENGTH", 5)
    padded = EmpiricalInfluence(task, progress=False, **recipe).score(model, probes[:2], probes)
    assert not calls
    assert abs(packed.values - padded.values).max() < 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 4), (512, 1024), (2, 11), (7, 5)])
def test_edge_log_probs_projects_each_context_once_in_tiles(rows, vocab, bias):
    """Edges read their context's log-softmax row whichever tile of `rows` positions x
    `vocab` entries their context and token fall in."""
    from datafluence.finetune.prefix_pack import edge_log_probs

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=bias)
    hidden = torch.randn(7, 6)
    context = torch.tensor([0, 0, 3, 6, 2, 6, 5, 1, 4])
    tokens = torch.tensor([1, 2, 3, 10, 0, 10, 7, 9, 4])
    want = torch.log_softmax(head(hidden), -1)[context, tokens]
    got = edge_log_probs(head, hidden, context, tokens, rows=rows, vocab=vocab)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
