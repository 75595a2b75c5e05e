"""Query batching: EK-FAC influence with low-rank query gradients vs full rank (issue 5).

InfluenceFunction(query_rank=r) keeps each preconditioned query gradient (G + λI)⁻¹∇m_j as
its best rank-r factors per layer (U [d_out, r], V [d_in', r]) instead of the dense
[d_out, d_in'] matrix, so many queries fit in memory and training gradients are scored from
their activation / output-gradient factors. The issue asks that at r = 32 the scores
correlate >= 0.99 with full rank on the benchmark model.

Models and data are those of benchmarks/influence_vs_peers.py (imported from it, same
training cache in /tmp): an MLP 784-128-64-10 and the SmallCNN trained briefly on the first
4N Fashion-MNIST training images; EK-FAC (true Fisher, default damping) is fitted on the first
N = 5,000 and scored against M = 100 test queries. For every r the table gives the Pearson
correlation with the full-rank matrix (over all entries, and the mean over queries of the
per-query column correlation), the worst layer's per-layer Pearson, the scoring seconds
(fit excluded; the same deterministic fit is redone for each r) and the bytes of the stored
query side (the QueryBlocks the method keeps for the M queries, summed over layers).

Timings are indicative: the machine is shared (2 cores, other jobs running).
Run:  .venv/bin/python benchmarks/query_rank.py  [--quick]   (~3-6 min; --quick ~30 s)
Writes benchmarks/results/query_rank.json (a --quick run only with --out).
"""

# ruff: noqa: E402 - OMP_WAIT_POLICY must be set before torch is imported
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_vs_peers import accuracy, trained  # noqa: I001 - the peers benchmark's models

from datafluence.runtime import tune_allocator
from datafluence.datasets import load_fashion_mnist
from datafluence.gradients.space import ParamSpace
from datafluence.methods.influence import InfluenceFunction
from datafluence.store import atomic_write_json
from datafluence.tasks import ClassificationTask, Examples

RESULTS = Path(__file__).resolve().parent / "results" / "query_rank.json"
RANKS = (1, 4, 8, 16, 32, 64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def mean_column_pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([pearson(a[:, j], b[:, j]) for j in range(a.shape[1])]))


def query_side_bytes(method: InfluenceFunction, model: nn.Module, queries: Examples) -> int:
    """Bytes of the query side the method stores (its own private builder, measured as is)."""
    blocks = method._query_side(model, queries, method._space(model))
    total = 0
    for block in blocks.values():
        for part in (block.dense, block.factors, block.lowrank):
            tensors = () if part is None else (part,) if isinstance(part, torch.Tensor) else part
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def one(
    model: nn.Module, train: Examples, queries: Examples, rank: int | None, chunk: int
) -> tuple[np.ndarray, float, int]:
    """(scores [n_layers, N, M], scoring seconds, query-side bytes) at one query rank."""
    method = InfluenceFunction(
        ClassificationTask(num_classes=10), "ekfac", query_rank=rank, chunk_size=chunk,
        progress=False,
    )  # fmt: skip
    method.fit(model, train)
    start = time.perf_counter()
    scores = method.score(model, train, queries, per_layer=True)
    seconds = time.perf_counter() - start
    return scores.parts["per_layer"], seconds, query_side_bytes(method, model, queries)


def bench(name: str, model: nn.Module, train: Examples, queries: Examples, args) -> dict:
    space = ParamSpace.of(model)
    layers = {layer.name: list(layer.shape) for layer in space.layers}
    print(f"\n{name}: layers (d_out, d_in') {layers}", flush=True)
    full_parts, full_s, full_bytes = one(model, train, queries, None, args.chunk)
    full = full_parts.sum(0)
    rows = [{"rank": "full", "pearson": 1.0, "pearson_per_query_mean": 1.0,
             "worst_layer_pearson": 1.0, "score_s": round(full_s, 2),
             "query_bytes": full_bytes}]  # fmt: skip
    print(f"{'rank':>5} {'pearson':>9} {'per-query':>9} {'worst layer':>20} {'score s':>8} "
          f"{'query bytes':>12}")  # fmt: skip
    print(f"{'full':>5} {1:9.5f} {1:9.5f} {'':>20} {full_s:8.2f} {full_bytes:12,d}", flush=True)
    for rank in args.ranks:
        parts, seconds, nbytes = one(model, train, queries, rank, args.chunk)
        per_layer = {
            n: round(pearson(parts[k], full_parts[k]), 6) for k, n in enumerate(space.names)
        }
        worst = min(per_layer, key=per_layer.get)
        row = {
            "rank": rank,
            "pearson": round(pearson(parts.sum(0), full), 6),
            "pearson_per_query_mean": round(mean_column_pearson(parts.sum(0), full), 6),
            "worst_layer": worst,
            "worst_layer_pearson": per_layer[worst],
            "per_layer_pearson": per_layer,
            "score_s": round(seconds, 2),
            "query_bytes": nbytes,
        }
        rows.append(row)
        print(
            f"{rank:>5} {row['pearson']:9.5f} {row['pearson_per_query_mean']:9.5f} "
            f"{worst:>11} {per_layer[worst]:8.5f} {seconds:8.2f} {nbytes:12,d}",
            flush=True,
        )
    return {"layers": layers, "rows": rows}


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3, help="as in influence_vs_peers.py")
    parser.add_argument("--chunk", type=int, default=128, help="training examples per chunk")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--quick", action="store_true", help="N=500, M=20 smoke run")
    parser.add_argument("--out", default=None, help=f"JSON path (default {RESULTS})")
    args = parser.parse_args()
    args.ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    if args.quick:
        args.n_train, args.n_query = 500, 20
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    torch.set_num_threads(args.threads)

    n, m = args.n_train, args.n_query
    train_set, test_set = load_fashion_mnist("train"), load_fashion_mnist("test")
    x, y = train_set.images[: 4 * n], train_set.labels[: 4 * n]  # the peers benchmark's 4N
    task = ClassificationTask(num_classes=10)
    train = task.examples(x[:n], y[:n], train_set.ids[:n])
    queries = task.examples(test_set.images[:m], test_set.labels[:m], test_set.ids[:m])
    print(f"EK-FAC query rank vs full rank: N={n} train, M={m} queries (Fashion-MNIST), "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    started = time.perf_counter()
    models: dict[str, Any] = {}
    for name in [s.strip() for s in args.models.split(",") if s.strip()]:
        model, origin = trained(name, x, y, args.epochs)
        result = bench(name, model, train, queries, args)
        result["origin"] = origin
        result["test_accuracy"] = round(accuracy(model, test_set.images, test_set.labels), 4)
        models[name] = result
    elapsed = time.perf_counter() - started
    print(f"\nwall time {elapsed:.0f} s; load average {os.getloadavg()[0]:.1f}")
    if out is not None:
        atomic_write_json(
            out,
            {
                "setup": {
                    "n_train": n,
                    "n_query": m,
                    "curvature": "ekfac (true Fisher, damping 0.1 x mean eigenvalue per layer)",
                    "chunk": args.chunk,
                    "threads": torch.get_num_threads(),
                    "machine": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores (shared: timings indicative)",
                    "torch": torch.__version__,
                    "wall_s": round(elapsed, 1),
                },
                "models": models,
            },
        )
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
