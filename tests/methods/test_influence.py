"""InfluenceFunction end to end: the sign and scale against real retraining, identity =
gradient dot product, exact per-layer sums, streaming into a run, and clear errors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from tiny_lm import CharTokenizer, char_gpt2
from torch import Tensor, nn

from datafluence.curvature import FactorMismatchError
from datafluence.methods.gradient_similarity import GradientSimilarity
from datafluence.methods.influence import InfluenceFunction
from datafluence.store import RunDir
from datafluence.tasks import ClassificationTask, Examples


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data(n: int = 20, seed: int = 0, prefix: str = "t") -> tuple[ClassificationTask, Examples]:
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return task, task.examples(x, y, [f"{prefix}{i}" for i in range(n)])


def fit_logistic(model: nn.Linear, train: Examples, weights: Tensor, l2: float) -> None:
    """Minimise Σ w_k L_k / N + l2/2 ||θ||² exactly (strongly convex): LBFGS, then Newton
    steps to machine precision, so retraining differences are not optimiser noise."""
    x, y = train.tensors["x"], train.tensors["y"]
    shapes = [p.shape for p in model.parameters()]

    def objective(flat: Tensor) -> Tensor:
        w, b = torch.split(flat, [shapes[0].numel(), shapes[1].numel()])
        logits = x @ w.reshape(shapes[0]).T + b
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        return (weights * losses).sum() / len(y) + l2 / 2 * (flat**2).sum()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt_flat = flat.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([opt_flat], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(opt_flat)
        value.backward()
        return value

    opt.step(closure)
    flat = opt_flat.detach()
    for _ in range(5):
        g = torch.autograd.functional.jacobian(objective, flat)
        h = torch.autograd.functional.hessian(objective, flat)
        flat = flat - torch.linalg.solve(h, g)
    with torch.no_grad():
        for p, value in zip(
            model.parameters(), torch.split(flat, [s.numel() for s in shapes]), strict=True
        ):
            p.copy_(value.reshape(p.shape))


def test_sign_and_scale_match_retraining_with_the_explicit_hessian():
    """Giving training example i weight 1 + ε (in Σ_k w_k L_k / N) changes query j's
    log-likelihood by ≈ ε/N × score(i, j): positive = i helps j; ε = 1 is one more copy."""
    task, train = data(n=30, seed=1)
    _, queries = data(n=4, seed=2, prefix="q")
    l2 = 0.1
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    ones = torch.ones(len(train), dtype=torch.float64)
    fit_logistic(model, train, ones, l2)
    method = InfluenceFunction(task, "explicit", damping=l2, matrix="hessian", progress=False)
    scores = method.score(model, train, queries)
    eps = 1e-3
    for i in (0, 7, 19):
        changes = []
        for sign in (1, -1):
            tuned = nn.Linear(4, 3).double()
            tuned.load_state_dict(model.state_dict())
            bump = ones.clone()
            bump[i] += sign * eps
            fit_logistic(tuned, train, bump, l2)
            changes.append(task.measure(tuned, queries.tensors).detach())
        measured = ((changes[0] - changes[1]) / (2 * eps)).numpy()
        np.testing.assert_allclose(scores.values[i] / len(train), measured, rtol=1e-5, atol=1e-8)
    assert (np.abs(scores.values) > 1e-3).any()


def test_identity_curvature_equals_the_gradient_dot_product():
    model = mlp()
    task, train = data()
    _, queries = data(n=5, seed=3, prefix="q")
    influence = InfluenceFunction(task, "identity", progress=False).score(model, train, queries)
    dot = GradientSimilarity(task, "dot", progress=False).score(model, train, queries)
    np.testing.assert_allclose(influence.values, dot.values, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        influence.parts["per_layer"], dot.parts["per_layer"], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("curvature", "options"),
    [
        ("identity", {}),
        ("diagonal", {"damping": 0.1}),
        ("kfac", {}),
        ("ekfac", {}),
        ("explicit", {"blocks": "layer"}),
        ("explicit", {}),
    ],
)
def test_per_layer_parts_sum_to_the_total(curvature, options):
    model = mlp()
    task, train = data()
    _, queries = data(n=5, seed=3, prefix="q")
    scores = InfluenceFunction(task, curvature, progress=False, **options).score(
        model, train, queries
    )
    parts = scores.parts["per_layer"]
    assert parts.shape == (2, len(train), len(queries))
    np.testing.assert_allclose(parts.sum(0), scores.values, rtol=1e-5, atol=1e-6)
    assert scores.settings["layers"] == ["0", "2"]


def test_block_diagonal_parts_are_each_layers_own_influence():
    """With block-diagonal curvature, a layer's part is the influence through that layer alone."""
    model = mlp()
    task, train = data()
    _, queries = data(n=3, seed=3, prefix="q")
    both = InfluenceFunction(task, "ekfac", fisher="exact", progress=False).score(
        model, train, queries
    )
    for k, name in enumerate(["0", "2"]):
        alone = InfluenceFunction(task, "ekfac", fisher="exact", modules=name, progress=False)
        np.testing.assert_allclose(
            both.parts["per_layer"][k],
            alone.score(model, train, queries).values,
            rtol=1e-5,
            atol=1e-6,
        )


def test_scale_is_a_mean_duplicating_the_training_set_changes_nothing():
    model = mlp()
    task, train = data()
    _, queries = data(n=3, seed=3, prefix="q")
    x, y = train.tensors["x"], train.tensors["y"]
    twice = task.examples(torch.cat([x, x]), torch.cat([y, y]))
    once = InfluenceFunction(task, "explicit", progress=False).score(model, train, queries)
    doubled = InfluenceFunction(task, "explicit", progress=False).score(model, twice, queries)
    np.testing.assert_allclose(doubled.values[: len(train)], once.values, rtol=1e-5, atol=1e-6)


def test_self_score_is_the_diagonal_and_chunking_changes_nothing():
    model = mlp()
    task, train = data(n=11)
    for curvature in ("explicit", "ekfac", "kfac", "diagonal"):
        full = InfluenceFunction(task, curvature, chunk_size=4, progress=False)
        matrix = full.score(model, train, train).values
        np.testing.assert_allclose(
            full.self_score(model, train).values[:, 0], np.diag(matrix), rtol=1e-5
        )
        assert (
            full.self_score(model, train).values[:, 0] > 0
        ).all()  # m = −L: a positive quadratic form
        other = InfluenceFunction(task, curvature, chunk_size=32, progress=False)
        np.testing.assert_allclose(
            other.score(model, train, train).values, matrix, rtol=1e-5, atol=1e-7
        )


def test_query_rank_full_is_exact_and_low_is_close():
    model = mlp()
    task, train = data()
    _, queries = data(n=4, seed=3, prefix="q")
    exact = InfluenceFunction(task, "ekfac", progress=False).score(model, train, queries).values
    full = InfluenceFunction(task, "ekfac", query_rank=7, progress=False).score(
        model, train, queries
    )
    np.testing.assert_allclose(full.values, exact, rtol=1e-5, atol=1e-6)
    low = InfluenceFunction(task, "ekfac", query_rank=1, progress=False).score(
        model, train, queries
    )
    assert np.corrcoef(low.values.ravel(), exact.ravel())[0, 1] > 0.8


def test_rows_stream_into_a_run_and_resume(tmp_path):
    model = mlp()
    task, train = data(n=10)
    _, queries = data(n=3, seed=3, prefix="q")
    memory = InfluenceFunction(task, "kfac", chunk_size=4, progress=False).score(
        model, train, queries
    )
    run = RunDir(tmp_path)
    method = InfluenceFunction(task, "kfac", chunk_size=4, progress=False)
    stored = method.score(model, train, queries, run=run)
    np.testing.assert_allclose(stored.values, memory.values, rtol=1e-6)
    np.testing.assert_allclose(stored.parts["per_layer"], memory.parts["per_layer"], rtol=1e-6)
    parts = list((tmp_path / "partitions").glob("influence-*/rows_*.npy"))
    assert len(parts) == 3  # 10 rows in chunks of 4
    parts[1].unlink()  # as if interrupted: only that partition is recomputed
    again = InfluenceFunction(task, "kfac", chunk_size=4, progress=False).score(
        model, train, queries, run=run
    )
    np.testing.assert_allclose(again.values, memory.values, rtol=1e-6)
    assert (tmp_path / "curvature" / "curvature.json").exists()


def test_conv_model_with_batchnorm_and_dropout(make_model, make_examples, task):
    model = make_model(train_mode=True)
    train, queries = make_examples(12), make_examples(3, seed=1, prefix="q")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = InfluenceFunction(task, "ekfac", progress=False).score(model, train, queries)
    assert np.isfinite(scores.values).all() and scores.parts["per_layer"].shape == (2, 12, 3)
    assert model.training  # restored
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])  # BatchNorm statistics untouched
    again = InfluenceFunction(task, "ekfac", progress=False).score(model, train, queries)
    np.testing.assert_allclose(again.values, scores.values)  # eval mode: dropout off


class MeanLossTask(ClassificationTask):
    """A broken task: its loss is reduced over the batch."""

    def loss(self, model, batch: Mapping[str, Tensor]) -> Tensor:
        return super().loss(model, batch).mean()


def test_bad_inputs_are_clear_errors():
    model = mlp()
    task, train = data()
    _, queries = data(n=3, seed=3, prefix="q")
    with pytest.raises(ValueError, match="no Linear, Conv2d or Conv1D module"):
        InfluenceFunction(task, progress=False).fit(
            nn.Sequential(nn.BatchNorm1d(4)).double(), train
        )
    with pytest.raises(ValueError, match="no module named 'fc1'"):
        InfluenceFunction(task, modules="fc1", progress=False).fit(model, train)
    with pytest.raises(ValueError, match="one loss per example"):
        InfluenceFunction(MeanLossTask(), "identity", progress=False).score(model, train, queries)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        InfluenceFunction(task, "ekfac", damping=0.0)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        InfluenceFunction(task, "explicit", damping=-1e-3)
    meta = Examples({k: v.to("meta") for k, v in queries.tensors.items()}, queries.ids)
    with pytest.raises(
        ValueError, match=r"query tensor 'x' is on meta and cannot be moved to the model's device"
    ):
        InfluenceFunction(task, progress=False).score(model, train, meta)
    with pytest.raises(ValueError, match="query_rank"):
        InfluenceFunction(task, query_rank=0)


def test_curvature_from_another_model_is_refused(tmp_path):
    task, train = data()
    _, queries = data(n=3, seed=3, prefix="q")
    method = InfluenceFunction(task, "kfac", progress=False).fit(mlp(0), train)
    with pytest.raises(ValueError, match="fitted on another model.*fit\\(model, train\\)"):
        method.score(mlp(1), train, queries)
    InfluenceFunction(task, "kfac", progress=False).fit(mlp(0), train, run=tmp_path)
    with pytest.raises(FactorMismatchError, match="another model"):
        InfluenceFunction(task, "kfac", progress=False).score(mlp(1), train, queries, run=tmp_path)


def test_identity_and_matrix_free_strategies_store_in_a_run(tmp_path):
    model = mlp()
    task, train = data(n=8)
    _, queries = data(n=2, seed=3, prefix="q")
    for name, options in (("identity", {}), ("cg", {"damping": 0.1}), ("arnoldi", {"rank": 5})):
        run = tmp_path / name
        first = InfluenceFunction(task, name, progress=False, **options).score(
            model, train, queries, run=run
        )
        again = InfluenceFunction(task, name, progress=False, **options).score(
            model, train, queries, run=run
        )
        np.testing.assert_allclose(again.values, first.values, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    from datafluence.tasks import CausalLMTask

    model = char_gpt2()
    task = CausalLMTask(CharTokenizer())
    train = task.examples([("ab", "cd"), ("ba", "dc e"), "abc", ("h", "gg"), "fade", ("e", "a")])
    queries = task.examples([("ab", "c"), "bad"], ids=["q0", "q1"])
    return model, task, train, queries


def test_causal_lm_sign_and_exact_fisher(tiny_lm):
    """Through CausalLMTask (prompt masking, padding, sliced logits): a small step on a
    training text moves each query by η × its gradient dot product, and EK-FAC built from the
    exact output Hessian keeps the trace of each explicit GN block."""
    from datafluence.curvature import FitContext, make_curvature
    from datafluence.gradients import ParamSpace

    model, task, train, queries = tiny_lm
    dot = GradientSimilarity(task, "dot", progress=False).score(model, train, queries)
    assert all(name.startswith("transformer.h.0") for name in dot.settings["layers"])
    eta = 2e-4  # central differences; the task measures in float32
    moved = []
    for sign in (1, -1):
        stepped = type(model)(model.config).double().eval()
        stepped.load_state_dict(model.state_dict())
        chosen = [
            p
            for name, p in stepped.named_parameters()
            if name.rsplit(".", 1)[0] in dot.settings["layers"]
        ]
        grads = torch.autograd.grad(task.loss(stepped, train[[1]].tensors).sum(), chosen)
        with torch.no_grad():
            for p, g in zip(chosen, grads, strict=True):
                p -= sign * eta * g  # a step on the attributed layers only
        moved.append(task.measure(stepped, queries.tensors).detach().double())
    change = ((moved[0] - moved[1]) / 2).numpy()
    np.testing.assert_allclose(change, eta * dot.values[1], rtol=2e-2)

    space = ParamSpace.of(model, "transformer.h.0.mlp")
    ctx = FitContext(model, task, train, space, chunk_size=4)
    exact = make_curvature("explicit", blocks="layer")
    exact.fit(ctx)
    ekfac = make_curvature("ekfac", fisher="exact")
    ekfac.fit(ctx)
    lo = 0
    for layer in space.layers:
        block = exact.dense[lo : lo + layer.numel, lo : lo + layer.numel]
        lo += layer.numel
        assert float(ekfac.eigs[layer.name].sum()) == pytest.approx(float(block.trace()), rel=1e-8)
    from datafluence.curvature.fisher import sample_labels

    outputs = task.outputs(model, train.tensors)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_labels(task, outputs, train.tensors, gen)["input_ids"]
    prompt_or_pad = train.tensors["target_mask"] == 0  # sampling only replaces targets
    assert torch.equal(drawn[prompt_or_pad], train.tensors["input_ids"][prompt_or_pad])
    assert not torch.equal(drawn, train.tensors["input_ids"])
    sampled = InfluenceFunction(task, "ekfac", modules="transformer.h.0.mlp", progress=False)
    scores = sampled.score(model, train, queries)
    assert np.isfinite(scores.values).all()
    np.testing.assert_allclose(
        scores.parts["per_layer"].sum(0), scores.values, rtol=1e-5, atol=1e-7
    )


class _BagOfTokens(nn.Module):
    """An embedding and a layer applied per token (many tokens) before a one-token head:
    self-influence then mixes factor-paired layers with solved ones."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))).sum(1))


def test_self_score_mixing_paired_and_solved_layers_is_the_diagonal():
    torch.manual_seed(0)
    model = _BagOfTokens().double().eval()
    task = ClassificationTask()
    train = task.examples(torch.randint(0, 7, (9, 5)), torch.randint(0, 3, (9,)))
    for curvature in ("ekfac", "kfac"):
        method = InfluenceFunction(task, curvature, modules=["emb", "mix", "head"], progress=False)
        diagonal = np.diag(method.score(model, train, train).values)
        np.testing.assert_allclose(
            method.self_score(model, train).values[:, 0], diagonal, rtol=1e-5
        )
