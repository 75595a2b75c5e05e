"""Influence functions: datafluence vs Kronfluence on the same models and data (issue 5, §7).

An MLP and the reference SmallCNN are trained briefly (Adam, cached in /tmp) on the first 4N
Fashion-MNIST training images; both libraries then fit EK-FAC factors on the first N of them
and score them against M test queries. The
table reports fit / score seconds, the peak memory each method adds, and the Pearson
correlation of every score matrix with Kronfluence's EK-FAC matrix (and with Kronfluence's
same strategy where it has one). Every datafluence strategy that scales to this size is timed
too (the matrix-free ones on the MLP only), and a scaling row times datafluence's EK-FAC on
4N examples back to back with N (--scale-models, default the MLP).

Matched settings (see benchmarks/peers/README.md):
  - modules: every Linear and Conv2d layer, biases included, float32 model and data;
  - Fisher: labels drawn from the model (true Fisher), the default of both. Kronfluence's task
    here draws them with datafluence's seeded generator (seed * 1000 + stream; stream 0 for the
    covariances, 1 for the eigenvalue correction) so both see the same draws; with
    --fisher empirical both use the dataset's labels instead;
  - damping: 0.1 x the mean (corrected) eigenvalue per layer on both sides
    (ScoreArguments(damping_factor=None));
  - sign and scale: Kronfluence's measurement is the query's summed cross-entropy, so its score
    ∇CE_qᵀ(G+λI)⁻¹∇L_i equals datafluence's ∇log p_qᵀ(G+λI)⁻¹(−∇L_i); both average G over
    the N examples, so the scale ratio should be 1. One convention differs: for a Conv2d
    layer Kronfluence averages the K-FAC gradient factor S over examples x positions,
    datafluence over examples only, so their K-FAC (not EK-FAC) matrices differ on the CNN;
    the script shows that rescaling datafluence's conv-layer scores by the number of positions
    reproduces Kronfluence's K-FAC exactly;
  - batches: the same batch size on both sides (--batch-size), all queries in one batch,
    Kronfluence's per-module scores off and datafluence's per_layer=False;
  - threads: torch.set_num_threads(--threads) for the whole process.

Peak memory is the rise of the process's peak resident set (VmHWM, the value getrusage's
ru_maxrss reports) over the resident set at the start of the method, after resetting the peak
with /proc/self/clear_refs (Linux) and returning freed heap memory with malloc_trim. Where the
reset is refused it falls back to the ru_maxrss delta, which is 0 for a method that stays
below an earlier peak. tracemalloc is not used: it does not see torch's tensor memory.

Kronfluence is never a dependency of datafluence: install it for this benchmark only, into
benchmarks/peers/site (see benchmarks/peers/README.md). Run:
    .venv/bin/python benchmarks/influence_vs_peers.py            # 10-16 min on 2 busy cores
    .venv/bin/python benchmarks/influence_vs_peers.py --quick    # a smoke run (~1.5 min)
Only a full run with Kronfluence rewrites benchmarks/results/influence_vs_peers.json; give
--out for others.
"""

# ruff: noqa: E402 - OMP_WAIT_POLICY must be set before torch (and its libgomp) is imported
from __future__ import annotations

import os

# With busy-waiting OpenMP threads, a 2-thread LAPACK eigh on a 2-core machine that other jobs
# share can take 25 s instead of 0.3 s (threads spin at barriers while their partner is
# descheduled). Passive waiting removes that pathology for both libraries alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import ctypes
import gc
import hashlib
import logging
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datafluence.datasets import load_fashion_mnist
from datafluence.methods.influence import InfluenceFunction
from datafluence.models import SmallCNN
from datafluence.runtime import tune_allocator
from datafluence.store import atomic_write_json
from datafluence.tasks import ClassificationTask, Examples

HERE = Path(__file__).resolve().parent
PEERS_SITE = HERE / "peers" / "site"
RESULTS = HERE / "results" / "influence_vs_peers.json"
CACHE = Path(tempfile.gettempdir()) / "datafluence-bench-models"
INSTALL = (
    ".venv/bin/pip install --no-deps --target benchmarks/peers/site "
    "-c benchmarks/peers/constraints.txt -r benchmarks/peers/requirements.txt"
)


# --------------------------------------------------------------------------------------------
# Kronfluence, from benchmarks/peers/site only
# --------------------------------------------------------------------------------------------


def import_kronfluence() -> Any:
    """The kronfluence package from benchmarks/peers/site, or None with the install command.

    The folder goes to the END of sys.path, so the project's own packages (torch above all)
    always win over anything installed there. Kronfluence 1.0.1 declares torchvision as a
    dependency but never imports it, so no stub is needed.
    """
    if PEERS_SITE.is_dir() and str(PEERS_SITE) not in sys.path:
        sys.path.append(str(PEERS_SITE))
    try:
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model  # noqa: F401
    except ImportError as err:
        print(
            f"Kronfluence is not installed for this benchmark ({err}).\n"
            f"Install it (outside the project's dependencies) from the repository root with:\n"
            f"    {INSTALL}\n"
            "(benchmarks/peers/README.md explains the pins), or pass --skip-peers to time "
            "datafluence alone.",
            file=sys.stderr,
        )
        return None
    return kronfluence


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


@dataclass
class PeakMemory:
    """Rise of the peak resident set during a block, in MiB (see the module docstring)."""

    how: str = ""
    mib: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        gc.collect()
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            base = _status_kib("VmRSS")
            self.how = "VmHWM (= getrusage ru_maxrss) reset by clear_refs, minus VmRSS at start"
        except OSError:
            base = None
        if base is None:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.how = "ru_maxrss delta (peak reset refused: 0 below an earlier peak)"
        yield self
        if self.how.startswith("VmHWM"):
            peak = _status_kib("VmHWM") or base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = max(0, peak - base) / 1024


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """784-128-64-10 with ReLU (0.11M parameters)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(784, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "cnn": SmallCNN}


def trained(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> tuple[nn.Module, str]:
    """Train `name` with Adam on (x, y), or load it from the cache in /tmp."""
    key = hashlib.sha256(
        f"{name}:{MODELS[name]().__doc__}:{epochs}:{tuple(x.shape)}:".encode()
        + x[:: max(1, len(x) // 64)].numpy().tobytes()
    ).hexdigest()[:12]
    path = CACHE / f"{name}-{key}.pt"
    torch.manual_seed(0)
    model = MODELS[name]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), f"cached {path}"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval(), f"trained {epochs} epochs, saved {path}"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


# --------------------------------------------------------------------------------------------
# The two libraries
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    library: str
    method: str
    fit_s: float
    score_s: float
    peak_mib: float
    values: np.ndarray  # [n_train, n_query]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.fit_s + self.score_s


def run_datafluence(
    model: nn.Module,
    train: Examples,
    queries: Examples,
    curvature: str,
    chunk_size: int,
    seed: int = 0,
    **options: Any,
) -> Run:
    task = ClassificationTask(num_classes=10)
    memory = PeakMemory()
    with memory.measure():
        start = time.perf_counter()
        method = InfluenceFunction(
            task, curvature, chunk_size=chunk_size, seed=seed, progress=False, **options
        )
        method.fit(model, train)
        mid = time.perf_counter()
        scores = method.score(model, train, queries, per_layer=False)
        end = time.perf_counter()
    label = curvature + "".join(f" {k}={v}" for k, v in options.items() if k != "fisher")
    return Run("datafluence", label, mid - start, end - mid, memory.mib, scores.values)


class _KronfluenceTask:
    """Built lazily (the base class lives in the optional package)."""

    cls: type | None = None

    @classmethod
    def make(cls, kronfluence: Any) -> Any:
        if cls.cls is not None:
            return cls.cls()
        from kronfluence.task import Task

        class ClassificationKF(Task):
            """Summed cross-entropy; sampled labels drawn like datafluence draws them."""

            def __init__(self) -> None:
                self.generator = torch.Generator().manual_seed(0)

            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        probs = torch.softmax(logits.detach().double(), dim=-1)
                        y = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        cls.cls = ClassificationKF
        return ClassificationKF()


def run_kronfluence(
    kronfluence: Any,
    model: nn.Module,
    train: Examples,
    queries: Examples,
    strategy: str,
    batch_size: int,
    fisher: str,
    workdir: Path,
    seed: int = 0,
) -> Run:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = _KronfluenceTask.make(kronfluence)
    wrapped = prepare_model(_copy(model), task)
    train_set = torch.utils.data.TensorDataset(train.tensors["x"], train.tensors["y"])
    query_set = torch.utils.data.TensorDataset(queries.tensors["x"], queries.tensors["y"])
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
    score_args = ScoreArguments(damping_factor=None)  # 0.1 x mean eigenvalue per module
    out = workdir / f"kf-{strategy}"
    shutil.rmtree(out, ignore_errors=True)
    memory = PeakMemory()
    # datafluence's streams: covariances 0, EK-FAC correction 1, a diagonal's own pass 0
    lambda_stream = 0 if strategy == "diagonal" else 1
    with memory.measure():
        start = time.perf_counter()
        analyzer = Analyzer(
            analysis_name="bench",
            model=wrapped,
            task=task,
            cpu=True,
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=str(out),
        )
        common = {
            "factors_name": strategy,
            "factor_args": factor_args,
            "overwrite_output_dir": True,
        }
        task.generator.manual_seed(seed * 1000)
        analyzer.fit_covariance_matrices(
            dataset=train_set, per_device_batch_size=batch_size, **common
        )
        after_covariance = time.perf_counter()
        analyzer.perform_eigendecomposition(**common)
        after_eigen = time.perf_counter()
        task.generator.manual_seed(seed * 1000 + lambda_stream)
        analyzer.fit_lambda_matrices(dataset=train_set, per_device_batch_size=batch_size, **common)
        mid = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name=strategy,
            factors_name=strategy,
            query_dataset=query_set,
            train_dataset=train_set,
            per_device_query_batch_size=len(queries),
            per_device_train_batch_size=batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        values = analyzer.load_pairwise_scores(strategy)["all_modules"]
        end = time.perf_counter()
    return Run(
        "kronfluence",
        strategy,
        mid - start,
        end - mid,
        memory.mib,
        values.T.double().numpy().astype(np.float32),
        extra={
            "fit_phases_s": {
                "covariance": round(after_covariance - start, 3),
                "eigendecomposition": round(after_eigen - after_covariance, 3),
                "lambda": round(mid - after_eigen, 3),
            }
        },
    )


def _copy(model: nn.Module) -> nn.Module:
    clone = type(model)()
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def best_of(repeats: int, fn: Callable[[], Run]) -> Run:
    """Run `repeats` times; keep the fastest total and the largest peak memory."""
    runs = [fn() for _ in range(repeats)]
    best = min(runs, key=lambda r: r.total_s)
    best.peak_mib = max(r.peak_mib for r in runs)
    best.extra["all_totals_s"] = [round(r.total_s, 3) for r in runs]
    return best


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def scale_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """Least-squares slope of a on b (1 = same scale and sign)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    return float(a @ b / (b @ b))


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

# datafluence strategies beyond the block-diagonal ones, with modest settings (MLP only):
# every CG/LiSSA step is a Gauss-Newton product over the training set for all queries at once.
MATRIX_FREE: dict[str, dict[str, Any]] = {
    "arnoldi": {"rank": 50, "iterations": 100},
    "lissa": {"depth": 30, "batch_size": 256},
    "cg": {"max_iter": 4},
}
MATRIX_FREE_CHUNK = 512  # their products run faster in larger chunks (2.5x at 512 vs 128)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def row_of(model: str, run: Run, n: int, m: int) -> dict[str, Any]:
    return {
        "model": model,
        "library": run.library,
        "method": run.method,
        "n_train": n,
        "n_query": m,
        "fit_s": round(run.fit_s, 3),
        "score_s": round(run.score_s, 3),
        "total_s": round(run.total_s, 3),
        "peak_mib": round(run.peak_mib, 1),
        "runs_total_s": run.extra.get("all_totals_s", [round(run.total_s, 3)]),
        **({"fit_phases_s": run.extra["fit_phases_s"]} if "fit_phases_s" in run.extra else {}),
        "load_average": load_average(),
        "note": run.note,
    }


def print_row(row: dict[str, Any]) -> None:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "-"

    print(
        f"{row['model']:4s} {row['library']:12s} {row['method']:28s} {row['n_train']:6d} "
        f"{row['n_query']:4d} {row['fit_s']:8.2f} {row['score_s']:8.2f} {row['total_s']:8.2f} "
        f"{row['peak_mib']:8.1f} {num('r_vs_kf_ekfac', '10.6f')} {num('r_vs_kf_same', '10.6f')} "
        f"{num('scale_vs_kf_same', '7.4f')}  {row['note']}",
        flush=True,
    )


HEADER = (
    f"{'model':4s} {'library':12s} {'method':28s} {'N':>6s} {'M':>4s} {'fit s':>8s} "
    f"{'score s':>8s} {'total s':>8s} {'peak MiB':>8s} {'r KF-EKFAC':>10s} {'r KF-same':>10s} "
    f"{'scale':>7s}"
)


@dataclass
class Setup:
    """What every model's benchmark shares."""

    args: argparse.Namespace
    kronfluence: Any
    train: Examples
    train_big: Examples
    queries: Examples
    workdir: Path

    def datafluence(self, model: nn.Module, curvature: str, big: bool = False, **kw: Any) -> Run:
        chunk = kw.pop("chunk", self.args.batch_size)
        train = self.train_big if big else self.train
        return run_datafluence(model, train, self.queries, curvature, chunk, **kw)

    def peer(self, model: nn.Module, strategy: str, big: bool = False) -> Run:
        train = self.train_big if big else self.train
        return run_kronfluence(
            self.kronfluence,
            model,
            train,
            self.queries,
            strategy,
            self.args.batch_size,
            self.args.fisher,
            self.workdir,
        )


def bench_model(setup: Setup, name: str, model: nn.Module) -> tuple[list[dict], dict]:
    """All rows of one model, and its summary (speed ratio, agreement, scaling)."""
    args = setup.args
    n, m = len(setup.train), len(setup.queries)
    fisher = {"fisher": args.fisher}
    peers: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}

    def emit(run: Run, same: str | None = None) -> dict[str, Any]:
        n_rows = len(run.values)
        row = row_of(name, run, n_rows, m)
        if "ekfac" in peers and n_rows == n:
            row["r_vs_kf_ekfac"] = round(pearson(run.values, peers["ekfac"]), 8)
        if same in peers and n_rows == n:
            row["r_vs_kf_same"] = round(pearson(run.values, peers[same]), 8)
            row["scale_vs_kf_same"] = round(scale_ratio(run.values, peers[same]), 6)
        rows.append(row)
        print_row(row)
        return row

    # untimed warm-up: first calls pay one-off dispatch and allocation costs
    warm = Setup(args, setup.kronfluence, setup.train[:256], setup.train[:256],
                 setup.queries[:10], setup.workdir)  # fmt: skip
    warm.datafluence(model, "ekfac", **fisher)
    if setup.kronfluence is not None:
        warm.peer(model, "ekfac")
    print(HEADER, flush=True)

    kf_ekfac = df_ekfac = None
    if setup.kronfluence is not None:
        for strategy in split(args.peer_strategies, first="ekfac"):
            run = best_of(args.repeats, lambda s=strategy: setup.peer(model, s))
            peers[strategy] = run.values
            row = emit(run, strategy)
            kf_ekfac = row if strategy == "ekfac" else kf_ekfac
    for strategy in split(args.strategies):
        options = {} if strategy == "identity" else fisher
        run = best_of(args.repeats, lambda s=strategy, o=options: setup.datafluence(model, s, **o))
        row = emit(run, strategy)
        if (
            strategy == "kfac"
            and "kfac" in peers
            and conv_positions(model, setup.queries.tensors["x"])
        ):
            check = kfac_conv_check(setup, model, peers["kfac"])
            summary["kfac_conv_convention"] = check
            print(
                f"   K-FAC vs Kronfluence K-FAC: Pearson {check['pearson_as_is']} as is, "
                f"{check['pearson_conv_layers_x_T']} with datafluence's conv-layer scores x T "
                f"(T = {check['conv_positions']}; Kronfluence averages conv S over positions)",
                flush=True,
            )
        if strategy == "ekfac":
            df_ekfac = row
        if strategy == "ekfac" and args.fisher == "sample":
            # Monte-Carlo check: another seed draws other labels for the sampled Fisher
            other = setup.datafluence(model, "ekfac", seed=1, **fisher)
            other.method = "ekfac seed=1"
            other.note = "1 run; label draws differ from Kronfluence's (Monte-Carlo check)"
            emit(other, "ekfac")

    matrix_free = split(args.matrix_free)
    if name == "mlp":
        for strategy in matrix_free:
            caught: list[str] = []

            def one(s: str = strategy, caught: list[str] = caught) -> Run:
                with warnings.catch_warnings(record=True) as got:
                    warnings.simplefilter("always")
                    r = setup.datafluence(model, s, chunk=MATRIX_FREE_CHUNK, **MATRIX_FREE[s])
                caught[:] = [str(w.message).split(";")[0] for w in got]
                return r

            run = best_of(args.repeats, one)
            run.note = f"chunk {MATRIX_FREE_CHUNK}" + (f"; {caught[0]}" if caught else "")
            emit(run)
    elif matrix_free:
        print(
            f"{name}: {', '.join(matrix_free)} skipped: each CG/LiSSA step is a Gauss-Newton "
            "product over all N examples for all M queries (~10 s on the MLP already)",
            flush=True,
        )

    if df_ekfac is not None and kf_ekfac is not None:
        summary["ekfac"] = {
            "speedup_total": round(kf_ekfac["total_s"] / df_ekfac["total_s"], 2),
            "speedup_fit": round(kf_ekfac["fit_s"] / df_ekfac["fit_s"], 2),
            "speedup_score": round(kf_ekfac["score_s"] / df_ekfac["score_s"], 2),
            "pearson": df_ekfac.get("r_vs_kf_ekfac"),
            "scale_ratio": df_ekfac.get("scale_vs_kf_same"),
        }
    if args.scale and df_ekfac is not None and name in split(args.scale_models):
        # N and kN are timed back to back in each repeat, so both see the same machine load
        pairs = [
            (
                setup.datafluence(model, "ekfac", **fisher),
                setup.datafluence(model, "ekfac", big=True, **fisher),
            )
            for _ in range(args.repeats)
        ]
        small = min((p[0] for p in pairs), key=lambda r: r.total_s)
        big = min((p[1] for p in pairs), key=lambda r: r.total_s)
        big.peak_mib = max(p[1].peak_mib for p in pairs)
        big.extra["all_totals_s"] = [round(p[1].total_s, 3) for p in pairs]
        ratio = big.total_s / small.total_s
        big.method = f"ekfac (N x{args.scale})"
        big.note = f"time x{ratio:.2f} vs N={n} timed alongside ({small.total_s:.2f} s)"
        emit(big)
        summary["scaling"] = {
            "library": "datafluence",
            "n_from": n,
            "n_to": len(setup.train_big),
            "n_from_total_s": round(small.total_s, 3),
            "n_to_total_s": round(big.total_s, 3),
            "time_ratio": round(ratio, 2),
            "fit_ratio": round(big.fit_s / small.fit_s, 2),
            "score_ratio": round(big.score_s / small.score_s, 2),
        }
        if args.scale_peers and kf_ekfac is not None:
            kf_big = best_of(args.repeats, lambda: setup.peer(model, "ekfac", big=True))
            kf_big.method = f"ekfac (N x{args.scale})"
            emit(kf_big)
            summary["scaling"]["kronfluence_time_ratio"] = round(
                kf_big.total_s / kf_ekfac["total_s"], 2
            )
    return rows, summary


def conv_positions(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Output positions T of every Conv2d layer (the tokens of its per-example gradient)."""
    found: dict[str, int] = {}
    hooks = [
        module.register_forward_hook(
            lambda mod, inp, out, name=name: found.__setitem__(name, out[0, 0].numel())
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x[:1])
    for hook in hooks:
        hook.remove()
    return found


def kfac_conv_check(setup: Setup, model: nn.Module, peer: np.ndarray) -> dict[str, Any]:
    """Why K-FAC disagrees on conv layers: Kronfluence divides a conv layer's gradient
    covariance S by the number of output positions x examples, datafluence by the examples
    only (S = mean over examples of Σ_t g_t g_tᵀ, the scale of the Gauss-Newton block and of
    the EK-FAC eigenvalues). With damping 0.1 x mean eigenvalue per layer, Kronfluence's K-FAC
    then weighs each conv layer's scores T times more. Rescaling datafluence's per-layer
    K-FAC scores by T should reproduce Kronfluence's matrix."""
    fisher = {} if setup.args.fisher == "sample" else {"fisher": setup.args.fisher}
    method = InfluenceFunction(
        ClassificationTask(num_classes=10),
        "kfac",
        chunk_size=setup.args.batch_size,
        progress=False,
        **fisher,
    )
    scores = method.score(model, setup.train, setup.queries, per_layer=True)
    positions = conv_positions(model, setup.train.tensors["x"])
    weights = [positions.get(name, 1) for name in scores.settings["layers"]]
    parts = scores.parts["per_layer"].astype(np.float64)
    rescaled = np.tensordot(np.asarray(weights, dtype=np.float64), parts, axes=1)
    return {
        "conv_positions": positions,
        "pearson_as_is": round(pearson(scores.values, peer), 8),
        "pearson_conv_layers_x_T": round(pearson(rescaled, peer), 8),
        "scale_conv_layers_x_T": round(scale_ratio(rescaled, peer), 6),
    }


def split(text: str, first: str | None = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items if first is None else [first] + [t for t in items if t != first]


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128, help="both libraries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best total time is kept")
    parser.add_argument("--epochs", type=int, default=3, help="Adam epochs to train the models")
    parser.add_argument("--fisher", choices=("sample", "empirical"), default="sample")
    parser.add_argument(
        "--strategies",
        default="ekfac,kfac,diagonal,identity",
        help="datafluence block-diagonal strategies (both models)",
    )
    parser.add_argument(
        "--matrix-free",
        default="arnoldi,lissa,cg",
        help="datafluence matrix-free strategies (MLP only; '' to skip)",
    )
    parser.add_argument(
        "--peer-strategies",
        default="kfac,diagonal,identity",
        help="Kronfluence strategies besides ekfac (always run: it is the reference)",
    )
    parser.add_argument("--scale", type=int, default=4, help="train-size factor (0: no row)")
    parser.add_argument("--scale-models", default="mlp", help="models given a scaling row")
    parser.add_argument("--scale-peers", action="store_true", help="scale Kronfluence too")
    parser.add_argument("--skip-peers", action="store_true", help="time datafluence alone")
    parser.add_argument("--quick", action="store_true", help="small smoke run (JSON with --out)")
    parser.add_argument("--out", default=None, help=f"JSON path (default {RESULTS})")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_query, args.repeats, args.scale = 500, 20, 1, 2
        MATRIX_FREE.update(
            arnoldi={"rank": 10, "iterations": 20},
            lissa={"depth": 5, "batch_size": 128},
            cg={"max_iter": 2},
        )
    # only a full run with the peer replaces the recorded results; others need --out
    out = Path(args.out) if args.out else (None if args.quick or args.skip_peers else RESULTS)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"kronfluence\..*")
    kronfluence = None if args.skip_peers else import_kronfluence()
    if kronfluence is None and not args.skip_peers:
        sys.exit(2)

    n, m = args.n_train, args.n_query
    n_big = n * args.scale if args.scale else n
    train_set, test_set = load_fashion_mnist("train"), load_fashion_mnist("test")
    if n_big > len(train_set):
        raise SystemExit(f"--n-train x --scale = {n_big} exceeds {len(train_set)} examples")
    x, y = train_set.images[:n_big], train_set.labels[:n_big]
    task = ClassificationTask(num_classes=10)
    train_big = task.examples(x, y, train_set.ids[:n_big])
    queries = task.examples(test_set.images[:m], test_set.labels[:m], test_set.ids[:m])

    print(
        f"datafluence vs Kronfluence {getattr(kronfluence, '__version__', '(skipped)')}: "
        f"N={n} train, M={m} queries (Fashion-MNIST), batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, fisher={args.fisher}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}, load average {load_average()} on "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    started, load_start = time.perf_counter(), load_average()
    workdir = Path(tempfile.mkdtemp(prefix="kf-bench-"))
    setup = Setup(args, kronfluence, train_big[:n], train_big, queries, workdir)
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    try:
        for name in split(args.models):
            model, origin = trained(name, x, y, args.epochs)
            models[name] = {
                "origin": origin,
                "trained_on": f"first {n_big} Fashion-MNIST training images, Adam lr 1e-3, "
                f"batch 128, {args.epochs} epochs",
                "parameters": sum(p.numel() for p in model.parameters()),
                "test_accuracy": round(accuracy(model, test_set.images, test_set.labels), 4),
            }
            print(
                f"\n{name}: {models[name]['parameters']} parameters, test accuracy "
                f"{models[name]['test_accuracy']:.3f} ({origin})",
                flush=True,
            )
            model_rows, summary[name] = bench_model(setup, name, model)
            rows.extend(model_rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.perf_counter() - started
    print(f"\nwall time {elapsed:.0f} s; load average {load_start} -> {load_average()}")
    print(f"peak memory: {_probe_memory_method()}")
    print("\n" + HEADER)
    for row in rows:
        print_row(row)
    for name, s in summary.items():
        if "ekfac" in s:
            e = s["ekfac"]
            print(
                f"{name}: EK-FAC datafluence vs Kronfluence: x{e['speedup_total']} total "
                f"(fit x{e['speedup_fit']}, score x{e['speedup_score']}), Pearson "
                f"{e['pearson']}, scale {e['scale_ratio']}"
            )
        if "scaling" in s:
            c = s["scaling"]
            print(
                f"{name}: N {c['n_from']} -> {c['n_to']}: datafluence EK-FAC time "
                f"x{c['time_ratio']}"
            )
    if out is None:
        return
    result = {
        "benchmark": "influence_vs_peers",
        "kronfluence": getattr(kronfluence, "__version__", None),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_s": round(elapsed, 1),
        "data": f"Fashion-MNIST: first {n} training images, first {m} test images as queries",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "fisher": args.fisher,
        "matrix_free_settings": {k: MATRIX_FREE[k] for k in split(args.matrix_free)},
        "memory": _probe_memory_method(),
        "timing": f"best total of {args.repeats} runs; peak memory the largest of them",
        "models": models,
        "summary": summary,
        "rows": rows,
    }
    atomic_write_json(out, result)
    print(f"wrote {out}")


def _probe_memory_method() -> str:
    probe = PeakMemory()
    with probe.measure():
        pass
    return probe.how


if __name__ == "__main__":
    main()
