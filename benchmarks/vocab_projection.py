"""Seconds of `prefix_pack.edge_log_probs` with the vocabulary projection in tiles vs whole.

The LoRA engine's packed measurement ends with log softmax(head(h))[token] for every scored
(context, token) pair. "whole" projects each block of `--rows` positions onto the entire
vocabulary in one matmul and takes the logsumexp of those [rows, V] logits afterwards
(`vocab` = V: one tile per block); "tiles" projects [rows, 1024] tiles and takes each tile's
logsumexp while it is in cache, then combines them (the default). Both run the same function
on the same inputs, interleaved, best of --repeats; their results must agree to float32
rounding (checked). The head is SmolLM2's tied embedding when the default model loads, else
a random [49152, 576] matrix.
Run: `.venv/bin/python benchmarks/vocab_projection.py [--positions 4096 --rows 512]`.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from datafluence.finetune.prefix_pack import HEAD_ROWS, HEAD_VOCAB, edge_log_probs
from datafluence.runtime import tune_allocator
from datafluence.store import atomic_write_json


def vocabulary_head() -> tuple[torch.nn.Module, str]:
    """SmolLM2's output projection, or a random one of the same shape."""
    try:
        from datafluence.models.language import load_causal_lm

        model, _ = load_causal_lm(None, progress=False)
        return model.get_output_embeddings(), "SmolLM2-135M-Instruct"
    except Exception as err:  # noqa: BLE001 - the benchmark still runs on a random head
        print(f"default model unavailable ({err}); using a random head")
        head = torch.nn.Linear(576, 49152, bias=False).requires_grad_(False)
        return head, "random [49152, 576]"


def main() -> None:
    tune_allocator()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=4096, help="projected positions")
    parser.add_argument("--rows", type=int, default=HEAD_ROWS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "vocab_projection.json")
    )
    args = parser.parse_args()
    head, origin = vocabulary_head()
    vocab, d = head.weight.shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.positions, d, generator=g)
    edges = 2 * args.positions  # about the benchmark probes' edges per position, doubled
    context = torch.randint(0, args.positions, (edges,), generator=g)
    tokens = torch.randint(0, vocab, (edges,), generator=g)
    variants = {"whole": vocab, "tiles": HEAD_VOCAB}
    best = dict.fromkeys(variants, float("inf"))
    out = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, width in variants.items():
                start = time.perf_counter()
                out[name] = edge_log_probs(head, hidden, context, tokens, args.rows, width)
                best[name] = min(best[name], time.perf_counter() - start)
    diff = float((out["whole"] - out["tiles"]).abs().max())
    scale = float(out["whole"].abs().max())
    if diff > 1e-5 * max(1.0, scale):
        raise SystemExit(f"tiled and whole projections disagree by {diff:.1e}")
    gflop = 2 * args.positions * d * vocab / 1e9
    print(f"head {origin}: {vocab} x {d}; {args.positions} positions in blocks of {args.rows}")
    for name, width in variants.items():
        print(
            f"{name:6s} (vocabulary tile {width:6d}): {best[name]:6.3f} s "
            f"({gflop / best[name]:5.1f} GFLOP/s of projection)"
        )
    ratio = best["whole"] / best["tiles"]
    print(f"tiles are {ratio:.2f}x faster; max abs diff {diff:.1e}")
    atomic_write_json(
        args.out,
        {
            "benchmark": "vocab_projection",
            "head": origin,
            "positions": args.positions,
            "rows": args.rows,
            "tile_vocab": HEAD_VOCAB,
            "whole_s": round(best["whole"], 4),
            "tiles_s": round(best["tiles"], 4),
            "speedup": round(ratio, 2),
            "max_abs_diff": diff,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
