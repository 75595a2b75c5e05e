"""Representation similarity against hand computations: a hidden layer of an MLP, a conv
feature map (flattened, eval mode), and mask-aware pooling of a tiny GPT-2's hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_lm import CharTokenizer, char_gpt2
from torch import nn

from datafluence.methods.representation_similarity import RepresentationSimilarity
from datafluence.tasks import ClassificationTask


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return (a @ b.T).numpy()


def test_hidden_layer_cosine_and_dot():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(0)
    train = task.examples(
        torch.randn(7, 4, generator=gen, dtype=torch.float64), [0, 1, 2] * 2 + [0]
    )
    queries = task.examples(torch.randn(3, 4, generator=gen, dtype=torch.float64), [2, 1, 0])
    with torch.no_grad():
        h_train = torch.tanh(model[0](train.tensors["x"]))
        h_query = torch.tanh(model[0](queries.tensors["x"]))
    cos = RepresentationSimilarity(task, "1", chunk_size=3).score(model, train, queries)
    np.testing.assert_allclose(cos.values, cosine(h_train, h_query), rtol=1e-6)
    dot = RepresentationSimilarity(task, "1", kind="dot").score(model, train, queries)
    np.testing.assert_allclose(dot.values, (h_train @ h_query.T).numpy(), rtol=1e-6)
    assert cos.method == "repsim_cosine" and cos.settings["dim"] == 6
    assert cos.settings["module"] == "1"


def test_conv_feature_maps_are_flattened_in_eval_mode(make_model, make_examples, task):
    model = make_model(train_mode=True)  # dropout and BatchNorm batch statistics would differ
    train, queries = make_examples(6, seed=0), make_examples(2, seed=1, prefix="q")
    with torch.no_grad():
        model.eval()
        conv = model.body[:2]  # conv -> BatchNorm (running statistics)
        h_train = conv(train.tensors["x"]).flatten(1).double()
        h_query = conv(queries.tensors["x"]).flatten(1).double()
        model.train()
    scores = RepresentationSimilarity(task, "body.1").score(model, train, queries)
    np.testing.assert_allclose(scores.values, cosine(h_train, h_query), rtol=1e-5)
    assert model.training  # mode restored
    assert scores.settings["dim"] == 4 * 6 * 6


def test_bad_inputs(make_model, make_examples, task):
    model = make_model()
    ex = make_examples(2)
    with pytest.raises(ValueError, match="no module named"):
        RepresentationSimilarity(task, "body.9").score(model, ex, ex)
    with pytest.raises(ValueError, match="unknown kind"):
        RepresentationSimilarity(task, "head", kind="l2")
    with pytest.raises(ValueError, match="unknown pooling"):
        RepresentationSimilarity(task, "head", pooling="max")


def test_language_model_pooling_ignores_padding():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    from datafluence.tasks import CausalLMTask

    model = char_gpt2(n_layer=2)
    task = CausalLMTask(CharTokenizer())
    items = [("ab", "cd"), "abc", ("h", "gg da"), "e"]
    train = task.examples(items)
    queries = task.examples([("ab", "c"), "bad fa"], ids=["q0", "q1"])

    def pooled(examples, how, span="all"):
        """Each example alone (no padding), hidden states after block 0."""
        out = []
        for item in examples.items:
            tokens, start = task.encode(item)
            with torch.no_grad():
                h = model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
            h = h.hidden_states[1][0]  # [T, D]
            if span == "completion":
                h = h[start:]
            out.append(h.mean(0) if how == "mean" else h[-1])
        return torch.stack(out)

    for how, span in [("mean", "all"), ("last", "all"), ("mean", "completion")]:
        method = RepresentationSimilarity(task, "transformer.h.0", pooling=how, span=span)
        scores = method.score(model, train, queries)
        want = cosine(pooled(train, how, span), pooled(queries, how, span))
        np.testing.assert_allclose(scores.values, want, rtol=1e-6, err_msg=f"{how}/{span}")
