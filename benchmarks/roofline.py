"""The compute roofline of an exact EIF engine, measured on the machine the benchmark runs on.

Exact empirical influence needs every fine-tuned copy's forward over every probe: N forwards
of the model over M probes, whatever the engine does with its fine-tuning. `forward_flops`
counts one such forward (torch's FlopCounterMode: matmuls and convolutions, 2 per
multiply-add) and `peak_gflops` measures the best float32 matmul rate of this machine at
the current thread count, so

    roofline_s = N * forward_flops / peak        (fine-tuning counted as free)
    roofline bound = naive_s / roofline_s

is the largest speed-up over the naive loop that any exact engine could show here, even one
whose every forward ran at peak matmul speed. Imported by the EIF benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def peak_gflops(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 3) -> float:
    """Best float32 GEMM rate (GFLOP/s) over a few square sizes, best of `repeats` each."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up: threads, allocator
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions that `fn()` runs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
