"""Per-example gradients from hooks against torch.func, module selection, projection, and
the gradient-similarity baselines (sign included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from datafluence.gradients import ParamSpace, RandomProjection, per_example_gradients
from datafluence.methods.gradient_similarity import GradientSimilarity
from datafluence.tasks import ClassificationTask


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SeqNet(nn.Module):
    """Embedding (with padding_idx) -> Linear used twice per token -> GPT-2 Conv1D ->
    token-sum pooling -> Linear head: every kind of layer, with a sequence dimension."""

    def __init__(self, vocab: int = 7, dim: int = 4, n_classes: int = 3) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.proj = Conv1D(dim, dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(x)))
        h = torch.tanh(self.mix(h))  # the same module twice: its calls add up
        h = torch.relu(self.proj(h))
        return self.head(h.sum(dim=1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.same = nn.Conv2d(3, 2, 3, padding="same", padding_mode="reflect", bias=False)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.same(torch.relu(self.conv(x)))
        return self.head(torch.relu(h).flatten(1))


def reference_grads(model: nn.Module, task, batch, which: str = "loss") -> dict:
    """torch.func per-example gradients (vmap of grad), the ground truth."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    fn = task.loss if which == "loss" else task.measure

    def one(p, x, y):
        return fn(lambda z: functional_call(model, p, (z,)), {"x": x[None], "y": y[None]})[0]

    return vmap(grad(one), in_dims=(None, 0, 0))(params, batch["x"], batch["y"])


def check_against_reference(model, batch, which="loss", modules=None):
    task = ClassificationTask()
    space = ParamSpace.of(model, modules)
    got = per_example_gradients(model, task, batch, space, which=which, chunk_size=3)
    ref = reference_grads(model, task, batch, which)
    for layer in space.layers:
        bias = ref.get(f"{layer.name}.bias")
        want = layer.to_matrix(ref[f"{layer.name}.weight"], bias)
        torch.testing.assert_close(got[layer.name], want, rtol=1e-10, atol=1e-12)
    return space


def test_hooks_match_vmap_grad_with_sequences_embedding_and_conv1d():
    torch.manual_seed(0)
    model = SeqNet().double()
    x = torch.randint(0, 7, (5, 6))
    x[0, :3] = 0  # padding tokens get no embedding gradient
    batch = {"x": x, "y": torch.randint(0, 3, (5,))}
    every = ["emb", "mix", "proj", "head"]
    space = check_against_reference(model, batch, modules=every)
    assert [layer.kind for layer in space.layers] == ["embedding", "linear", "conv1d", "linear"]
    check_against_reference(model, batch, which="measure", modules=every)
    assert ParamSpace.of(model).names == ["mix", "proj", "head"]  # embeddings on request


def test_hooks_match_vmap_grad_for_conv2d_with_padding_stride_and_reflect():
    torch.manual_seed(1)
    model = ConvNet().double()
    batch = {"x": torch.randn(4, 2, 8, 8, dtype=torch.float64), "y": torch.randint(0, 3, (4,))}
    check_against_reference(model, batch)


def test_matrix_form_round_trips_parameters():
    torch.manual_seed(0)
    for model in (SeqNet(), ConvNet()):
        for layer in ParamSpace.of(model, "").layers:  # "" = the whole model, embeddings too
            back = layer.from_matrix(layer.matrix())
            for got, param in zip(back, layer.parameters(), strict=True):
                torch.testing.assert_close(got, param.detach())


def test_module_selection_by_name_type_and_container():
    model = ConvNet()
    assert ParamSpace.of(model, "head").names == ["head"]
    assert ParamSpace.of(model, nn.Conv2d).names == ["conv", "same"]
    assert ParamSpace.of(model, ["head", nn.Conv2d]).names == ["conv", "same", "head"]
    wrapped = nn.Sequential(ConvNet())
    assert ParamSpace.of(wrapped, "0").names == ["0.conv", "0.same", "0.head"]
    assert ParamSpace.of(wrapped, "0.*").names == ["0.conv", "0.same", "0.head"]
    assert ParamSpace.of(wrapped, ["0.h*", "*.same"]).names == ["0.same", "0.head"]
    with pytest.raises(ValueError, match=r"pattern '\*\.mlp\.\*' matches no supported"):
        ParamSpace.of(wrapped, "*.mlp.*")


def test_module_selection_errors_name_the_fix():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no module named 'head'"):
        ParamSpace.of(model, "head")
    with pytest.raises(ValueError, match="not supported"):
        ParamSpace.of(model, "1")
    with pytest.raises(ValueError, match="no Linear, Conv2d or Conv1D module"):
        ParamSpace.of(nn.Sequential(nn.BatchNorm1d(3), nn.Embedding(3, 3)))
    with pytest.raises(ValueError, match="groups=1"):
        ParamSpace.of(nn.Conv2d(4, 4, 3, groups=2))


def test_projection_is_seeded_and_preserves_inner_products():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=gen)
    for kind in ("rademacher", "gaussian"):
        a = RandomProjection(2048, kind, seed=3).project("layer", x)
        b = RandomProjection(2048, kind, seed=3).project("layer", x)
        c = RandomProjection(2048, kind, seed=4).project("layer", x)
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
        exact, approx = x @ x.T, a @ a.T
        assert float((approx - exact).norm() / exact.norm()) < 0.1
    with pytest.raises(ValueError, match="unknown projection"):
        RandomProjection(8, "sparse")


def drawn_matrix(dim: int, kind: str, seed: int, name: str, width: int, total: int):
    """The projection's definition, straight: block b of a layer's columns comes from a
    generator seeded by sha256(f"{seed}/{name}/{b}"); entries (2 * randint - 1) / √dim or
    randn / √dim in float32."""
    import hashlib
    import math

    blocks = []
    for b, lo in enumerate(range(0, total, width)):
        digest = hashlib.sha256(f"{seed}/{name}/{b}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        shape = (dim, min(lo + width, total) - lo)
        if kind == "gaussian":
            m = torch.randn(*shape, generator=gen)
        else:
            m = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        blocks.append(m / math.sqrt(dim))
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_numbers_are_pinned_whatever_the_cache(kind, monkeypatch):
    """Projecting unit vectors reads the matrix back entry by entry: the same numbers in
    float32 and float64, on first and cached calls, and with blocks beyond the cache."""
    from datafluence.gradients import projection

    dim, total = 3 << 18, 7  # 5 columns a block (2^22 entries at most): two blocks; √dim
    expected = drawn_matrix(dim, kind, 7, "layer", 5, total)  # is not a float32 number
    for budget in (projection.CACHE_BYTES, 0, 5 * dim * (1 if kind == "rademacher" else 4)):
        monkeypatch.setattr(projection, "CACHE_BYTES", budget)
        proj = RandomProjection(dim, kind, seed=7)
        for dtype in (torch.float32, torch.float64, torch.float32):  # the last one cached
            got = proj.project("layer", torch.eye(total, dtype=dtype)).T
            assert torch.equal(got, expected.to(dtype))
        assert proj._cached <= budget


def test_gradient_similarity_dot_cosine_and_sign():
    """dot = ∇m_j · (−∇L_i): one SGD step of size η on example i changes m_j by η × dot."""
    torch.manual_seed(0)
    model = ConvNet().double()
    task = ClassificationTask()
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    train = task.examples(x, torch.randint(0, 3, (6,)))
    queries = task.examples(x[:3] + 0.1, torch.tensor([0, 1, 2]), ["q0", "q1", "q2"])
    dot = GradientSimilarity(task, "dot", progress=False).score(model, train, queries)
    space = ParamSpace.of(model)
    g_train = space.flatten(per_example_gradients(model, task, train, space, "loss"))
    g_query = space.flatten(per_example_gradients(model, task, queries, space, "measure"))
    np.testing.assert_allclose(dot.values, (-(g_train @ g_query.T)).numpy(), rtol=1e-5, atol=1e-6)
    assert dot.parts["per_layer"].shape == (3, 6, 3)
    np.testing.assert_allclose(dot.parts["per_layer"].sum(0), dot.values, rtol=1e-5, atol=1e-6)

    cos = GradientSimilarity(task, "cosine", progress=False).score(model, train, queries)
    norms = g_train.norm(dim=1)[:, None] * g_query.norm(dim=1)[None, :]
    np.testing.assert_allclose(
        cos.values, (-(g_train @ g_query.T) / norms).numpy(), rtol=1e-5, atol=1e-6
    )

    # The sign end to end: a small gradient step on example 0, then measure the queries.
    eta = 1e-4
    before = task.measure(model, queries.tensors).detach()
    stepped = ConvNet().double()
    stepped.load_state_dict(model.state_dict())
    loss = task.loss(stepped, train[[0]].tensors).sum()
    grads = torch.autograd.grad(loss, list(stepped.parameters()))
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), grads, strict=True):
            p -= eta * g
    change = (task.measure(stepped, queries.tensors).detach() - before).numpy()
    np.testing.assert_allclose(change, eta * dot.values[0], rtol=1e-2, atol=1e-9)


def test_factored_contraction_equals_dense_and_projection_approximates():
    """Linear layers are contracted from (a, g) factors; the numbers must not change."""
    torch.manual_seed(0)
    model = SeqNet().double()
    task = ClassificationTask()
    train = task.examples(torch.randint(0, 7, (8, 5)), torch.randint(0, 3, (8,)))
    queries = task.examples(torch.randint(0, 7, (3, 5)), torch.randint(0, 3, (3,)), ["a", "b", "c"])
    every = ["emb", "mix", "proj", "head"]
    space = ParamSpace.of(model, every)
    g_train = space.flatten(per_example_gradients(model, task, train, space, "loss"))
    g_query = space.flatten(per_example_gradients(model, task, queries, space, "measure"))
    for kind in ("dot", "cosine"):
        method = GradientSimilarity(task, kind, modules=every, progress=False)
        got = method.score(model, train, queries)
        want = -(g_train @ g_query.T)
        if kind == "cosine":
            want = want / (g_train.norm(dim=1)[:, None] * g_query.norm(dim=1)[None, :])
        np.testing.assert_allclose(got.values, want.numpy(), rtol=1e-5, atol=1e-6)
    proj = GradientSimilarity(task, "dot", modules=every, projection_dim=4096, progress=False)
    approx = proj.score(model, train, queries).values
    exact = -(g_train @ g_query.T).numpy()
    assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) < 0.15


class TinyLM(ClassificationTask):
    """Next-token loss summed over tokens (the per-example convention), on x alone."""

    measurement = "neg_loss"

    def check(self, examples, role="examples"):
        pass

    def outputs(self, model, batch):
        return model(batch["x"]).logits

    def loss(self, model, batch):
        logits = self.outputs(model, batch)[:, :-1]
        targets = batch["x"][:, 1:]
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)

    def measure(self, model, batch):
        return -self.loss(model, batch)


@pytest.mark.filterwarnings("ignore::UserWarning")  # vmap falls back for CPU attention kernels
def test_tiny_gpt2_conv1d_blocks_and_clear_errors_for_tied_and_shared_modules():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).double().eval()
    task = TinyLM()
    x = torch.randint(0, 11, (3, 6))
    default = ParamSpace.of(model)
    assert "transformer.wte" not in default.names and "lm_head" not in default.names  # tied
    with pytest.raises(ValueError, match="tied to"):
        ParamSpace.of(model, "transformer.wte")
    positions = ParamSpace.of(model, ["transformer.wpe", "transformer.h"])
    with pytest.raises(ValueError, match=r"'transformer.wpe'.*shared across the batch"):
        per_example_gradients(model, task, {"x": x}, positions)
    space = ParamSpace.of(model, "transformer.h")
    assert {layer.kind for layer in space.layers} == {"conv1d"}
    got = per_example_gradients(model, task, {"x": x}, space)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi):
        return task.loss(lambda z: functional_call(model, p, (z,)), {"x": xi[None]})[0]

    ref = vmap(grad(one), in_dims=(None, 0))(params, x)
    for layer in space.layers:
        want = layer.to_matrix(ref[f"{layer.name}.weight"], ref[f"{layer.name}.bias"])
        torch.testing.assert_close(got[layer.name], want, rtol=1e-9, atol=1e-12)
