"""Curvature strategies against the explicit solution, and the explicit matrices against
hand-built ones (J^T H J with the softmax Hessian; torch.func's Hessian)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from datafluence.curvature import (
    Explicit,
    FactorMismatchError,
    FitContext,
    make_curvature,
)
from datafluence.gradients import ParamSpace
from datafluence.methods.influence import InfluenceFunction
from datafluence.store import RunMismatchError
from datafluence.tasks import ClassificationTask, Examples

# torch.func.hessian loads torch's forward-AD decompositions, which still call torch.jit.script.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(seed: int = 0, hidden: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


def data(n: int = 24, seed: int = 0, d: int = 3):
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return task, task.examples(x, torch.randint(0, 3, (n,), generator=gen))


def fitted(name: str, model, task, train, modules=None, **options):
    curvature = make_curvature(name, **options)
    space = ParamSpace.of(model, modules)
    curvature.fit(FitContext(model, task, train, space, chunk_size=10))
    return curvature


def flat_params(model, space):
    return space.from_param_grads([p.detach() for p in space.parameters()])


def functional_outputs(model, space, x):
    """Model outputs as a function of the flat parameter vector (matrix form)."""
    names = [n for n, _ in model.named_parameters()]

    def fn(flat):
        params = dict(zip(names, space.to_param_tensors(flat), strict=True))
        return functional_call(model, params, (x,))

    return fn


def test_explicit_gn_equals_hand_built_jt_h_j():
    model = mlp()
    task, train = data()
    space = ParamSpace.of(model)
    x = train.tensors["x"]
    theta = flat_params(model, space)
    jac = jacrev(functional_outputs(model, space, x))(theta)  # [N, C, P]
    p = torch.softmax(functional_outputs(model, space, x)(theta), dim=-1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    want = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(train)
    got = fitted("explicit", model, task, train).dense
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_explicit_hessian_equals_torch_func_hessian():
    model = mlp()
    task, train = data()
    space = ParamSpace.of(model)
    theta = flat_params(model, space)
    out = functional_outputs(model, space, train.tensors["x"])

    def mean_loss(flat):
        return nn.functional.cross_entropy(out(flat), train.tensors["y"])

    want = hessian(mean_loss)(theta)
    got = fitted("explicit", model, task, train, matrix="hessian").dense
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def random_blocks(space, k: int = 4, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return space.unflatten(torch.randn(k, space.dim, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "options", "tol"),
    [
        ("cg", {"tol": 1e-10}, 1e-7),
        ("lissa", {"depth": 3000}, 1e-6),
        ("arnoldi", {"rank": 38, "iterations": 38}, 1e-7),  # full rank: P = 20 + 18
    ],
)
def test_matrix_free_strategies_agree_with_explicit(name, options, tol):
    model = mlp()
    task, train = data()
    exact = fitted("explicit", model, task, train, damping=0.05)
    other = fitted(name, model, task, train, damping=0.05, **options)
    v = random_blocks(exact.space)
    want = exact.space.flatten(exact.solve(v))
    got = exact.space.flatten(other.solve(v))
    assert float((got - want).norm() / want.norm()) < tol


def test_cg_on_the_hessian_and_truncated_arnoldi():
    model = mlp()
    task, train = data()
    v = random_blocks(ParamSpace.of(model))
    exact = fitted("explicit", model, task, train, damping=0.5, matrix="hessian")
    cg = fitted("cg", model, task, train, damping=0.5, matrix="hessian", tol=1e-10)
    space = exact.space
    want = space.flatten(exact.solve(v))
    assert float((space.flatten(cg.solve(v)) - want).norm() / want.norm()) < 1e-7
    # Fewer eigenpairs: still a sensible, rougher approximation of the GN solve.
    gn = space.flatten(fitted("explicit", model, task, train, damping=0.05).solve(v))
    top = fitted("arnoldi", model, task, train, damping=0.05, rank=10, iterations=30)
    assert float((space.flatten(top.solve(v)) - gn).norm() / gn.norm()) < 0.9


def test_kfac_and_ekfac_are_exact_for_one_linear_layer_and_one_input():
    """A ⊗ S is the exact GN when every example shares the input (T = 1, exact class
    expectation), so both must match the explicit damped GN."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    task = ClassificationTask()
    x = torch.randn(1, 3, dtype=torch.float64).repeat(6, 1)
    train = task.examples(x, torch.tensor([0, 1, 2, 3, 0, 1]))
    exact = fitted("explicit", model, task, train, damping=0.01)
    v = random_blocks(exact.space)
    want = exact.space.flatten(exact.solve(v))
    for name in ("kfac", "ekfac"):
        approx = fitted(name, model, task, train, damping=0.01, fisher="exact")
        torch.testing.assert_close(approx.block(""), exact.dense, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            exact.space.flatten(approx.solve(v)), want, rtol=1e-8, atol=1e-10
        )


def test_ekfac_beats_kfac_on_a_two_layer_mlp():
    model = mlp(seed=2)
    task, train = data(n=40, seed=2)
    blocks = fitted("explicit", model, task, train, damping=0.05, blocks="layer")
    kfac = fitted("kfac", model, task, train, damping=0.05, fisher="exact")
    ekfac = fitted("ekfac", model, task, train, damping=0.05, fisher="exact")
    lo = 0
    for layer in blocks.space.layers:
        ref = blocks.dense[lo : lo + layer.numel, lo : lo + layer.numel]
        lo += layer.numel
        err_k = (kfac.block(layer.name) - ref).norm() / ref.norm()
        err_e = (ekfac.block(layer.name) - ref).norm() / ref.norm()
        assert err_e <= err_k + 1e-12
    v = random_blocks(blocks.space)
    want = blocks.space.flatten(blocks.solve(v))

    def rel(c):
        return float((blocks.space.flatten(c.solve(v)) - want).norm() / want.norm())

    assert rel(ekfac) < rel(kfac)


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue():
    model = mlp()
    task, train = data()
    ekfac = fitted("ekfac", model, task, train, fisher="exact")
    for name, eig in ekfac.eigs.items():
        assert ekfac.lambdas[name] == pytest.approx(0.1 * float(eig.mean()))
    exact = fitted("explicit", model, task, train)
    p = exact.dense.shape[0]
    assert exact.lambdas["*"] == pytest.approx(0.1 * float(exact.dense.trace()) / p)
    # EK-FAC's eigenvalues keep the exact trace of each GN block, so both defaults agree.
    blocks = fitted("explicit", model, task, train, blocks="layer")
    for name in ekfac.lambdas:
        assert ekfac.lambdas[name] == pytest.approx(blocks.lambdas[name], rel=1e-9)


def test_sampled_and_empirical_fisher_run_and_differ():
    model = mlp()
    task, train = data(n=60)
    exact = fitted("kfac", model, task, train, fisher="exact").s_vals["2"]
    sampled = fitted("kfac", model, task, train, fisher="sample").s_vals["2"]
    again = fitted("kfac", model, task, train, fisher="sample").s_vals["2"]
    empirical = fitted("kfac", model, task, train, fisher="empirical").s_vals["2"]
    torch.testing.assert_close(sampled, again)  # seeded
    assert float((sampled - exact).norm() / exact.norm()) < 0.5
    assert not torch.allclose(empirical, exact)
    diag = fitted("diagonal", model, task, train, fisher="exact")
    gn = fitted("explicit", model, task, train)
    torch.testing.assert_close(
        gn.space.flatten({k: v[None] for k, v in diag.diag.items()})[0], gn.dense.diagonal()
    )


def test_bad_damping_and_options_are_clear_errors():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be a finite number > 0"):
            make_curvature("kfac", damping=bad)
        with pytest.raises(ValueError, match="damping_factor must be a finite number > 0"):
            make_curvature("kfac", damping_factor=bad)
    with pytest.raises(ValueError, match="not both"):
        make_curvature("ekfac", damping=0.1, damping_factor=0.1)
    with pytest.raises(ValueError, match="takes no damping"):
        make_curvature("identity", damping=0.1)
    with pytest.raises(ValueError, match="unknown curvature"):
        make_curvature("newton")
    with pytest.raises(ValueError, match="one damping number"):
        make_curvature("cg", damping={"0": 0.1})
    with pytest.raises(ValueError, match="unknown fisher"):
        make_curvature("ekfac", fisher="true")
    model = mlp()
    task, train = data()
    with pytest.raises(ValueError, match="not for '2'"):
        fitted("kfac", model, task, train, damping={"0": 0.1})


def test_nan_in_factors_is_a_clear_error():
    """Huge inputs overflow the input factor while the loss stays finite (tanh saturates)."""
    model = mlp()
    task, train = data()
    huge = Examples({"x": train.tensors["x"] * 1e200, "y": train.tensors["y"]}, train.ids)
    with pytest.raises(FloatingPointError, match="NaN/Inf.*check the model"):
        fitted("kfac", model, task, huge)


def test_factors_round_trip_reuse_and_mismatch(tmp_path, monkeypatch):
    model = mlp()
    task, train = data()
    queries = task.examples(train.tensors["x"][:3], train.tensors["y"][:3], ["a", "b", "c"])
    first = InfluenceFunction(task, "ekfac", fisher="exact", progress=False)
    first.fit(model, train, run=tmp_path)
    assert (tmp_path / "curvature" / "curvature.safetensors").exists()
    want = first.score(model, train, queries).values

    def no_refit(self, ctx):
        raise AssertionError("saved factors must be reused, not refitted")

    monkeypatch.setattr(type(first.curvature), "_fit", no_refit)
    second = InfluenceFunction(task, "ekfac", fisher="exact", progress=False)
    second.fit(model, train, run=tmp_path)
    torch.testing.assert_close(
        torch.as_tensor(second.score(model, train, queries).values), torch.as_tensor(want)
    )
    with pytest.raises(FactorMismatchError, match="another model.*overwrite=True"):
        InfluenceFunction(task, "ekfac", fisher="exact", progress=False).fit(
            mlp(seed=9), train, run=tmp_path
        )
    with pytest.raises(RunMismatchError, match="other settings"):
        InfluenceFunction(task, "ekfac", fisher="sample", progress=False).fit(
            model, train, run=tmp_path
        )
    monkeypatch.undo()
    InfluenceFunction(task, "ekfac", fisher="sample", progress=False).fit(
        model, train, run=tmp_path, overwrite=True
    )


def test_every_strategy_is_registered_and_solves():
    model = mlp()
    task, train = data(n=12)
    v = random_blocks(ParamSpace.of(model), k=2)
    for name in ("identity", "diagonal", "explicit", "cg", "lissa", "arnoldi", "kfac", "ekfac"):
        options = {} if name == "identity" else {"damping": 0.1}
        if name == "lissa":
            options["depth"] = 50
        c = fitted(name, model, task, train, **options)
        out = c.solve(v)
        assert all(torch.isfinite(t).all() for t in out.values())
    assert Explicit(blocks="layer").block_diagonal and not Explicit().block_diagonal


class TokenNet(nn.Module):
    """Embedding (padding_idx) -> Linear applied twice per token -> token-sum -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.emb(x)))))
        return self.head(h.sum(dim=1))


def test_ekfac_keeps_the_exact_trace_of_each_block_with_tokens_and_embeddings():
    """Σ of EK-FAC eigenvalues = mean_i ||G_i||² over exact-expectation passes = tr(G_l),
    whatever the architecture: checks the embedding, token and repeated-call paths."""
    torch.manual_seed(0)
    model = TokenNet().double()
    task = ClassificationTask()
    x = torch.randint(0, 6, (10, 4))
    train = task.examples(x, torch.randint(0, 3, (10,)))
    every = ["emb", "mix", "head"]
    exact = fitted("explicit", model, task, train, every, blocks="layer")
    ekfac = fitted("ekfac", model, task, train, every, fisher="exact")
    kfac = fitted("kfac", model, task, train, every, fisher="exact")
    lo = 0
    for layer in exact.space.layers:
        block = exact.dense[lo : lo + layer.numel, lo : lo + layer.numel]
        lo += layer.numel
        assert float(ekfac.eigs[layer.name].sum()) == pytest.approx(float(block.trace()), rel=1e-9)
        assert ekfac.block(layer.name).shape == block.shape
        assert torch.isfinite(kfac.block(layer.name)).all()
    assert ekfac.a_vecs["emb"] is None  # one-hot inputs: a diagonal input factor
    v = random_blocks(exact.space, k=2)
    assert all(torch.isfinite(t).all() for t in ekfac.solve(v).values())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("factors_first", [True, False])
def test_ekfac_correction_routes_agree_on_a_convolution(monkeypatch, factors_first):
    """The eigenvalue correction rotates either each token's factors or each example's
    gradient matrix (cheaper for convolutions); both must give the same eigenvalues, whose
    sum is the exact trace of the Gauss-Newton block."""
    from datafluence.curvature import kfac

    torch.manual_seed(0)
    model = ConvNet().double()
    task = ClassificationTask()
    train = task.examples(torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    reference = fitted("ekfac", model, task, train, fisher="exact")
    space = reference.space
    assert kfac._rotate_factors_first(space.by_name["head"], 1)  # one token: factors
    assert not kfac._rotate_factors_first(space.by_name["conv"], 16 * 16)  # many positions
    monkeypatch.setattr(kfac, "_rotate_factors_first", lambda layer, tokens: factors_first)
    forced = fitted("ekfac", model, task, train, fisher="exact")
    exact = fitted("explicit", model, task, train, blocks="layer")
    lo = 0
    for layer in exact.space.layers:
        block = exact.dense[lo : lo + layer.numel, lo : lo + layer.numel]
        lo += layer.numel
        torch.testing.assert_close(forced.eigs[layer.name], reference.eigs[layer.name])
        assert float(forced.eigs[layer.name].sum()) == pytest.approx(float(block.trace()), rel=1e-9)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "diagonal", "explicit", "cg"])
def test_damping_factor_scales_the_mean_eigenvalue_and_absolute_damping_is_used_as_is(name):
    """One meaning everywhere: damping_factor f gives λ = f x mean eigenvalue (the default
    is f = 0.1), damping=λ uses λ itself."""
    model = mlp()
    task, train = data()
    default = fitted(name, model, task, train).lambdas
    tripled = fitted(name, model, task, train, damping_factor=0.3).lambdas
    assert default and set(default) == set(tripled)
    for block, lam in default.items():
        assert lam > 0
        assert tripled[block] == pytest.approx(3 * lam, rel=1e-12)
    absolute = fitted(name, model, task, train, damping=0.0125).lambdas
    assert set(absolute.values()) == {0.0125}


class DeadBranch(nn.Module):
    """A layer whose output is multiplied by zero: its gradients vanish, its inputs do not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.live = nn.Linear(3, 3).double()
        self.dead = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.live(x) + 0.0 * self.dead(x)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "diagonal"])
def test_a_layer_with_zero_gradients_warns_and_never_stops_the_fit(name):
    model = DeadBranch()
    task, train = data()
    with pytest.warns(UserWarning, match="'dead' has zero curvature"):
        curvature = fitted(name, model, task, train)
    assert curvature.lambdas["dead"] == 1.0 and curvature.lambdas["live"] > 0
    alone = fitted(name, model, task, train, modules=["live"])
    assert alone.lambdas["live"] == pytest.approx(curvature.lambdas["live"])
