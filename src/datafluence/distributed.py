"""Several processes (torchrun): who computes which partition, and when to wait for the others.

Without an initialised process group everything behaves as one process (rank 0 of 1), so
library code calls these helpers unconditionally and a single-process run takes exactly the
path it always took. Under `torchrun` the CLI calls `init_from_env()` once.

Sharding rule: of the partitions 0..n-1 of a job, rank r computes those with index % world
== r. The rule depends only on the partition layout, never on which partitions happen to be
on disk, so the ranks agree without talking and a resumed run splits the rows as before.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes shared files (meta, curvature, final scores)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if world_size() > 1:
        dist.barrier()


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group torchrun describes in the environment; True when several
    processes run.

    A no-op outside torchrun (no RANK / WORLD_SIZE in the environment) or when a group is
    already initialised. Backend: gloo for CPU work, nccl when `device` is CUDA (each rank
    then uses the GPU LOCAL_RANK).
    """
    if _active():
        return world_size() > 1
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; start several "
            "processes with `torchrun --nproc_per_node N ...`, or unset RANK and WORLD_SIZE "
            "for a single process"
        )
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_shutdown)
    return world_size() > 1


def _shutdown() -> None:
    if _active():
        dist.destroy_process_group()


def shard(n: int) -> range:
    """Indices of the n partitions of a job that this rank computes."""
    return range(rank(), n, world_size())


def gather(mine: dict[int, T]) -> dict[int, T]:
    """Every rank's {partition index: result}, merged, on every rank (pickled through the
    process group: for results that are not written to a shared run directory)."""
    if world_size() == 1:
        return dict(mine)
    parts: list[dict[int, T] | None] = [None] * world_size()
    dist.all_gather_object(parts, mine)
    return {i: value for part in parts for i, value in (part or {}).items()}


@contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the others: rank 0 creates or fits what the
    rest then find on disk (a run directory's meta.json, a cached model, saved curvature).
    The body must not wait for the other ranks itself (no barrier, no sharded partitions):
    they are still waiting for it to end."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
