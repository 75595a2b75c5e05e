"""Batched EIF engine vs the naive loop on the reference CNN (issue: foundation, §6).

Both engines fine-tune the same Fashion-MNIST CNN on each of N MNIST digits (labelled
"Sneaker") and measure M digits; the table reports seconds, the speed ratio, the max abs
difference of the two matrices, and the measurement floor: N ordinary forwards over the M
probes, which any exact engine that measures each copy with ordinary forwards must spend
(bound = naive / floor is the best ratio such an engine can reach, however cheap its
fine-tuning; the batched engine goes below it because SmallCNN.forward_copies measures all
copies at once, sharing the probes' first-layer patches), and the compute roofline (benchmarks/roofline.py): the N forwards' FLOPs at
this machine's peak matmul rate, the time no exact engine can beat here however it lays out
its forwards (roofline bound = naive / roofline).
Run: `.venv/bin/python benchmarks/eif_batched.py`.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from roofline import forward_flops, peak_gflops

from datafluence.datasets import (
    FASHION_CLASSES,
    load_fashion_mnist,
    load_mnist_subset,
    take_per_class,
)
from datafluence.finetune import measure
from datafluence.methods import EmpiricalInfluence
from datafluence.models import SmallCNN, TrainRecipe, train_classifier
from datafluence.models.cnn import pool_window_patches
from datafluence.runtime import tune_allocator
from datafluence.store import atomic_write_json, tensors_fingerprint
from datafluence.tasks import ClassificationTask

T = TypeVar("T")


def reference_model() -> tuple[torch.nn.Module, str]:
    """The experiment's trained CNN (from the cache after the first run)."""
    try:
        train = load_fashion_mnist("train")
    except FileNotFoundError:
        torch.manual_seed(0)
        return SmallCNN().eval(), "random init (Fashion-MNIST not found)"
    model, cached = train_classifier(
        SmallCNN,
        train.images,
        train.labels,
        TrainRecipe(epochs=4),
        name="cnn-fashion-mnist",
        data_key=tensors_fingerprint({"images": train.images, "labels": train.labels}),
        progress=False,
    )
    return model, "trained CNN" + (" (cached)" if cached else "")


def best_of(repeats: int, fn: Callable[[], T]) -> tuple[float, T]:
    """Fastest of `repeats` calls (seconds) and the last result: on a shared 2-core machine
    single runs vary by 20-40 %."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def measurement_floor(model, task, n: int, probes, repeats: int) -> float:
    """Seconds for n ordinary forwards over the probes (best of `repeats`): what any exact
    engine that measures each fine-tuned copy with ordinary forwards must spend, whatever
    its fine-tuning costs."""
    return best_of(repeats, lambda: [measure(model, task, probes.tensors) for _ in range(n)])[0]


def convolution_floor(model: SmallCNN, n: int, probes, repeats: int) -> float:
    """Seconds (best of `repeats`) for the two convolutions alone of n copies over the probes,
    with the very kernels and block sizes SmallCNN.forward_copies uses (first layer: one
    matmul over the shared patches, second: oneDNN on channels-last input): a floor for any
    engine built on PyTorch's CPU kernels, however it arranges everything else."""
    x = probes.tensors["x"]
    w1 = model.features[0].weight.detach().flatten(1)
    w2, b2 = model.features[3].weight.detach(), model.features[3].bias.detach()
    k = model.features[0].kernel_size[0]
    pooled = (x.shape[-1] - k + 1) // 2
    blocks = x.tensor_split(-(-len(x) // model.COPY_BLOCK))
    cols = [pool_window_patches(b, k) for b in blocks]
    maps = [
        torch.rand(len(b), w2.shape[1], pooled, pooled).contiguous(
            memory_format=torch.channels_last
        )
        for b in blocks
    ]

    @torch.no_grad()
    def convolutions() -> None:
        for _ in range(n):
            for c, h in zip(cols, maps, strict=True):
                torch.matmul(c, w1.t())
                torch.nn.functional.conv2d(h, w2, b2)

    return best_of(repeats, convolutions)[0]


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,200", help="N = M values")
    parser.add_argument("--steps", default="1,5", help="K values")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "eif_batched.json")
    )
    args = parser.parse_args()

    model, origin = reference_model()
    task = ClassificationTask(num_classes=10)
    peak = peak_gflops()
    print(f"peak float32 matmul: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    target = FASHION_CLASSES.index("Sneaker")
    rows = []
    warm = take_per_class(load_mnist_subset(), 1)
    warm_items = task.examples(warm.images, torch.full((len(warm),), target), warm.ids)
    for engine in ("naive", "batched"):  # first calls pay one-off allocation/dispatch costs
        EmpiricalInfluence(task, engine=engine, progress=False).score(model, warm_items, warm_items)
    for n in (int(s) for s in args.sizes.split(",")):
        digits = take_per_class(load_mnist_subset(), n // 10)
        items = task.examples(digits.images, torch.full((len(digits),), target), digits.ids)
        for k in (int(s) for s in args.steps.split(",")):
            common = dict(steps=k, lr=args.lr, optimizer="sgd", progress=False)
            naive_method = EmpiricalInfluence(task, engine="naive", **common)
            batched_method = EmpiricalInfluence(task, chunk_size=args.chunk_size, **common)
            t_naive, naive = best_of(args.repeats, partial(naive_method.score, model, items, items))
            t_batched, batched = best_of(
                args.repeats, partial(batched_method.score, model, items, items)
            )
            floor = measurement_floor(model, task, len(items), items, args.repeats)
            conv = convolution_floor(model, len(items), items, args.repeats)
            diff = float(abs(naive.values - batched.values).max())
            flops = forward_flops(lambda items=items: measure(model, task, items.tensors))
            roofline = len(items) * flops / (peak * 1e9)
            rows.append(
                {
                    "N": len(items),
                    "M": len(items),
                    "K": k,
                    "naive_s": round(t_naive, 3),
                    "batched_s": round(t_batched, 3),
                    "speedup": round(t_naive / t_batched, 2),
                    "floor_s": round(floor, 3),
                    "bound": round(t_naive / floor, 2),
                    "conv_floor_s": round(conv, 3),
                    "conv_bound": round(t_naive / conv, 2),
                    "forward_gflop": round(flops / 1e9, 4),
                    "roofline_s": round(roofline, 3),
                    "roofline_bound": round(t_naive / roofline, 2),
                    "max_abs_diff": diff,
                }
            )
            r = rows[-1]
            print(
                f"N=M={r['N']:4d} K={k}  naive {r['naive_s']:7.2f}s  batched {r['batched_s']:6.2f}s  "
                f"x{r['speedup']:5.2f}  floor {floor:6.2f}s (bound x{r['bound']:5.2f})  "
                f"conv floor {conv:5.2f}s (x{r['conv_bound']:5.2f})  "
                f"roofline {roofline:5.2f}s (x{r['roofline_bound']:5.2f})  "
                f"max|diff| {diff:.2e}",
                flush=True,
            )
    result = {
        "benchmark": "eif_batched",
        "model": origin,
        "optimizer": "sgd",
        "lr": args.lr,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "peak_gflops": round(peak, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
