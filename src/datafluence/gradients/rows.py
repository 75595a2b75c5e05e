"""Assemble score rows chunk by chunk, in memory or as resumable partitions of a run.

A chunk returns per-layer scores [B, L, Q]; the total is their sum, so per-layer parts add
up to the values by construction. With a run directory, each chunk is saved as it finishes
(RunDir.partitioned) into one memory-mapped file laid out [total | layer 1 | ... | layer L],
so the train x query matrix never has to sit in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from datafluence.store import RunDir


def assemble(
    n_rows: int,
    n_cols: int,
    n_layers: int,
    chunk_size: int,
    compute: Callable[[int, int], Tensor],
    run: RunDir | None = None,
    name: str = "rows",
    per_layer: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(values [n_rows, n_cols], per-layer parts [n_layers, n_rows, n_cols] or None)."""

    def block(lo: int, hi: int) -> np.ndarray:
        parts = compute(lo, hi).double().cpu().numpy()  # [B, L, Q]
        total = parts.sum(axis=1, dtype=np.float64)
        if not per_layer:
            return total.astype(np.float32)
        return np.concatenate([total, parts.reshape(hi - lo, -1)], axis=1).astype(np.float32)

    width = n_cols * (1 + n_layers) if per_layer else n_cols
    if run is None:
        starts = range(0, n_rows, chunk_size)
        rows = np.concatenate(
            [
                block(lo, min(lo + chunk_size, n_rows))
                for lo in tqdm(starts, desc=name, unit="chunk", disable=not progress, leave=False)
            ]
        )
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
            dest=run.path / f"{name}.npy",
        )
    values = rows[:, :n_cols]
    if not per_layer:
        return values, None
    parts = rows[:, n_cols:].reshape(n_rows, n_layers, n_cols).transpose(1, 0, 2)
    return values, parts
