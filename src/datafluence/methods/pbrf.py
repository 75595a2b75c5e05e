"""The proximal Bregman response function (PBRF; Bae et al. 2022, Grosse et al. 2023).

What influence functions really estimate in a trained network is not retraining without an
example but the solution of a proximal problem around the current weights θ_s:

    θ_ε = argmin_θ  (1/N) Σ_k D(h(θ, x_k), h(θ_s, x_k))  +  ε L(h(θ, x_i), y_i)  +  (λ/2)‖θ − θ_s‖²

h = the network's outputs, D the Bregman divergence of the loss in those outputs,
D(z, z_s) = L(z) − L(z_s) − ∇L(z_s)ᵀ(z − z_s) (for softmax cross-entropy: the KL divergence
between the predictions at θ_s and at θ, whatever the labels). Its Hessian at θ_s is exactly
G + λI with G the MEAN per-example Gauss-Newton matrix, so to first order in ε

    θ_ε − θ_s ≈ −ε (G + λI)⁻¹ ∇L_i   and   m_j(θ_ε) − m_j(θ_s) ≈ ε ∇m_jᵀ (G + λI)⁻¹ (−∇L_i).

Scale and sign: the PBRF score is (m_j(θ_ε) − m_j(θ_s)) / ε, the same quantity and scale as
InfluenceFunction's score with damping = λ (positive = adding example i raises query j's
measurement; ε × score = the change, 1/N × score = the change from one more copy of i when
ε = 1/N, the default). A negative ε removes (down-weights) the example; dividing by ε keeps
the sign convention. With `symmetric=True` the score is the central difference
(m_j(θ_{+ε}) − m_j(θ_{−ε})) / 2ε, which cancels the O(ε) term.

It is a ground truth, not an estimate: one full-batch optimisation per training example. The
problem is solved in rescaled coordinates θ = θ_s + ε u (so tolerances do not depend on ε)
by L-BFGS, stopped when ‖∇‖ ≤ rtol × ‖∇ at θ_s‖ or after max_iter objective evaluations.
Its line search is steered by directional derivatives (near the optimum values lose their
precision long before gradients do); values only veto clear increases, which keeps it
honest on ReLU networks, whose PBRF objective has kinks (there the gradient norm stalls
around 1e-3..1e-2 of its start and the solves end on their budget; the warning and
`settings["solver"]` say so). The L-BFGS curvature pairs are carried from one training
example to the next within a chunk of `chunk_size` rows (warm start): the problems share
their Hessian G + λI up to the ε L_i term; each chunk starts afresh, so a resumed or
sharded run gives the same rows as an uninterrupted one. A `preconditioner` (any approximation of (G + λI)⁻¹, e.g. a fitted EK-FAC) becomes
L-BFGS's initial inverse Hessian: with a good one a solve takes a handful of evaluations
instead of hundreds, and the answer stays the PBRF's (the stopping rule reads the true
gradient). Work runs in float64 by default on a copy of the model; only the parameters of
the selected modules move (the same default selection as InfluenceFunction).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from datafluence.curvature.base import FitContext
from datafluence.curvature.damping import check_damping, resolve
from datafluence.curvature.fisher import loss_from_outputs
from datafluence.curvature.operator import CurvatureOperator, mean_eigenvalue
from datafluence.gradients.capture import batch_size_of
from datafluence.gradients.layers import Modules, modules_setting
from datafluence.methods.base import SELF_COLUMN, Method, Run, check_chunk_size
from datafluence.rows import Rows, resolve_rows
from datafluence.scores import Scores
from datafluence.tasks import Examples, Task, eval_mode

Preconditioner = Any  # a fitted Curvature, an object with .solve(blocks), or blocks -> blocks


class PBRF(Method):
    """PBRF scores (m_j(θ_ε) − m_j(θ_s)) / ε for chosen training rows, every query.

    `damping` λ on the mean curvature, as for influence functions (use the damping of the
    influence function it checks), or `damping_factor` (λ = factor x the mean eigenvalue of
    the mean Gauss-Newton matrix of the selected layers, a seeded Hutchinson estimate as
    CG's; default 0.1); the λ used is in `settings["damping_used"]`.
    `epsilon` (None: 1/N, one more copy of the example; negative: removal), `symmetric`
    (central difference in ε, twice the work), `modules` (which layers move; None: the same
    default selection as InfluenceFunction), `dtype` (None keeps the model's), `rtol`
    (gradient-norm tolerance relative to the start), `max_iter` (objective evaluations per
    solve), `history` (L-BFGS pairs), `chunk_size` (training rows per saved partition),
    `forward_chunk` (examples per forward pass).

    `preconditioner`: an approximation of (G + λI)⁻¹ on the model's layer blocks
    {layer: [k, d_out, d_in']}: a fitted curvature (e.g. `InfluenceFunction(task, "ekfac",
    damping=λ).fit(model, train).curvature`), anything with such a `solve`, or a function.
    It is L-BFGS's initial inverse Hessian, so it changes how fast the solves converge, not
    what they converge to (the stopping rule reads the true gradient).
    """

    name = "pbrf"
    task: Task  # never None: the constructor takes one

    def __init__(
        self,
        task: Task,
        *,
        damping: float | None = None,
        damping_factor: float | None = None,
        epsilon: float | None = None,
        modules: Modules = None,
        symmetric: bool = False,
        dtype: torch.dtype | None = torch.float64,
        rtol: float = 1e-6,
        max_iter: int = 500,
        history: int = 20,
        chunk_size: int = 8,
        forward_chunk: int = 1024,
        preconditioner: Preconditioner | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size, progress=progress, seed=seed)
        if isinstance(damping, dict):
            raise TypeError(
                "PBRF damping must be one number (the λ of the proximal term), not per layer"
            )
        self.damping, self.damping_factor = check_damping(damping, damping_factor)  # type: ignore[assignment]
        if epsilon is not None and (not math.isfinite(epsilon) or epsilon == 0):
            raise ValueError(
                f"epsilon must be a non-zero finite number (or None for 1/N), got {epsilon}"
            )
        if not 0 < rtol < 1:
            raise ValueError(f"rtol must lie in (0, 1), got {rtol}")
        for name, value in (
            ("max_iter", max_iter),
            ("history", history),
            ("forward_chunk", forward_chunk),
        ):
            check_chunk_size(value, name)
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.epsilon = None if epsilon is None else float(epsilon)
        self.modules = modules
        self.symmetric = bool(symmetric)
        self.dtype = dtype
        self.rtol = float(rtol)
        self.max_iter = int(max_iter)
        self.history = int(history)
        self.forward_chunk = int(forward_chunk)
        if preconditioner is not None and not (
            callable(preconditioner) or callable(getattr(preconditioner, "solve", None))
        ):
            raise TypeError(
                "preconditioner must be a fitted curvature (with .solve), or a function of "
                f"layer blocks; got {type(preconditioner).__name__}"
            )
        self.preconditioner = preconditioner

    def settings(self) -> dict[str, Any]:
        """What changes the numbers (chunking and progress bars do not)."""
        return {
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "epsilon": self.epsilon,
            "symmetric": self.symmetric,
            "modules": modules_setting(self.modules),
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "rtol": self.rtol,
            "max_iter": self.max_iter,
            "seed": self.seed,
            **self.task.settings(),
        }

    def damping_for(self, model: nn.Module, train: Examples) -> float:
        """λ: the absolute damping, or the factor x the mean eigenvalue of the mean
        Gauss-Newton matrix of the selected layers (Hutchinson, seeded as CG's)."""
        if self.damping is not None:
            return float(self.damping)  # type: ignore[arg-type]
        ctx = FitContext(model, self.task, train, self.space(model), 32, False, self.seed)
        mean = mean_eigenvalue(CurvatureOperator(ctx, "gn"), seed=self.seed)
        return resolve(None, self.damping_factor, "*", mean)

    def score(
        self,
        model: nn.Module | None,
        train: Any,
        queries: Any,
        *,
        rows: Rows = None,
        run: Run = None,
    ) -> Scores:
        """Scores [len(rows), n_query] (rows: positions or ids into `train`; None = all).

        The Bregman term always averages over the whole training set. With `run`, rows are
        saved in partitions as they finish and a re-run computes only the missing ones.
        Solver diagnostics per row (objective evaluations, final relative gradient) are in
        `settings["solver"]`.
        """
        call = self.begin(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None: PBRF moves the model
        train, queries = call.train, call.queries
        index = _resolve_rows(rows, train)
        eps = self.epsilon_for(len(train))
        lam = self.damping_for(model, train)
        table, row_ids = self._rows(model, train, queries, index, eps, lam, call)
        values = np.asarray(table[:, : len(queries)], dtype=np.float64)
        return call.finish(
            values,
            row_ids,
            queries.ids,
            settings=self._diagnostics(table, row_ids, eps, lam, len(train)),
        )

    def self_score(
        self, model: nn.Module | None, train: Any, *, rows: Rows = None, run: Run = None
    ) -> Scores:
        """Each training example's PBRF score on itself (the Bregman term over the whole
        training set, as in `score`): Scores [len(rows), 1]."""
        call = self.begin(model, run, train=train)
        assert model is not None  # begin() refuses None: PBRF moves the model
        train = call.train
        index = _resolve_rows(rows, train)
        eps = self.epsilon_for(len(train))
        lam = self.damping_for(model, train)
        table, row_ids = self._rows(model, train, train, index, eps, lam, call, own=True)
        return call.finish(
            np.asarray(table[:, :1], dtype=np.float64),
            row_ids,
            (SELF_COLUMN,),
            settings=self._diagnostics(table, row_ids, eps, lam, len(train)),
        )

    def _rows(
        self,
        model: nn.Module,
        train: Examples,
        queries: Examples,
        index: np.ndarray,
        eps: float,
        lam: float,
        call: Any,
        own: bool = False,
    ) -> tuple[np.ndarray, tuple[str, ...]]:
        """[scores..., evaluations, relative gradient] per row; `own`: each row's score on
        its own example only."""
        cache: dict[str, _Problem] = {}

        def problem() -> _Problem:
            if "p" not in cache:  # built lazily: a fully resumed run never needs it
                cache["p"] = _Problem(self, model, train, queries, lam)
            return cache["p"]

        width = (1 if own else len(queries)) + 2

        def compute(lo: int, hi: int) -> np.ndarray:
            p = problem()
            # warm starts within a chunk only: every chunk is then the same function of its
            # rows, so a resumed (or sharded) run equals an uninterrupted one exactly
            p.memory.clear()
            out = np.empty((hi - lo, width), dtype=np.float64)
            for r, i in enumerate(index[lo:hi]):
                row = p.row(int(i), eps)
                out[r] = np.concatenate([row[[int(i)]], row[-2:]]) if own else row
            return out

        key = {"epsilon_used": eps, "damping_used": lam, "rows": [int(i) for i in index]}
        if own:
            key["what"] = "self_score"
        table = call.table(len(index), width, compute, key=key, desc="PBRF")
        return table, tuple(train.ids[int(i)] for i in index)

    def _diagnostics(
        self, table: np.ndarray, row_ids: tuple[str, ...], eps: float, lam: float, n: int
    ) -> dict[str, Any]:
        """Settings this call resolved, and the solver's per-row diagnostics (warned about
        when a solve stopped short of rtol)."""
        evals = np.asarray(table[:, -2], dtype=np.float64)
        rel = np.asarray(table[:, -1], dtype=np.float64)
        stuck = [row_ids[k] for k in np.flatnonzero(~(rel <= self.rtol))]
        if stuck:
            shown = ", ".join(stuck[:5]) + (" and others" if len(stuck) > 5 else "")
            warnings.warn(
                f"PBRF did not reach rtol={self.rtol:g} within max_iter={self.max_iter} "
                f"evaluations for {len(stuck)} row(s) ({shown}); worst relative gradient "
                f"{np.nanmax(rel):.2e}. Raise max_iter or the damping, or give a preconditioner "
                "(ReLU networks stall at the kinks of their objective; float32 stalls earlier "
                "than float64)",
                RuntimeWarning,
                stacklevel=3,
            )
        return {
            "epsilon_used": eps,
            "damping_used": lam,
            "n_train_total": n,
            "preconditioner": None
            if self.preconditioner is None
            else getattr(self.preconditioner, "name", type(self.preconditioner).__name__),
            "solver": {
                "evaluations": [int(e) for e in evals],
                "relative_gradient": [float(x) for x in rel],
                "not_converged": stuck,
            },
        }

    def epsilon_for(self, n_train: int) -> float:
        """The ε used for a training set of n_train examples (1/N unless given)."""
        return 1.0 / n_train if self.epsilon is None else self.epsilon

    def response(
        self, model: nn.Module, train: Any, row: int | str, epsilon: float | None = None
    ) -> dict[str, Tensor]:
        """θ_ε for one training example: {parameter name: tensor} of the moved parameters."""
        train = self.begin(model, None, train=train).train
        (i,) = _resolve_rows([row], train)
        eps = self.epsilon_for(len(train)) if epsilon is None else float(epsilon)
        if not math.isfinite(eps) or eps == 0:
            raise ValueError(f"epsilon must be a non-zero finite number, got {eps}")
        p = _Problem(self, model, train, None, self.damping_for(model, train))
        u, _, _ = p.solve(int(i), eps)
        return p.parameters(u, eps)


class _Problem:
    """One model, training set and query set: objectives and solves for every row."""

    def __init__(
        self,
        method: PBRF,
        model: nn.Module,
        train: Examples,
        queries: Examples | None,
        lam: float,
    ) -> None:
        self.method = method
        self.lam = lam
        self.task = method.task
        dtype = method.dtype
        work = copy.deepcopy(model)
        if dtype is not None:
            work = work.to(dtype)
            train = _cast(train, dtype)
            queries = None if queries is None else _cast(queries, dtype)
        work.eval()
        for p in work.parameters():
            p.requires_grad_(False)
        self.model = work
        names = {id(p): n for n, p in work.named_parameters()}
        self.space = method.space(work)
        chosen = self.space.parameters()
        missing = [p for p in chosen if id(p) not in names]
        if missing:
            raise ValueError("a selected parameter is not registered in the model")
        self.names = [names[id(p)] for p in chosen]
        self.base = [p.detach().clone() for p in chosen]
        self.sizes = [p.numel() for p in chosen]
        self.dim = sum(self.sizes)
        self.train = train
        self.queries = queries
        self.n = len(train)
        self.memory: list[tuple[Tensor, Tensor, float]] = []
        self.device = self.base[0].device
        self.work_dtype = self.base[0].dtype
        # the outputs at θ_s, their loss and its gradient (the Bregman anchor), per chunk
        self.anchors = []
        chunk = method.forward_chunk
        with torch.no_grad():
            zero = torch.zeros(self.dim, dtype=self.work_dtype, device=self.device)
            fmodel = self._fmodel(zero, 1.0)
        for lo in range(0, self.n, chunk):
            batch = {k: v[lo : lo + chunk] for k, v in train.tensors.items()}
            with torch.no_grad():
                z = self.task.outputs(fmodel, batch).detach()
            zg = z.clone().requires_grad_(True)
            with torch.enable_grad():
                losses = loss_from_outputs(self.task, zg, batch)
                (grad,) = torch.autograd.grad(losses.sum(), zg)
            self.anchors.append((lo, batch, z, losses.detach(), grad.detach()))
        self.base_measure = None if queries is None else self.measure(zero, 1.0)

    # -- model at θ_s + ε u --

    def parameters(self, u: Tensor, eps: float) -> dict[str, Tensor]:
        parts = torch.split(u, self.sizes)
        return {
            name: base + eps * part.reshape(base.shape)
            for name, base, part in zip(self.names, self.base, parts, strict=True)
        }

    def _fmodel(self, u: Tensor, eps: float) -> Callable[..., Tensor]:
        params = self.parameters(u, eps)
        return lambda *args, **kwargs: functional_call(self.model, params, args, kwargs)

    def objective(self, u: Tensor, i: int, eps: float) -> tuple[float, Tensor]:
        """F(u) = [mean_k D_k + ε (L_i − L_i(θ_s))] / ε² + λ/2 ‖u‖² and its gradient."""
        u = u.detach().requires_grad_(True)
        with torch.enable_grad(), eval_mode(self.model):
            fmodel = self._fmodel(u, eps)
            total = u.new_zeros(())
            for lo, batch, z_s, loss_s, grad_s in self.anchors:
                z = self.task.outputs(fmodel, batch)
                losses = loss_from_outputs(self.task, z, batch)
                b = batch_size_of(batch)
                linear = (grad_s * (z - z_s)).reshape(b, -1).sum(1)
                value = (losses - loss_s - linear).sum() / (self.n * eps * eps)
                if lo <= i < lo + b:
                    value = value + (losses[i - lo] - loss_s[i - lo]) / eps
                total = total + value
            total = total + 0.5 * self.lam * (u * u).sum()
            (grad,) = torch.autograd.grad(total, u)
        return float(total.detach()), grad.detach()

    @torch.no_grad()
    def measure(self, u: Tensor, eps: float) -> Tensor:
        assert self.queries is not None
        fmodel = self._fmodel(u, eps)
        chunk = self.method.forward_chunk
        with eval_mode(self.model):
            return torch.cat(
                [
                    self.task.measure(
                        fmodel, {k: v[lo : lo + chunk] for k, v in self.queries.tensors.items()}
                    ).double()
                    for lo in range(0, len(self.queries), chunk)
                ]
            )

    # -- solving --

    def precondition(self, v: Tensor) -> Tensor:
        """The preconditioner applied to a flat vector in parameter order."""
        pre = self.method.preconditioner
        assert pre is not None  # `solve` passes this method only when there is one
        solve = pre.solve if callable(getattr(pre, "solve", None)) else pre
        parts = [
            p.reshape(b.shape) for p, b in zip(torch.split(v, self.sizes), self.base, strict=True)
        ]
        blocks = self.space.unflatten(self.space.from_param_grads(parts)[None])
        out = solve(blocks)
        missing = set(blocks) - set(out)
        if missing:
            raise ValueError(f"the preconditioner returned no block for layers {sorted(missing)}")
        flat = self.space.flatten({n: out[n].to(v.dtype) for n in blocks})[0]
        return torch.cat([t.reshape(-1) for t in self.space.to_param_tensors(flat)]).to(v.dtype)

    def solve(self, i: int, eps: float) -> tuple[Tensor, int, float]:
        """(u, objective evaluations, final ‖∇F‖ / ‖∇F(0)‖) for row i and this ε."""
        u = torch.zeros(self.dim, dtype=self.work_dtype, device=self.device)
        return _lbfgs(
            lambda x: self.objective(x, i, eps),
            u,
            self.memory,
            self.method.history,
            self.method.rtol,
            self.method.max_iter,
            None if self.method.preconditioner is None else self.precondition,
            self.value_noise(i, eps),
        )

    def value_noise(self, i: int, eps: float) -> float:
        """Rounding error of F's value: its terms are differences of losses scaled by 1/ε²."""
        total = sum(float(loss_s.abs().sum()) for _, _, _, loss_s, _ in self.anchors)
        own = next(
            float(ls[i - lo].abs()) for lo, _, _, ls, _ in self.anchors if lo <= i < lo + len(ls)
        )
        scale = total / (self.n * eps * eps) + own / abs(eps)
        return 64 * torch.finfo(self.work_dtype).eps * scale

    def row(self, i: int, eps: float) -> np.ndarray:
        """[scores for every query..., evaluations, relative gradient] for training row i."""
        assert self.base_measure is not None
        u, evals, rel = self.solve(i, eps)
        after = self.measure(u, eps)
        if self.method.symmetric:
            u2, evals2, rel2 = self.solve(i, -eps)
            before = self.measure(u2, -eps)
            values = (after - before) / (2 * eps)
            evals, rel = evals + evals2, max(rel, rel2)
        else:
            values = (after - self.base_measure) / eps
        if not torch.isfinite(values).all():
            raise FloatingPointError(
                f"the PBRF response of training example {self.train.ids[i]!r} gave non-finite "
                "measurements; raise the damping or lower epsilon"
            )
        return np.concatenate([values.cpu().numpy(), [float(evals), rel]])


def _lbfgs(
    fg: Callable[[Tensor], tuple[float, Tensor]],
    x: Tensor,
    memory: list[tuple[Tensor, Tensor, float]],
    history: int,
    rtol: float,
    max_iter: int,
    precondition: Callable[[Tensor], Tensor] | None = None,
    noise: float = 0.0,
) -> tuple[Tensor, int, float]:
    """Minimise with L-BFGS from x, reusing (and updating) the curvature pairs in `memory`.

    Stops when ‖∇‖ ≤ rtol × ‖∇(x₀)‖ or after max_iter evaluations of fg. `precondition`
    (an approximate inverse Hessian) replaces the scaled identity as the initial matrix;
    `noise` is the rounding error of fg's values (see `_line_search`).
    """
    f, g = fg(x)
    evals = 1
    g0 = float(g.norm())
    if g0 == 0.0 or not math.isfinite(g0):
        if not math.isfinite(g0):
            raise FloatingPointError("the PBRF objective has a non-finite gradient at θ_s")
        return x, evals, 0.0
    target = rtol * g0
    gnorm = g0
    while gnorm > target and evals < max_iter:
        d = -_two_loop(g, memory, precondition)
        slope = float(g @ d)
        if not slope < 0:  # not a descent direction: forget the curvature pairs
            memory.clear()
            d, slope = -g, -float(g @ g)
        t, x_new, f, g_new, used = _line_search(fg, x, f, g, d, slope, max_iter - evals, noise)
        evals += used
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12 * float(s.norm()) * float(y.norm()) and sy > 0:
            memory.append((s, y, 1.0 / sy))
            del memory[:-history]
        x, g = x_new, g_new
        gnorm = float(g.norm())
        if not math.isfinite(gnorm):
            raise FloatingPointError(
                "the PBRF optimisation diverged (non-finite gradient); raise the damping or "
                "lower epsilon"
            )
        if t == 0.0:  # no progress: forget the pairs once, then give up
            if not memory:
                break
            memory.clear()
    return x, evals, gnorm / g0


def _two_loop(
    g: Tensor,
    memory: list[tuple[Tensor, Tensor, float]],
    precondition: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """H g with the L-BFGS inverse-Hessian approximation of the stored pairs (initial
    matrix: the preconditioner, else the usual scaled identity)."""
    q = g.clone()
    alphas = []
    for s, y, rho in reversed(memory):
        a = rho * float(s @ q)
        alphas.append(a)
        q -= a * y
    if precondition is not None:
        q = precondition(q)
    elif memory:
        s, y, _ = memory[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y, rho), a in zip(memory, reversed(alphas), strict=True):
        b = rho * float(y @ q)
        q += (a - b) * s
    return q


def _line_search(
    fg: Callable[[Tensor], tuple[float, Tensor]],
    x: Tensor,
    f0: float,
    g0: Tensor,
    d: Tensor,
    slope: float,
    budget: int,
    noise: float = 0.0,
    c2: float = 0.9,
    max_steps: int = 30,
) -> tuple[float, Tensor, float, Tensor, int]:
    """A step t along d with |φ'(t)| ≤ c2 |φ'(0)| and φ(t) ≤ φ(0) + slack.

    Steered by directional derivatives: φ'(t) < 0, the minimum lies further (secant
    extrapolation through the last two such points); φ'(t) > 0 or a value above φ(0), it
    was passed (safeguarded regula falsi between the two sides). Near the optimum values
    lose precision long before gradients do, so a value only vetoes a step when it rises by
    more than √(machine ε) (1 + |φ(0)|) and more than `noise` (the rounding error of the
    value): that catches overshoots across the kinks of ReLU networks without stalling
    smooth problems.
    Returns (t, x + t d, φ(t), gradient there, evaluations); t = 0 when nothing helped.
    """
    slack = max(math.sqrt(torch.finfo(x.dtype).eps) * (1.0 + abs(f0)), noise)
    prev, dprev = 0.0, slope
    lo, dlo, flo, glo = 0.0, slope, f0, g0
    hi, dhi = math.inf, math.nan
    t = 1.0
    steps = min(max_steps, max(budget, 1))
    for used in range(1, steps + 1):
        f, g = fg(x + t * d)
        dt = float(g @ d)
        if not (math.isfinite(dt) and math.isfinite(f)) or f > f0 + slack:
            hi, dhi = t, math.nan
        elif abs(dt) <= c2 * abs(slope):
            return t, x + t * d, f, g, used
        elif dt > 0:
            hi, dhi = t, dt
        else:
            prev, dprev = lo, dlo
            lo, dlo, flo, glo = t, dt, f, g
        if math.isinf(hi):  # still descending: extrapolate
            grow = 4.0
            if dlo > dprev:
                zero = lo - dlo * (lo - prev) / (dlo - dprev)
                grow = min(max(zero / lo, 2.0), 100.0)
            t = lo * grow
        elif math.isnan(dhi):  # a bad value: back towards the last good point
            t = lo + 0.25 * (hi - lo)
        else:
            guess = lo - dlo * (hi - lo) / (dhi - dlo)
            t = min(max(guess, lo + 0.1 * (hi - lo)), hi - 0.1 * (hi - lo))
    return lo, x + lo * d, flo, glo, steps


def _resolve_rows(rows: Rows, train: Examples) -> np.ndarray:
    return np.asarray(resolve_rows(rows, train), dtype=np.int64)


def _cast(examples: Examples, dtype: torch.dtype) -> Examples:
    """Floating tensors to the working dtype (labels and token ids unchanged)."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in examples.tensors.items()}
    return Examples(tensors, examples.ids, examples.items)
