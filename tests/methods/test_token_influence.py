"""Per-token influence (Grosse et al. 2023): token terms sum to the scores for every query
form, equal a hand computation from hooked activations, padding holds 0, the spurious-
sequence ratio has its known values, and bad inputs get clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from tiny_lm import bpe_tokenizer, tiny_llama  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from datafluence.gradients.dots import QueryBlock, layer_dots, layer_token_dots  # noqa: E402
from datafluence.gradients.layers import Layer  # noqa: E402
from datafluence.methods.influence import InfluenceFunction  # noqa: E402
from datafluence.metrics import spurious_sequences  # noqa: E402
from datafluence.scores import Scores  # noqa: E402
from datafluence.tasks import CausalLMTask, ClassificationTask  # noqa: E402

CORPUS = [
    "a wug is a blicket. all blickets have a dax. in winter, frogs hibernate in the mud.",
    "every cat is an animal. the dog causes the rain. a bird has a nest.",
]
TRAIN = [
    ("a wug is a", " blicket."),
    "all blickets have a dax.",
    ("in winter, frogs", " hibernate in the mud."),
    "a bird has a nest.",
    ("every cat", " is an animal."),
]
QUERIES = [("a wug has", " a dax."), "the dog causes the rain."]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return bpe_tokenizer(CORPUS * 5, vocab_size=320)


def gpt2(tokenizer, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",  # CG's double backward has no SDPA derivative on CPU
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


def llama(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(
        tokenizer,
        num_hidden_layers=1,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def check_sums(tokens: Scores, reference: Scores) -> None:
    """Token parts sum to the values; the values equal score()'s (float32 rounding)."""
    per_token = tokens.parts["per_token"]
    assert per_token.dtype == np.float32
    scale = float(np.abs(reference.values).max())
    assert scale > 0
    np.testing.assert_allclose(
        per_token.sum(0, dtype=np.float64), tokens.values, rtol=1e-5, atol=1e-6 * scale
    )
    np.testing.assert_allclose(tokens.values, reference.values, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("curvature", "options"),
    [
        ("identity", {}),
        ("identity", {"query_rank": 2}),
        ("ekfac", {}),
        ("ekfac", {"query_rank": 3}),
        # a few CG steps (unconverged) still give a fixed preconditioned query side
        pytest.param("cg", {"max_iter": 3}, marks=pytest.mark.filterwarnings("ignore:cg stopped")),
    ],
)
def test_token_parts_sum_to_the_scores(tokenizer, curvature, options):
    task = CausalLMTask(tokenizer)
    model = gpt2(tokenizer)
    train, queries = task.examples(TRAIN), task.examples(QUERIES)
    # chunks of 2: each chunk feeds the model a different number of positions
    inf = InfluenceFunction(task, curvature, chunk_size=2, progress=False, **options)
    reference = inf.score(model, train, queries)
    tokens = inf.token_scores(model, train, queries)
    width = train.tensors["input_ids"].shape[1]
    assert tokens.parts["per_token"].shape == (width, len(TRAIN), len(QUERIES))
    assert "per_layer" not in tokens.parts
    check_sums(tokens, reference)
    # positions a sequence does not use hold exactly 0: padding, and the last token (it
    # predicts nothing); every other completion-predicting position carries something
    per_token = tokens.parts["per_token"]
    lengths = train.tensors["attention_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert (per_token[n - 1 :, i] == 0).all()
        assert (np.abs(per_token[: n - 1, i]).max(axis=1) > 0).all()


def test_embedding_and_head_of_a_llama(tokenizer):
    """Indexed (embedding) layers and a full-width output head, through the EK-FAC path."""
    task = CausalLMTask(tokenizer, slice_logits=False)
    model = llama(tokenizer)
    train, queries = task.examples(TRAIN), task.examples(QUERIES)
    modules = ["model.embed_tokens", "model.layers.0.mlp", "lm_head"]
    inf = InfluenceFunction(task, "ekfac", modules=modules, chunk_size=3, progress=False)
    check_sums(inf.token_scores(model, train, queries), inf.score(model, train, queries))


def hooked_terms(model, layers, tensors, loss_fn):
    """Inputs x [B, T, d_in] and output gradients [B, T, d_out] of GPT-2 Conv1D layers."""
    xs, gs = {}, {}
    handles = []
    for name, module in layers.items():

        def forward(mod, inputs, output, name=name):
            xs[name] = inputs[0].detach()
            output.register_hook(lambda grad: gs.__setitem__(name, grad.detach()))

        handles.append(module.register_forward_hook(forward))
    try:
        loss = loss_fn(model, tensors)
        torch.autograd.grad(loss.sum(), [p for p in model.parameters() if p.requires_grad])
    finally:
        for h in handles:
            h.remove()
    return xs, gs


def summed_log_probs(model, tensors) -> torch.Tensor:
    """Hand-written: Σ over completion tokens of log p, the whole padded sequence fed."""
    ids, target = tensors["input_ids"], tensors["target_mask"]
    logits = model(input_ids=ids, attention_mask=tensors["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * target[:, 1:]).sum(1)


def test_each_token_term_equals_a_hand_computation(tokenizer):
    """Identity curvature: term(t, i, j) = −Σ_layers ⟨x_t g_tᵀ, ∇_W m_j⟩ + g_t·∇_b m_j, from
    the training sequence's own activations x_t and output gradients g_t at position t."""
    task = CausalLMTask(tokenizer)
    model = gpt2(tokenizer, torch.float64)
    train, queries = task.examples(TRAIN), task.examples(QUERIES)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    tokens = InfluenceFunction(task, "identity", modules=names, progress=False).token_scores(
        model, train, queries
    )
    per_token = tokens.parts["per_token"]
    layers = {n: model.get_submodule(n) for n in names}
    xs, gs = hooked_terms(model, layers, train.tensors, lambda m, t: -summed_log_probs(m, t))
    expected = np.zeros(per_token.shape)
    for j in range(len(QUERIES)):
        query = {k: v[j : j + 1] for k, v in queries.tensors.items()}
        m_j = summed_log_probs(model, query).sum()
        params = [p for n in names for p in (layers[n].weight, layers[n].bias)]
        grads = torch.autograd.grad(m_j, params)
        for k, n in enumerate(names):
            dw, db = grads[2 * k], grads[2 * k + 1]  # Conv1D: y = x W + b, W [d_in, d_out]
            term = torch.einsum("bti,io,bto->bt", xs[n], dw, gs[n]) + gs[n] @ db
            expected[:, :, j] -= term.T.numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(per_token, expected, rtol=1e-4, atol=1e-5 * scale)


def test_token_scores_resume_beside_score_partitions(tokenizer, tmp_path):
    task = CausalLMTask(tokenizer)
    model = gpt2(tokenizer)
    train, queries = task.examples(TRAIN), task.examples(QUERIES)
    inf = InfluenceFunction(task, "identity", chunk_size=2, progress=False)
    plain = inf.score(model, train, queries, run=tmp_path)
    first = inf.token_scores(model, train, queries, run=tmp_path)
    again = inf.token_scores(model, train, queries, run=tmp_path)  # read back from disk
    np.testing.assert_array_equal(first.parts["per_token"], again.parts["per_token"])
    check_sums(again, plain)


@pytest.mark.parametrize("form", ["dense", "factors", "lowrank"])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_layer_token_dots_equal_single_token_gradients(form, kind):
    """Term t = ⟨g_t a_tᵀ, Q_j⟩ with the one-token gradient built by Layer.per_example, and the
    sum over t is layer_dots; budget=1 forces one query per block."""
    torch.manual_seed(0)
    b, t, q, s = 3, 4, 5, 2
    if kind == "linear":
        layer = Layer("lin", nn.Linear(6, 7).double(), "linear")
        a, qa = torch.randn(b, t, 7).double(), torch.randn(q, s, 7).double()
    else:
        layer = Layer("emb", nn.Embedding(9, 7).double(), "embedding")
        a, qa = torch.randint(-1, 9, (b, t)), torch.randint(-1, 9, (q, s))
    d_out, d_in = layer.shape
    g, qg = torch.randn(b, t, d_out).double(), torch.randn(q, s, d_out).double()
    if form == "factors":
        block = QueryBlock(factors=(qa, qg))
        dense = layer.per_example(qa, qg)
    elif form == "lowrank":
        u, v = torch.randn(q, d_out, 2).double(), torch.randn(q, d_in, 2).double()
        block = QueryBlock(lowrank=(u, v))
        dense = u @ v.transpose(1, 2)
    else:
        dense = torch.randn(q, d_out, d_in).double()
        block = QueryBlock(dense=dense)
    got = layer_token_dots(layer, a, g, block, budget=1)
    assert got.shape == (b, t, q)
    for k in range(t):
        single = layer.per_example(a[:, k : k + 1], g[:, k : k + 1])
        want = torch.einsum("boi,qoi->bq", single, dense)
        torch.testing.assert_close(got[:, k], want)
    torch.testing.assert_close(got.sum(1), layer_dots(layer, a, g, block))


# --- bad inputs ---------------------------------------------------------------------------


class CalledTwice(nn.Module):
    """A tiny LM whose hidden layer runs twice per forward pass (weights shared in depth)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None, **_):
        h = torch.tanh(self.hidden(torch.tanh(self.hidden(self.emb(input_ids)))))
        return self.head(h)


def test_layers_that_are_not_one_per_input_token(tokenizer):
    task = CausalLMTask(tokenizer, slice_logits=False)
    train, queries = task.examples(TRAIN), task.examples(QUERIES)
    model = CalledTwice(len(tokenizer))
    inf = InfluenceFunction(task, "identity", progress=False)
    with pytest.raises(ValueError, match="'hidden' ran 2 times.*once per input token"):
        inf.token_scores(model, train, queries)
    inf.score(model, train, queries)  # per-example scores are fine
    # an output head sliced to the predicting positions sees fewer tokens than the inputs
    sliced = CausalLMTask(tokenizer)
    prompted = sliced.examples([item for item in TRAIN if isinstance(item, tuple)])
    inf = InfluenceFunction(sliced, "identity", modules="all", progress=False)
    with pytest.raises(ValueError, match="'lm_head' sees .* tokens.*slice_logits=False"):
        inf.token_scores(llama(tokenizer), prompted, sliced.examples(QUERIES))


def test_conv_and_non_sequence_models_are_refused():
    task = ClassificationTask()
    torch.manual_seed(0)
    images = task.examples(torch.randn(4, 1, 5, 5), [0, 1, 0, 1])
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 2))
    with pytest.raises(ValueError, match="layer '0' is a Conv2d.*once per input token"):
        InfluenceFunction(task, "identity", progress=False).token_scores(cnn, images, images)
    flat = task.examples(torch.randn(4, 3), [0, 1, 0, 1])
    mlp = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="2-D 'input_ids'.*CausalLMTask.examples"):
        InfluenceFunction(task, "identity", progress=False).token_scores(mlp, flat, flat)


# --- the spurious-sequence flag -----------------------------------------------------------


def test_spurious_ratio_known_answers():
    t = 9
    parts = np.zeros((t, 1, 5))
    parts[4, 0, 0] = -3.0  # one token holds everything (sign does not matter)
    parts[:, 0, 1] = 0.5  # spread evenly over T tokens
    parts[[2, 7], 0, 2] = [1.0, -1.0]  # two tokens, equal shares (their sum is 0)
    # column 3 stays all zero
    parts[:, 0, 4] = np.r_[10.0, np.full(t - 1, 0.01)]  # one dominant token among noise
    dominant = math.sqrt(100 + (t - 1) * 1e-4) / (10 + (t - 1) * 0.01)  # ≈ 0.992
    ratio, flags = spurious_sequences(parts)
    assert ratio.shape == flags.shape == (1, 5)
    np.testing.assert_allclose(
        ratio[0], [1.0, 1 / math.sqrt(t), 1 / math.sqrt(2), 0.0, dominant], rtol=1e-12
    )
    assert flags[0].tolist() == [True, False, True, False, True]
    _, strict = spurious_sequences(parts, threshold=0.8)
    assert strict[0].tolist() == [True, False, False, False, True]


def test_spurious_reads_token_scores_and_rejects_bad_input(tokenizer):
    task = CausalLMTask(tokenizer)
    train, queries = task.examples(TRAIN), task.examples(QUERIES)
    inf = InfluenceFunction(task, "identity", progress=False)
    tokens = inf.token_scores(gpt2(tokenizer), train, queries)
    ratio, flags = spurious_sequences(tokens)
    assert ratio.shape == flags.shape == (len(TRAIN), len(QUERIES))
    width = train.tensors["input_ids"].shape[1]
    assert ((ratio >= 1 / math.sqrt(width) - 1e-9) & (ratio <= 1 + 1e-9)).all()
    with pytest.raises(ValueError, match="no parts\\['per_token'\\].*token_scores"):
        spurious_sequences(Scores(tokens.values, tokens.train_ids, tokens.query_ids, "x"))
    with pytest.raises(
        ValueError, match="3-D array \\[T, n_train, n_query\\].*got shape \\(5, 2\\)"
    ):
        spurious_sequences(tokens.values)
    with pytest.raises(ValueError, match="threshold must lie in \\[0, 1\\)"):
        spurious_sequences(tokens, threshold=1.0)
    bad = np.array(tokens.parts["per_token"])
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="per-token scores contains 1 NaN"):
        spurious_sequences(bad)


def test_second_order_solvers_name_the_fix_for_kernels_without_double_backward(tokenizer):
    """transformers' default SDPA attention has no double backward on CPU: CG must say how
    to get one (eager attention) or which strategies need none."""
    model = gpt2(tokenizer)
    model.config._attn_implementation = "sdpa"
    task = CausalLMTask(tokenizer)
    train = task.examples(TRAIN[:2])
    queries = task.examples(QUERIES[:1])
    method = InfluenceFunction(task, "cg", max_iter=2, progress=False)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'.*ekfac"):
        method.score(model, train, queries)
