"""Assemble score rows chunk by chunk, in memory or as resumable partitions of a run.

A chunk returns per-layer scores [B, L, Q]; the total is their sum, so per-layer parts add
up to the values by construction. With a run directory, each chunk is saved as it finishes
(RunDir.partitioned) into one memory-mapped file laid out [total | layer 1 | ... | layer L],
so the train x query matrix never has to sit in memory. Under torchrun the chunks are
shared out across ranks (distributed.shard) and every rank gets the whole result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from datafluence import distributed, store
from datafluence.store import RunDir
from datafluence.tasks import Examples


def assemble(
    train: Examples,
    queries: Examples,
    n_layers: int,
    chunk_size: int,
    compute: Callable[[int, int], Tensor],
    *,
    method: str,
    key: Mapping[str, Any],
    run: RunDir | None = None,
    per_layer: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(values [n_train, n_query], per-layer parts [n_layers, n_train, n_query] or None).

    Partitions are named by `method` and a fingerprint of `key` (what else fixes the
    numbers: settings, model) plus the examples' values, so they are never reused for
    other settings, weights or data.
    """
    n_rows, n_cols = len(train), len(queries)
    name = f"{method}-" + store.fingerprint(
        {
            **key,
            "train": store.examples_fingerprint(train),
            "queries": store.examples_fingerprint(queries),
            "per_layer": per_layer,
        }
    )

    def block(lo: int, hi: int) -> np.ndarray:
        parts = compute(lo, hi).double().cpu().numpy()  # [B, L, Q]
        total = parts.sum(axis=1, dtype=np.float64)
        if not per_layer:
            return total.astype(np.float32)
        return np.concatenate([total, parts.reshape(hi - lo, -1)], axis=1).astype(np.float32)

    width = n_cols * (1 + n_layers) if per_layer else n_cols
    if run is None:  # under torchrun: each rank its share of the chunks, then all-gathered
        starts = range(0, n_rows, chunk_size)
        mine = distributed.shard(len(starts))
        quiet = not progress or not distributed.is_main()
        bar = tqdm(mine, desc=name, unit="chunk", disable=quiet, leave=False)
        done = distributed.gather(
            {i: block(starts[i], min(starts[i] + chunk_size, n_rows)) for i in bar}
        )
        rows = np.concatenate([done[i] for i in range(len(starts))])
    else:
        run.path.mkdir(parents=True, exist_ok=True)
        rows = run.partitioned(
            name,
            n_rows,
            width,
            chunk_size,
            block,
            desc=name,
            progress=progress,
            dest=run.path / "partitions" / name / "assembled.npy",  # drop_partitions frees it
        )
    values = rows[:, :n_cols]
    if not per_layer:
        return values, None
    parts = rows[:, n_cols:].reshape(n_rows, n_layers, n_cols).transpose(1, 0, 2)
    return values, parts
