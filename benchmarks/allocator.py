"""glibc's default allocator vs `datafluence.runtime.tune_allocator`, each in a fresh process.

Every row runs twice, each time in a new Python process, once as is and once after
`tune_allocator()`, on the same seeded inputs, and reports seconds (best of --repeats),
minor page faults, and the ratio. Nothing else differs, so the numbers must agree exactly,
and the script checks that they do.
Run: `.venv/bin/python benchmarks/allocator.py`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
mode, repeats, only = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "tuned":
    from datafluence.runtime import tune_allocator
    assert tune_allocator()
from datafluence.methods import EmpiricalInfluence
from datafluence.models import SmallCNN
from datafluence.tasks import ClassificationTask

torch.manual_seed(0)
model = SmallCNN().eval()
task = ClassificationTask(num_classes=10)
out = {}
workloads = []

def timed(name, fn):
    workloads.append(name)
    if len(workloads) - 1 != only:
        return
    fn()
    best, faults = float("inf"), 0
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    out[name] = {"s": best, "faults": faults, "check": float(value)}

for m in (100, 200):
    x = torch.rand(m, 1, 28, 28, generator=torch.Generator().manual_seed(m))
    def floor(x=x, m=m):
        with torch.no_grad():
            return sum(torch.log_softmax(model(x), -1)[:, 7].sum() for _ in range(m))
    timed(f"{m} CNN forwards over {m} images", floor)

x = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(1))
items = task.examples(x, torch.full((100,), 7))
for engine in ("naive", "batched"):
    method = EmpiricalInfluence(task, engine=engine, steps=1, lr=1e-3, progress=False)
    timed(f"EIF {engine}, N=M=100, K=1", lambda: method.score(model, items, items).values.sum())
print(json.dumps(out))
"""


def child(mode: str, repeats: int, only: int) -> dict:
    """Workload number `only` alone in a new process (empty past the last one): what any
    earlier work allocated would otherwise change glibc's thresholds for the next."""
    run = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(repeats), str(only)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "allocator.json"))
    args = parser.parse_args()

    plain, tuned = {}, {}
    for only in itertools.count():
        done = child("plain", args.repeats, only)
        if not done:
            break
        plain.update(done)
        tuned.update(child("tuned", args.repeats, only))
    rows = []
    print(
        f"{'workload':38s} {'plain':>8s} {'tuned':>8s} {'ratio':>6s} {'faults plain':>13s} "
        f"{'faults tuned':>13s}"
    )
    for name in plain:
        a, b = plain[name], tuned[name]
        if a["check"] != b["check"]:
            raise SystemExit(f"{name}: results differ ({a['check']} vs {b['check']})")
        row = {
            "workload": name,
            "plain_s": round(a["s"], 3),
            "tuned_s": round(b["s"], 3),
            "ratio": round(a["s"] / b["s"], 2),
            "faults_plain": a["faults"],
            "faults_tuned": b["faults"],
        }
        rows.append(row)
        print(
            f"{name:38s} {row['plain_s']:7.3f}s {row['tuned_s']:7.3f}s {row['ratio']:5.2f}x "
            f"{a['faults']:13d} {b['faults']:13d}"
        )
    from datafluence.store import atomic_write_json

    atomic_write_json(
        args.out,
        {
            "benchmark": "allocator",
            "repeats": args.repeats,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "libc": " ".join(platform.libc_ver()),
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
