"""Seconds per baseline (issue 5 §4-5): gradient baselines on an MNIST MLP, text baselines on
a synthetic corpus.

Model baselines score 1,000 training x 100 query digits (the bundled MNIST subset) with a
784-128-10 MLP trained briefly here by SGD (3 epochs; its end-of-epoch weights are the
TracIn / TRAK checkpoints). Text baselines score 10,000 synthetic sentences (Zipf-distributed
pseudo-words) against 100 queries. Each method runs once on a tiny set first, so one-off
costs are not timed; calls under 5 s are timed twice and the best kept. Projected methods
use chunks of 250 examples: projection matrices beyond RandomProjection's cache are drawn
again for every chunk, so bigger chunks are faster (and take chunk x P floats of memory). Run: `.venv/bin/python benchmarks/baselines.py`.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datafluence.datasets import load_mnist_subset, take_per_class
from datafluence.methods.gradient_similarity import GradientSimilarity
from datafluence.methods.representation_similarity import RepresentationSimilarity
from datafluence.methods.tfidf import TextSimilarity
from datafluence.methods.tracin import TracInCP
from datafluence.methods.trak import TRAK
from datafluence.runtime import tune_allocator
from datafluence.store import atomic_write_json
from datafluence.tasks import ClassificationTask
from datafluence.text import bm25_candidates


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def train_briefly(x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float):
    """Plain SGD, batch 32; returns the model and its weights after every epoch."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    checkpoints = []
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for lo in range(0, len(x), 32):
            idx = order[lo : lo + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    return model.eval(), checkpoints, accuracy


def synthetic_corpus(n: int, vocab: int, seed: int) -> list[str]:
    """Sentences of 6-24 pseudo-words drawn from a Zipf(1.1) law over `vocab` words."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qui", "dor"]
    every = ["".join(p) for n in (2, 3, 4) for p in itertools.product(syllables, repeat=n)]
    if vocab > len(every):
        raise ValueError(f"vocab must be at most {len(every)}")
    words = [every[i] for i in np.random.default_rng(0).permutation(len(every))[:vocab]]
    ranks = np.arange(1, vocab + 1)
    p = ranks**-1.1
    p /= p.sum()
    out = []
    for _ in range(n):
        ids = rng.choice(vocab, size=int(rng.integers(6, 25)), p=p)
        out.append(" ".join(words[i] for i in ids).capitalize() + ".")
    return out


def timed(fn: Callable[[], object], again_below: float = 5.0) -> float:
    """Seconds of one call; calls under `again_below` seconds run twice, the best kept."""
    start = time.perf_counter()
    fn()
    best = time.perf_counter() - start
    if best < again_below:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). One by default: on a shared 2-core machine "
        "two threads made these small ops 100x slower",
    )
    parser.add_argument("--docs", type=int, default=10000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "baselines.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    digits = load_mnist_subset()
    x, y = digits.images, digits.labels
    lr, epochs = 0.05, 3
    model, checkpoints, accuracy = train_briefly(x, y, epochs, lr)
    task = ClassificationTask(num_classes=10)
    train = task.examples(x, y, digits.ids)
    picked = take_per_class(digits, 10)
    queries = task.examples(picked.images, picked.labels, [f"q-{i}" for i in picked.ids])
    tiny_train, tiny_queries = train[:10], queries[:5]
    rates = [lr] * epochs
    print(f"MLP 784-128-10, SGD lr={lr}, {epochs} epochs: train accuracy {accuracy:.3f}")

    model_methods: dict[str, Callable[[], object]] = {
        "gradient dot (reference)": lambda: GradientSimilarity(
            task, "dot", progress=False, chunk_size=100
        ),
        "gradient cosine (reference)": lambda: GradientSimilarity(
            task, "cosine", progress=False, chunk_size=100
        ),
        "TracIn-CP, 3 ckpts, exact": lambda: TracInCP(
            task, checkpoints, rates, chunk_size=100, progress=False
        ),
        "TracIn-CP, 3 ckpts, k=512": lambda: TracInCP(
            task, checkpoints, rates, projection_dim=512, chunk_size=250, progress=False
        ),
        "TRAK, 1 ckpt, k=512": lambda: TRAK(
            task, checkpoints[-1:], projection_dim=512, chunk_size=250, progress=False
        ),
        "TRAK, 3 ckpts, k=512": lambda: TRAK(
            task, checkpoints, projection_dim=512, chunk_size=250, progress=False
        ),
        "TRAK, 1 ckpt, k=2048": lambda: TRAK(
            task, checkpoints[-1:], projection_dim=2048, chunk_size=250, progress=False
        ),
        "RepSim cosine (hidden layer)": lambda: RepresentationSimilarity(task, "2", progress=False),
    }
    rows = []
    for name, make in model_methods.items():
        make().score(model, tiny_train, tiny_queries)  # warm-up
        seconds = timed(lambda make=make: make().score(model, train, queries))
        rows.append(
            {"method": name, "n_train": len(train), "n_query": len(queries), "seconds": seconds}
        )
        print(f"{name:34s} {len(train):6d} x {len(queries):4d}  {seconds:8.3f} s", flush=True)

    docs = synthetic_corpus(args.docs, 20000, seed=0)
    asked = synthetic_corpus(100, 20000, seed=1)
    text_methods: dict[str, Callable[[], object]] = {
        "BM25 scores (unigram)": lambda: TextSimilarity("bm25", progress=False).score(
            None, docs, asked
        ),
        "BM25 top-1000 candidates": lambda: bm25_candidates(docs, asked, k=1000),
        "BM25 scores (1-2 grams)": lambda: TextSimilarity("bm25", (1, 2), progress=False).score(
            None, docs, asked
        ),
        "TF-IDF cosine (unigram)": lambda: TextSimilarity("tfidf", progress=False).score(
            None, docs, asked
        ),
        "TF-IDF cosine (1-2 grams)": lambda: TextSimilarity("tfidf", (1, 2), progress=False).score(
            None, docs, asked
        ),
    }
    for name, fn in text_methods.items():
        seconds = timed(fn)
        rows.append(
            {"method": name, "n_train": len(docs), "n_query": len(asked), "seconds": seconds}
        )
        print(f"{name:34s} {len(docs):6d} x {len(asked):4d}  {seconds:8.3f} s", flush=True)

    result = {
        "benchmark": "baselines",
        "model": f"MLP 784-128-10, SGD lr={lr} x {epochs} epochs on the MNIST subset",
        "train_accuracy": accuracy,
        "corpus": f"{args.docs} synthetic Zipf sentences, 20000-word vocabulary",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": [{**r, "seconds": round(r["seconds"], 3)} for r in rows],
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
