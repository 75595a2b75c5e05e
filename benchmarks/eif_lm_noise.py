"""How reproducible is learned LM EIF in float32 at all? (issue: language models, §2).

The batched engine must equal the one-at-a-time loop "to 1e-4 (float32)". This script
measures the yardstick: the same reference loop (peft + torch.optim, Adam) run twice with
different thread counts, and the batched engine run twice with different chunkings. Only
the order of float32 sums changes between the two runs of a pair; whatever they differ by
is the float32 noise floor of the computation, below which no two implementations can be
expected to agree. Also reports the batched-vs-loop difference for comparison. With
`--dtype float64` the same comparison runs on the model in float64, where rounding no longer
hides an engine error: the pairs must then agree far below 1e-4. `--text` restricts the
training set to one sentence (e.g. the N = 64 set's most sensitive one).
Run: `.venv/bin/python benchmarks/eif_lm_noise.py [--n 16 --probes 64 --steps 5]`.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from eif_lm_batched import sentences  # same texts as the speed benchmark

from datafluence.experiments.knowledge_domains import LORA_TARGETS
from datafluence.methods import EmpiricalInfluence
from datafluence.models.language import load_causal_lm
from datafluence.runtime import tune_allocator
from datafluence.store import atomic_write_json
from datafluence.tasks import CausalLMTask


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16, help="training texts")
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--text", default=None, help="train on this one sentence only")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "eif_lm_noise.json")
    )
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(None, progress=False)
    model = model.to(getattr(torch, args.dtype))
    task = CausalLMTask(tokenizer)
    texts = sentences(tokenizer, args.n + args.probes)
    chosen = [args.text] if args.text else texts[: args.n]
    train = task.examples(chosen, ids=[f"t{i}" for i in range(len(chosen))])
    probes = task.examples(texts[-args.probes :], ids=[f"q{i}" for i in range(args.probes)])
    recipe = dict(
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        lora_rank=8,
        lora_targets=LORA_TARGETS,
        progress=False,
    )

    def run(engine: str, threads: int, chunk: int):
        torch.set_num_threads(threads)
        method = EmpiricalInfluence(task, engine=engine, chunk_size=chunk, **recipe)
        return method.score(model, train, probes).values

    loop_a, loop_b = run("naive", 2, 16), run("naive", 1, 16)
    n = len(train)
    batched_a, batched_b = run("batched", 2, n), run("batched", 2, max(1, n // 2))

    def diff(x, y) -> float:
        return float(abs(x - y).max())

    result = {
        "benchmark": "eif_lm_noise",
        "N": n,
        "text": args.text,
        "dtype": args.dtype,
        "M": args.probes,
        "K": args.steps,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "max_abs_eif": float(abs(loop_a).max()),
        "loop_2_threads_vs_1_thread": diff(loop_a, loop_b),
        "batched_chunk_n_vs_half": diff(batched_a, batched_b),
        "batched_vs_loop": diff(batched_a, loop_a),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    for key in ("loop_2_threads_vs_1_thread", "batched_chunk_n_vs_half", "batched_vs_loop"):
        print(f"{key:28s} max |diff| {result[key]:.1e}")
    print(f"(max |EIF| {result['max_abs_eif']:.2f})")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
