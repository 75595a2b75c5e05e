"""Influence-function validation against the PBRF on small networks (issue 5; the seed's
validation, after Grosse et al. 2023, §5.1).

Two models, each trained on 500 examples and probed with 10 queries:

* mnist-mlp: 784-256-256-10 ReLU MLP on the bundled MNIST digits (50 per class for
  training, one held-out digit per class as queries), cross-entropy, measurement log p(y|x).
* regression-mlp: 8-128-128-1 tanh MLP on a synthetic Friedman #1 regression table
  (y = 10 sin(π x₁x₂) + 20 (x₃ − ½)² + 10 x₄ + 5 x₅ + N(0, 1), x ~ U[0, 1]⁸, standardised),
  half squared error, measurement −loss (tasks.RegressionTask).

For each model the PBRF (methods.pbrf, ε = 1/N, damping λ) is the ground truth for a seeded
random subset of training rows; every influence estimate uses the same λ and is scored for
all 500 rows. The table reports the Pearson correlation with the PBRF per query, averaged over
the queries (metrics.attribution.pbrf_agreement), and each method's seconds.

"explicit" is the exact damped Gauss-Newton influence. The dense strategy
(curvature="explicit") needs a P x P matrix (P = 270k / 18k here), so it is computed in its
kernel form instead: G = JᵀJ / N with J the per-example output-Hessian-root gradients, and
(G + λI)⁻¹ = (I − Jᵀ (NλI + JJᵀ)⁻¹ J) / λ (Woodbury), with JJᵀ built from the layers'
activation / output-gradient factors. The script checks it against curvature="explicit" on a
small MLP before it starts.

λ = `--damping-factors` (default 1e-3) x the largest eigenvalue of G (from the same kernel);
several factors give one comparison each (the ranking of the approximations depends on it).

Run: `.venv/bin/python benchmarks/influence_validation.py` (default: one damping, ~6 min on
2 shared cores; `--damping-factors 1e-3,1e-1` ~10 min; `--quick` a 1-minute smoke run).
Results: benchmarks/results/influence_validation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datafluence.curvature import CG, EKFAC, KFAC, LiSSA
from datafluence.curvature.fisher import fisher_passes
from datafluence.datasets import load_mnist_subset
from datafluence.gradients.capture import gradient_factors
from datafluence.gradients.space import ParamSpace
from datafluence.groundtruth import Trainer
from datafluence.methods import GradientSimilarity, InfluenceFunction
from datafluence.methods.pbrf import PBRF
from datafluence.metrics.attribution import pbrf_agreement
from datafluence.runtime import tune_allocator
from datafluence.scores import Scores
from datafluence.store import atomic_write_json
from datafluence.tasks import ClassificationTask, Examples, RegressionTask, Task

METHODS = ("ekfac", "kfac", "lissa", "cg", "explicit", "grad-dot")


# --------------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------------


def mnist_setup(n_train: int, n_queries: int) -> tuple[Task, Examples, Examples, Callable]:
    digits = load_mnist_subset()
    per_class = n_train // 10
    x = (digits.images.reshape(len(digits), -1) - 0.1307) / 0.3081
    y = digits.labels
    train_idx, query_idx = [], []
    for c in range(10):
        positions = (y == c).nonzero().flatten().tolist()
        train_idx += positions[:per_class]
        query_idx += positions[per_class : per_class + 1]
    query_idx = query_idx[:n_queries]
    task = ClassificationTask(num_classes=10)
    train = task.examples(x[train_idx], y[train_idx], [digits.ids[i] for i in train_idx])
    queries = task.examples(x[query_idx], y[query_idx], [digits.ids[i] for i in query_idx])

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    return task, train, queries, make


def friedman1(n: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64)
    y = (
        10 * torch.sin(math.pi * x[:, 0] * x[:, 1])
        + 20 * (x[:, 2] - 0.5) ** 2
        + 10 * x[:, 3]
        + 5 * x[:, 4]
        + torch.randn(n, generator=gen, dtype=torch.float64)
    )
    return x, y


def regression_setup(n_train: int, n_queries: int) -> tuple[Task, Examples, Examples, Callable]:
    d = 8
    x, y = friedman1(n_train + n_queries, d, seed=0)
    x = ((x - 0.5) / math.sqrt(1 / 12)).float()  # unit variance inputs
    mean, std = y[:n_train].mean(), y[:n_train].std()
    y = ((y - mean) / std).float()
    task = RegressionTask()
    train = task.examples(x[:n_train], y[:n_train], [f"fr-train-{i:04d}" for i in range(n_train)])
    queries = task.examples(
        x[n_train:], y[n_train:], [f"fr-query-{i:02d}" for i in range(n_queries)]
    )

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(d, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1)
        )

    return task, train, queries, make


TRAINERS = {
    "mnist-mlp": lambda task: Trainer(task, "adam", epochs=30, lr=1e-3, batch_size=64, l2=1e-3),
    "regression-mlp": lambda task: Trainer(
        task, "adam", epochs=300, lr=3e-3, batch_size=64, l2=1e-3
    ),
}
SETUPS = {"mnist-mlp": mnist_setup, "regression-mlp": regression_setup}
# tanh is smooth: the PBRF solves converge tightly. ReLU is not: across the kinks that ε
# moves over, L-BFGS stalls at relative gradients ~1e-3..1e-2, so the MNIST solves stop on
# their budget (answers move by ~1% per entry between 25 and 100 evaluations; per-query
# Pearson between the two ≥ 0.9999 in our check).
PBRF_SETTINGS = {
    "regression-mlp": {"rows": 500, "rtol": 1e-6, "max_iter": 200},
    "mnist-mlp": {"rows": 60, "rtol": 1e-4, "max_iter": 25},
}


# --------------------------------------------------------------------------------------------
# exact damped Gauss-Newton influence in kernel (Woodbury) form
# --------------------------------------------------------------------------------------------


class KernelGN:
    """G = JᵀJ / N from per-(example, output-Hessian root) gradients, kept as layer factors.

    For single-token Linear layers a per-example gradient is g aᵀ, so inner products of
    gradients are Σ_layers (g·g')(a·a'): JJᵀ and every J v are built without P-sized vectors.
    """

    def __init__(self, model: nn.Module, task: Task, train: Examples, chunk: int = 100):
        self.model, self.task = model, task
        self.space = ParamSpace.of(model)
        self.n = len(train)
        a_parts: dict[str, list[Tensor]] = {n: [] for n in self.space.names}
        g_parts: dict[str, list[Tensor]] = {n: [] for n in self.space.names}
        gen = torch.Generator().manual_seed(0)
        for lo in range(0, self.n, chunk):
            batch = {k: v[lo : lo + chunk] for k, v in train.tensors.items()}
            for factors in fisher_passes(model, task, batch, self.space, "exact", gen):
                for name, (a, g) in factors.items():
                    if a.shape[1] != 1:
                        raise ValueError("KernelGN handles single-token layers only")
                    a_parts[name].append(a[:, 0].double())
                    g_parts[name].append(g[:, 0].double())
        # rows = (pass, example) pairs; a is repeated for every pass of its batch
        self.a = {n: torch.cat(v) for n, v in a_parts.items()}
        self.g = {n: torch.cat(v) for n, v in g_parts.items()}
        self.kernel = self.dots(self.a, self.g, self.a, self.g)  # JJᵀ [R, R]

    @staticmethod
    def dots(a1, g1, a2, g2) -> Tensor:
        """[rows1, rows2] inner products of the gradients g aᵀ on both sides."""
        return sum((g1[n] @ g2[n].T) * (a1[n] @ a2[n].T) for n in a1)

    def largest_eigenvalue(self) -> float:
        """λ_max(G) = λ_max(JJᵀ) / N (Lanczos)."""
        from scipy.sparse.linalg import eigsh

        top = eigsh(self.kernel.numpy(), k=1, which="LA", return_eigenvectors=False)
        return float(top[0]) / self.n

    def trace(self) -> float:
        return float(self.kernel.diagonal().sum()) / self.n

    def factors(self, examples: Examples, which: str) -> tuple[dict, dict]:
        out = gradient_factors(self.model, self.task, dict(examples.tensors), self.space, which)
        return (
            {n: a[:, 0].double() for n, (a, _) in out.items()},
            {n: g[:, 0].double() for n, (_, g) in out.items()},
        )

    def solve_with(
        self, damping: float, keep: float = 0.01, dtype: torch.dtype = torch.float32
    ) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        """v -> ≈ (G + λI)⁻¹ v on layer blocks {layer: [k, d_out, d_in']}: a PBRF preconditioner.

        Exact (Woodbury) for G restricted to the rows of J whose own curvature ‖J_r‖² / N
        exceeds `keep` × λ (the rest hold a tiny share of the trace), in `dtype`: cheap, and
        the PBRF's answer does not depend on it (only its speed does).
        """
        rows = (self.kernel.diagonal() / self.n > keep * damping).nonzero().flatten()
        sub = self.kernel[rows][:, rows]
        inner = sub + self.n * damping * torch.eye(len(rows), dtype=torch.float64)
        chol = torch.linalg.cholesky(inner)
        a = {n: v[rows].to(dtype) for n, v in self.a.items()}
        g = {n: v[rows].to(dtype) for n, v in self.g.items()}

        def solve(blocks: dict[str, Tensor]) -> dict[str, Tensor]:
            v = {n: b.to(dtype) for n, b in blocks.items()}
            # [R, k]: row r of J (the gradient g_r a_rᵀ) applied to every vector
            jv = sum(((a[n] @ v[n].transpose(1, 2)) * g[n][None]).sum(-1).T for n in v)
            c = torch.cholesky_solve(jv.double(), chol).to(dtype)  # [R, k]
            out = {}
            for n in v:
                back = torch.einsum("rk,ro,ri->koi", c, g[n], a[n])
                out[n] = ((v[n] - back) / damping).to(blocks[n].dtype)
            return out

        solve.rows = len(rows)  # type: ignore[attr-defined]
        return solve

    def scores(self, train: Examples, queries: Examples, damping: float) -> np.ndarray:
        """score(i, j) = (−∇L_i)ᵀ (G + λI)⁻¹ ∇m_j, exactly (float64)."""
        at, gt = self.factors(train, "loss")
        aq, gq = self.factors(queries, "measure")
        direct = self.dots(at, gt, aq, gq)  # ∇L_iᵀ ∇m_j
        jt = self.dots(self.a, self.g, at, gt)  # J ∇L_i   [R, n_train]
        jq = self.dots(self.a, self.g, aq, gq)  # J ∇m_j   [R, n_query]
        inner = self.kernel + self.n * damping * torch.eye(len(self.kernel), dtype=torch.float64)
        chol = torch.linalg.cholesky(inner)
        solved = torch.cholesky_solve(jq, chol)
        return (-(direct - jt.T @ solved) / damping).numpy()


def check_kernel_gn() -> float:
    """Max relative gap between KernelGN and curvature='explicit' on a small MLP."""
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    train = task.examples(x, torch.randint(0, 4, (40,), generator=gen))
    queries = task.examples(x[:5] + 0.5, torch.randint(0, 4, (5,), generator=gen))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    expected = InfluenceFunction(task, "explicit", damping=0.03, progress=False).score(
        model, train, queries
    )
    got = KernelGN(model, task, train).scores(train, queries, 0.03)
    return float(np.abs(got - expected.values).max() / np.abs(expected.values).max())


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


def run_method(
    name: str,
    model: nn.Module,
    task: Task,
    train: Examples,
    queries: Examples,
    damping: float,
    args: argparse.Namespace,
) -> Scores:
    start = time.perf_counter()
    if name == "grad-dot":
        scores = GradientSimilarity(task, "dot", progress=False).score(model, train, queries)
    elif name == "explicit":
        values = KernelGN(model, task, train).scores(train, queries, damping)
        scores = Scores(values, train.ids, queries.ids, method="explicit-gn-kernel")
    else:
        curvature = {
            "ekfac": lambda: EKFAC(damping=damping, fisher="exact"),
            "kfac": lambda: KFAC(damping=damping, fisher="exact"),
            "cg": lambda: CG(damping=damping, max_iter=args.cg_iter, tol=1e-6),
            "lissa": lambda: LiSSA(
                damping=damping, depth=args.lissa_depth, batch_size=args.lissa_batch
            ),
        }[name]()
        scores = InfluenceFunction(task, curvature, chunk_size=100, progress=False).score(
            model, train, queries, per_layer=False
        )
    scores.timings["seconds"] = round(time.perf_counter() - start, 3)
    return scores


def validate(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train the model once, then compare every method with the PBRF at each damping."""
    task, train, queries, make = SETUPS[model_name](args.n_train, args.n_queries)
    t0 = time.perf_counter()
    model = TRAINERS[model_name](task)(make, train, 0)
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        train_loss = float(task.loss(model, train.tensors).mean())
        query_loss = float(task.loss(model, queries.tensors).mean())
    t0 = time.perf_counter()
    kernel = KernelGN(model, task, train)
    top = kernel.largest_eigenvalue()
    kernel_seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{model_name}: {n_params} parameters, trained in {train_seconds:.1f}s (train loss "
        f"{train_loss:.4f}, query loss {query_loss:.4f}); GN λ_max {top:.3g}, mean eigenvalue "
        f"{kernel.trace() / n_params:.3g}"
    )
    cfg = PBRF_SETTINGS[model_name]
    rows = cfg["rows"] if args.pbrf_rows is None else args.pbrf_rows
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(train), size=min(rows, len(train)), replace=False))
    per_damping = {}
    for factor in args.damping_factors:
        damping = factor * top
        print(f" damping λ = {factor:g} x λ_max = {damping:.3g}")
        per_damping[f"{factor:g}"] = compare_at(
            model, task, train, queries, kernel, damping, chosen, cfg, args
        )
    return {
        "n_parameters": n_params,
        "n_train": len(train),
        "n_queries": len(queries),
        "train_seconds": round(train_seconds, 2),
        "train_loss": train_loss,
        "query_loss": query_loss,
        "gn_lambda_max": top,
        "gn_mean_eigenvalue": kernel.trace() / n_params,
        "kernel_seconds": round(kernel_seconds, 2),
        "dampings": per_damping,
    }


def compare_at(
    model: nn.Module,
    task: Task,
    train: Examples,
    queries: Examples,
    kernel: KernelGN,
    damping: float,
    chosen: np.ndarray,
    cfg: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """PBRF on the chosen rows, then every method's agreement with it, at one damping."""
    preconditioner = kernel.solve_with(damping)
    pbrf = PBRF(
        task,
        damping=damping,
        rtol=cfg["rtol"],
        max_iter=cfg["max_iter"],
        preconditioner=preconditioner,
        chunk_size=len(chosen),  # one chunk: L-BFGS warm starts carry over every row
        progress=False,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported below
        truth = pbrf.score(model, train, queries, rows=chosen)
    pbrf_seconds = time.perf_counter() - t0
    solver = truth.settings["solver"]
    evals, rel = np.asarray(solver["evaluations"]), np.asarray(solver["relative_gradient"])
    print(
        f"  PBRF: {len(chosen)} rows in {pbrf_seconds:.1f}s ({pbrf_seconds / len(chosen):.2f}s "
        f"per row, {evals.mean():.1f} objective evaluations on average; relative gradient "
        f"median {np.median(rel):.1e}, max {rel.max():.1e}; {int((rel <= cfg['rtol']).sum())} "
        f"rows reached rtol={cfg['rtol']:g})"
    )
    check = None
    if args.pbrf_check_rows:  # the preconditioner changes the speed, not the answer
        few = chosen[: args.pbrf_check_rows]
        plain = PBRF(
            task,
            damping=damping,
            rtol=cfg["rtol"],
            max_iter=4 * cfg["max_iter"],
            chunk_size=len(few),
            progress=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reference = plain.score(model, train, queries, rows=few).values
        gap = np.abs(truth.values[: len(few)] - reference).max() / np.abs(reference).max()
        check = {"rows": len(few), "max_relative_gap": float(gap)}
        print(f"  PBRF without preconditioner on {len(few)} rows: max relative gap {gap:.1e}")
    results: dict[str, Any] = {}
    for name in args.methods:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            scores = run_method(name, model, task, train, queries, damping, args)
        agreement = pbrf_agreement(scores, truth)
        results[name] = {
            "warnings": sorted({str(w.message) for w in caught}),
            "pearson": agreement["pearson"],
            "spearman": agreement["spearman"],
            "pearson_overall": agreement["pearson_overall"],
            "pearson_per_query": agreement["pearson_per_query"],
            "seconds": scores.timings["seconds"],
        }
        print(
            f"  {name:9s} pearson {agreement['pearson']:+.3f}  spearman "
            f"{agreement['spearman']:+.3f}  ({scores.timings['seconds']:.2f}s)"
            + (f"  [{results[name]['warnings'][0]}]" if results[name]["warnings"] else ""),
            flush=True,
        )
    return {
        "damping": damping,
        "pbrf": {
            "rows": len(chosen),
            "epsilon": truth.settings["epsilon_used"],
            "rtol": cfg["rtol"],
            "max_iter": cfg["max_iter"],
            "preconditioner_rows": preconditioner.rows,  # type: ignore[attr-defined]
            "seconds": round(pbrf_seconds, 2),
            "mean_evaluations": float(evals.mean()),
            "relative_gradient_median": float(np.median(rel)),
            "relative_gradient_max": float(rel.max()),
            "rows_converged": int((rel <= cfg["rtol"]).sum()),
            "check_without_preconditioner": check,
        },
        "methods": results,
    }


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="regression-mlp,mnist-mlp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-queries", type=int, default=10)
    parser.add_argument(
        "--pbrf-rows",
        type=int,
        default=None,
        help="PBRF rows per model (default: 500 regression, 60 MNIST)",
    )
    parser.add_argument(
        "--pbrf-check-rows",
        type=int,
        default=3,
        help="rows re-solved without the preconditioner, as a check",
    )
    parser.add_argument(
        "--damping-factors",
        default="1e-3",
        help="damping λ as multiples of the GN's largest eigenvalue, comma-separated",
    )
    parser.add_argument("--cg-iter", type=int, default=100)
    parser.add_argument("--lissa-depth", type=int, default=1000)
    parser.add_argument("--lissa-batch", type=int, default=100)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest for these small ops on a shared CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "influence_validation.json")
    )
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    args.damping_factors = [float(f) for f in args.damping_factors.split(",") if f]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    if args.quick:
        args.n_train, args.pbrf_rows, args.pbrf_check_rows = 100, 10, 1
        args.lissa_depth, args.cg_iter = 100, 30
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    gap = check_kernel_gn()
    print(f"kernel GN vs curvature='explicit' on a small MLP: max relative gap {gap:.1e}")
    if gap > 1e-6:
        raise SystemExit("the kernel form of the explicit GN influence disagrees; not running")
    models = {name: validate(name, args) for name in args.models.split(",") if name}
    total = time.perf_counter() - start

    columns = [(n, f) for n in models for f in models[n]["dampings"]]
    header = f"{'method':10s}" + "".join(f"| {n + ' λ=' + f + 'λmax':^23s}" for n, f in columns)
    print("\nPearson with PBRF (mean over queries), seconds\n" + header)
    print("-" * len(header))
    for method in args.methods:
        cells = ""
        for n, f in columns:
            entry = models[n]["dampings"][f]["methods"][method]
            cells += f"| {entry['pearson']:+.3f} {entry['seconds']:>9.2f}s      "
        print(f"{method:10s}{cells}")
    pbrf_cells = "".join(
        f"| {'PBRF ' + str(models[n]['dampings'][f]['pbrf']['rows']) + ' rows':>12s}"
        f" {models[n]['dampings'][f]['pbrf']['seconds']:>7.1f}s  "
        for n, f in columns
    )
    print(f"{'(truth)':10s}{pbrf_cells}")
    print(f"total {total:.0f}s")

    report = {
        "description": "Pearson correlation (mean over queries) of influence estimates with "
        "PBRF scores on the same rows; same damping for all",
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"pbrf": PBRF_SETTINGS},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": __import__("os").cpu_count(),
        },
        "kernel_gn_check_relative_gap": gap,
        "models": models,
        "total_seconds": round(total, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, json.loads(json.dumps(report, default=float)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
