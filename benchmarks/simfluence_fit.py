"""Simfluence fitting and prediction: time, memory, vectorised vs per-test-example loop.

Runs come from a known linear simulator (plus noise), so no training is timed: only what
the simulators cost. One axis grows at a time from a base of pool 200, 16 runs, 20 test
examples (32 steps of 8 examples): pool 200 -> 2,000, runs 16 -> 64, test examples
20 -> 200. For each, every simulator is fitted with the default λ grid (6 values, the last
2 runs choose λ, then a refit): wall time, peak memory of the fit (tracemalloc, numpy
allocations), the solver the fit chose, and the same fit as a Python loop over test
examples (ratio = loop / vectorised; max |Δ| of the parameters where both chose one λ).
A pool of 50 is added to show where vectorising pays most: small systems, many test
examples. With large systems the per-test-example O(d³) solves dominate both ways.
Prediction throughput is curricula per second for a batch of 256 curricula rolled out by
the fitted linear simulator.

BLAS threads default to 1 (`--threads`): on a machine shared with other jobs, OpenBLAS
threads waiting on each other make a multi-threaded solve 10-40x slower and the numbers
meaningless. Run: `.venv/bin/python benchmarks/simfluence_fit.py` (~40 s on 2 quiet cores).

`--lm RUN_DIR` instead runs the experiment's reduced language-model setting once (LoRA on
SmolLM2-135M, ~10 min on 2 cores) and stores its table under "lm_run" in the same JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

_parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_parser.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP threads")
_parser.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
_parser.add_argument("--no-loop", action="store_true", help="skip the per-test-example loop")
_parser.add_argument(
    "--lm",
    metavar="RUN_DIR",
    default=None,
    help="instead: run the reduced language-model experiment (SimfluenceConfig.for_lm(): "
    "SmolLM2-135M + LoRA, 48 texts, 13 runs of 8 steps) into RUN_DIR and add it to the JSON",
)
_parser.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(__file__), "results", "simfluence_fit.json"),
)
ARGS = _parser.parse_args() if __name__ == "__main__" else _parser.parse_args([])
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)  # before numpy loads its BLAS

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from datafluence.runtime import tune_allocator  # noqa: E402
from datafluence.simfluence import (  # noqa: E402
    DEFAULT_LAMBDAS,
    make_simulator,
    random_curricula,
    rollout,
)
from datafluence.store import atomic_write_json  # noqa: E402

T, B = 32, 8
VAL_RUNS = 2
BASE = {"pool": 200, "runs": 16, "test": 20}
AXES = {"pool": (50, 200, 500, 1000, 2000), "runs": (16, 32, 64), "test": (20, 50, 200)}
QUICK_AXES = {"pool": (200, 500), "runs": (16, 32), "test": (20, 50)}
KINDS = ("additive", "multiplicative", "linear")
N_PREDICT = 256


def synthetic_runs(n_pool: int, n_runs: int, n_test: int, seed: int = 0):
    """Runs of a known linear simulator: each run sees a random half of the pool."""
    rng = np.random.default_rng(seed)
    a = 1.0 / B + 0.01 * rng.normal(size=(n_pool, n_test))
    b = -0.01 + 0.02 * rng.normal(size=(n_pool, n_test))
    c = random_curricula(n_pool, n_runs, T, B, subset_size=n_pool // 2, seed=seed + 1)
    losses = rollout(a, b, c, rng.uniform(1.0, 3.0, size=(n_runs, n_test)))
    losses += 0.01 * rng.normal(size=losses.shape)
    return c, losses


def fit(kind: str, c: np.ndarray, losses: np.ndarray, pool_ids):
    return make_simulator(kind, lam=DEFAULT_LAMBDAS).fit(c, losses, pool_ids, val_runs=VAL_RUNS)


def timed_fit(kind: str, c, losses, pool_ids):
    start = time.perf_counter()
    sim = fit(kind, c, losses, pool_ids)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fit(kind, c, losses, pool_ids)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return sim, seconds, peak / 2**20


def loop_fit(kind: str, c, losses, pool_ids):
    """The same fit, one test example at a time (what the vectorised path replaces)."""
    start = time.perf_counter()
    params = []
    for z in range(losses.shape[2]):
        sim = fit(kind, c, losses[:, :, z : z + 1], pool_ids)
        params.append((sim.A_, sim.B_, sim.lam_))
    return time.perf_counter() - start, params


def max_param_diff(sim, params) -> float:
    """Largest |Δ| between the vectorised parameters and the loop's (per-z λ may differ)."""
    worst = 0.0
    for z, (a, b, lam) in enumerate(params):
        if lam != sim.lam_:  # each z chose its own λ: compare only where both chose the same
            continue
        for ours, theirs in ((sim.A_, a), (sim.B_, b)):
            if ours is not None:
                worst = max(worst, float(np.abs(ours[:, z] - theirs[:, 0]).max()))
    return worst


def throughput(sim, n_pool: int, n_test: int, pool_ids) -> float:
    c = random_curricula(n_pool, N_PREDICT, T, B, subset_size=n_pool // 2, seed=99)
    l0 = np.ones((N_PREDICT, n_test))
    sim.predict(c[:8], l0[:8], pool_ids)  # warm up
    start = time.perf_counter()
    sim.predict(c, l0, pool_ids)
    return N_PREDICT / (time.perf_counter() - start)


def markdown(table: pd.DataFrame) -> str:
    """A GitHub table (pandas' to_markdown needs the optional tabulate package)."""
    cells = [list(map(str, table.columns))] + [list(map(str, r)) for r in table.to_numpy()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def configs(axes):
    seen = set()
    for axis, values in axes.items():
        for value in values:
            setting = {**BASE, axis: value}
            key = tuple(setting.values())
            if key not in seen:
                seen.add(key)
                yield axis, setting


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    rows = []
    axes = QUICK_AXES if ARGS.quick else AXES
    for axis, setting in configs(axes):
        n_pool, n_runs, n_test = setting["pool"], setting["runs"], setting["test"]
        c, losses = synthetic_runs(n_pool, n_runs, n_test)
        pool_ids = [f"p{i}" for i in range(n_pool)]
        for kind in KINDS:
            sim, seconds, peak = timed_fit(kind, c, losses, pool_ids)
            row = {
                "axis": axis,
                "pool": n_pool,
                "runs": n_runs,
                "test": n_test,
                "simulator": kind,
                "solver": sim.solver_,
                "fit_s": seconds,
                "peak_MiB": peak,
                "loop_s": np.nan,
                "speedup": np.nan,
                "max_abs_diff": np.nan,
                "predict_curricula_per_s": throughput(sim, n_pool, n_test, pool_ids),
            }
            if not ARGS.no_loop:
                loop_s, params = loop_fit(kind, c, losses, pool_ids)
                row.update(
                    loop_s=loop_s,
                    speedup=loop_s / seconds,
                    max_abs_diff=max_param_diff(sim, params),
                )
            rows.append(row)
            print(
                f"{axis:>5} pool={n_pool:<5} runs={n_runs:<3} test={n_test:<4} {kind:<15}"
                f"{seconds:8.2f}s {peak:8.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
    table = pd.DataFrame(rows)
    show = table.copy()
    for col, fmt in (
        ("fit_s", "{:.3f}"),
        ("loop_s", "{:.2f}"),
        ("speedup", "{:.1f}x"),
        ("peak_MiB", "{:.1f}"),
        ("max_abs_diff", "{:.1e}"),
        ("predict_curricula_per_s", "{:,.0f}"),
    ):
        show[col] = [fmt.format(v) if np.isfinite(v) else "-" for v in table[col]]
    print(markdown(show.drop(columns="axis")))
    previous = _previous()
    atomic_write_json(
        ARGS.out,
        {
            **({"lm_run": previous["lm_run"]} if "lm_run" in previous else {}),
            "benchmark": "simfluence_fit",
            "steps": T,
            "batch_size": B,
            "lambdas": list(DEFAULT_LAMBDAS),
            "val_runs": VAL_RUNS,
            "threads": ARGS.threads,
            "machine": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
            },
            "rows": table.replace({np.nan: None}).to_dict(orient="records"),
        },
    )
    print(f"\nwritten to {ARGS.out}")


def _previous() -> dict:
    return json.loads(open(ARGS.out).read()) if os.path.exists(ARGS.out) else {}


def lm_main() -> None:
    """The reduced LM run of the experiment: its held-out table and counterfactual checks."""
    from datafluence.experiments.simfluence import (
        SimfluenceConfig,
        counterfactual_table,
        run,
        summary_table,
    )

    config = SimfluenceConfig.for_lm()
    resumed = os.path.exists(os.path.join(ARGS.lm, "collection"))
    metrics = run(ARGS.lm, config, progress=False, threads=ARGS.threads, log=lambda _: None)
    table = summary_table(metrics).reset_index()
    print(markdown(table))
    print()
    print(markdown(counterfactual_table(metrics).round(3).reset_index()))
    result = {
        "config": config.to_dict(),
        "setup": metrics["setup"],
        "evaluation": metrics["evaluation"],
        "lambda": metrics["lambda"],
        "finding": metrics["finding"],
        "counterfactuals_linear": {
            name: {"edit": entry["edit"], **entry["linear"]}
            for name, entry in metrics["counterfactuals"].items()
        },
        "timings": metrics["timings"],
        "resumed": resumed,  # then the timings cover only what this invocation computed
        "threads": ARGS.threads,
    }
    atomic_write_json(ARGS.out, {**_previous(), "lm_run": result})
    print(f"\nadded to {ARGS.out} under 'lm_run'")


if __name__ == "__main__":
    lm_main() if ARGS.lm else main()
