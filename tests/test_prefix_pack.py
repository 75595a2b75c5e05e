"""Prefix-tree packing of LM probes: the trie layout, and packed measurements equal to the
ordinary padded ones on tiny Llama and GPT-2 models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from test_lm import CORPUS, gpt2, llama  # noqa: E402
from tiny_lm import CharTokenizer, bpe_tokenizer  # noqa: E402

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
    """'ab', 'ac', 'ab' and 'b' after the start token: nodes ^, ^a, ^ab, ^ac, ^b in one row,
    each attending to exactly its ancestors and itself, at the position of its depth."""
    task = CausalLMTask(CharTokenizer())
    probes = task.examples(["ab", "ac", "ab", "b"])
    pack = pack_probes(probes.tensors, pad_id=0, width=8)
    assert pack.input_ids.shape == (1, 8)
    a, b, c = (2 + CharTokenizer.alphabet.index(x) for x in "abc")
    assert pack.input_ids[0, :5].tolist() == [1, a, b, c, b]  # ^ a ab ac b, then padding
    assert pack.position_ids[0, :5].tolist() == [0, 1, 2, 2, 1]
    allowed = pack.allowed[0].int()
    assert allowed[:5, :5].tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 0, 0, 0, 1],
    ]
    assert torch.equal(allowed[5:, 5:], torch.eye(3, dtype=torch.int))  # padding: self only
    # edges: (predicting node, token); the shared ^->a edge is computed once, used 3 times
    edges = {
        (int(n), int(t)): pack.edge_use[e]
        for e, (n, t) in enumerate(zip(pack.edge_node, pack.edge_token, strict=True))
    }
    assert set(edges) == {(0, a), (1, b), (1, c), (0, b)}
    assert edges[(0, a)].tolist() == [1, 1, 1, 0] and edges[(1, b)].tolist() == [1, 0, 1, 0]


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
