"""Batched learned EIF (multi-adapter LoRA) vs the one-at-a-time loop (a deep copy wrapped
by peft, torch.optim) on the default small LM (issue: language models, §6).

Training texts and probes are knowledge-domain sentences (fresh nonce words). The table
reports seconds, the speed ratio, the max abs difference of the two matrices, and the
measurement floor: N ordinary forwards of the base model over the M probes, which any exact
engine that measures each copy with ordinary forwards must spend (bound = naive / floor is
the best ratio such an engine can reach, however cheap its fine-tuning). It also prints the
float32 noise of the measurement itself (same weights, probes measured in one batch vs one
at a time), the scale below which the two engines cannot be expected to agree, and the
compute roofline (benchmarks/roofline.py): the N base-model forwards' FLOPs at this machine's
peak matmul rate, each probe counted alone at its own length, the time no engine that runs
each probe as its own sequence can beat here (roofline bound = naive / roofline). Prefix
packing shares prefixes between probes, so the batched engine's own FLOPs are below it.
Run: `.venv/bin/python benchmarks/eif_lm_batched.py [--sizes 16,64 --steps 1,5]`.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from roofline import forward_flops, peak_gflops

from datafluence.datasets.domains import available_domains, instantiate, load_domain
from datafluence.experiments.knowledge_domains import LORA_TARGETS
from datafluence.finetune import measure
from datafluence.finetune.prefix_pack import pack_probes
from datafluence.methods import EmpiricalInfluence
from datafluence.models.language import load_causal_lm
from datafluence.runtime import tune_allocator
from datafluence.store import atomic_write_json
from datafluence.tasks import CausalLMTask


def sentences(tokenizer, n: int) -> list[str]:
    """n distinct domain sentences from as many instantiations as needed."""
    out: list[str] = []
    seed = 0
    while len(out) < n:
        for name in available_domains():
            for inst in instantiate(load_domain(name), tokenizer, 1, seed=seed):
                out += [t for t in inst.texts.values() if t not in out]
        seed += 1
    return out[:n]


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="local HF causal-LM folder (default SmolLM2)")
    parser.add_argument("--sizes", default="16,64", help="N training texts")
    parser.add_argument("--probes", type=int, default=64, help="M probes")
    parser.add_argument("--steps", default="1,5", help="K values")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 on a shared machine)"
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "eif_lm_batched.json")
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_causal_lm(args.model, progress=False)
    task = CausalLMTask(tokenizer)
    sizes = [int(s) for s in args.sizes.split(",")]
    texts = sentences(tokenizer, max(sizes) + args.probes)
    probes = task.examples(texts[-args.probes :], ids=[f"q{i}" for i in range(args.probes)])
    # float32 noise floor of the measurement itself: the same weights measured in one batch
    # of M and one probe at a time (summation orders differ) already disagree by this much
    together = measure(model, task, probes.tensors)
    alone = torch.cat([measure(model, task, probes[i : i + 1].tensors) for i in range(len(probes))])
    layout_noise = float((together - alone).abs().max())
    print(f"measurement layout noise (same weights, batch {len(probes)} vs 1): {layout_noise:.1e}")
    pack = pack_probes(probes.tensors, int(tokenizer.pad_token_id))
    packing = {
        "tokens": int(probes.tensors["attention_mask"].sum()),
        "padded_positions": int(probes.tensors["attention_mask"].numel()),
        "row_positions": int(pack.input_ids.numel()),
        "projected_positions": int(pack.edge_node.unique().numel()),
        "scored_edges": len(pack.edge_node),
    }
    print(
        "prefix packing: {row_positions} row positions ({tokens} tokens, {padded_positions} "
        "padded), {projected_positions} projected positions for {scored_edges} scored "
        "(context, token) pairs".format(**packing)
    )
    peak = peak_gflops()
    padded = forward_flops(lambda: measure(model, task, probes.tensors))
    # the roofline counts each probe at its own length: padding is work an engine can skip
    flops = sum(
        forward_flops(lambda i=i: measure(model, task, probes[i : i + 1].tensors))
        for i in range(len(probes))
    )
    print(
        f"peak float32 matmul: {peak:.0f} GFLOP/s; one forward over the {len(probes)} probes: "
        f"{flops / 1e9:.1f} GFLOP unpadded, {padded / 1e9:.1f} GFLOP padded to the longest "
        f"({torch.get_num_threads()} threads)"
    )
    rows = []
    for n in sizes:
        train = task.examples(texts[:n], ids=[f"t{i}" for i in range(n)])
        for k in (int(s) for s in args.steps.split(",")):
            recipe = dict(
                steps=k,
                lr=args.lr,
                optimizer="adam",
                lora_rank=args.lora_rank,
                lora_targets=LORA_TARGETS,
                progress=False,
            )
            timings, results = {}, {}
            for engine in ("naive", "batched"):
                method = EmpiricalInfluence(
                    task, engine=engine, chunk_size=args.chunk_size, probe_chunk_size=256, **recipe
                )
                start = time.perf_counter()
                results[engine] = method.score(model, train, probes)
                timings[engine] = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(n):  # the measurement floor: n ordinary forwards over the probes
                for lo in range(0, len(probes), 256):
                    measure(model, task, probes[lo : lo + 256].tensors)
            floor = time.perf_counter() - start
            diff = float(abs(results["naive"].values - results["batched"].values).max())
            roofline = n * flops / (peak * 1e9)
            row = {
                "N": n,
                "M": args.probes,
                "K": k,
                "naive_s": round(timings["naive"], 2),
                "batched_s": round(timings["batched"], 2),
                "speedup": round(timings["naive"] / timings["batched"], 2),
                "floor_s": round(floor, 2),
                "bound": round(timings["naive"] / floor, 2),
                "roofline_s": round(roofline, 2),
                "roofline_bound": round(timings["naive"] / roofline, 2),
                "max_abs_diff": diff,
                "max_abs_eif": float(abs(results["naive"].values).max()),
            }
            rows.append(row)
            print(
                f"N={n:3d} M={args.probes} K={k}  naive {row['naive_s']:8.1f}s  "
                f"batched {row['batched_s']:7.1f}s  x{row['speedup']:5.2f}  "
                f"floor {floor:7.1f}s (bound x{row['bound']:5.2f})  "
                f"roofline {roofline:6.1f}s (x{row['roofline_bound']:5.2f})  "
                f"max|diff| {diff:.1e} (max|EIF| {row['max_abs_eif']:.2f})",
                flush=True,
            )
    atomic_write_json(
        args.out,
        {
            "benchmark": "eif_lm_batched",
            "model": args.model or "SmolLM2-135M-Instruct (GGUF, dequantized)",
            "optimizer": "adam",
            "lr": args.lr,
            "lora_rank": args.lora_rank,
            "lora_targets": list(LORA_TARGETS),
            "measurement_layout_noise": layout_noise,
            "packing": packing,
            "peak_gflops": round(peak, 1),
            "forward_gflop": round(flops / 1e9, 2),
            "forward_gflop_padded": round(padded / 1e9, 2),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
