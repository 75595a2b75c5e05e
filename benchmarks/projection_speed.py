"""Seconds of RandomProjection.project on the SmallCNN's layers, beside the earlier scheme.

Per-example gradients of the four SmallCNN layers (80,202 parameters with biases) are
projected chunk by chunk (32 examples, as TRAK / TracIn / gradient similarity call it) for
1,000 examples. "earlier" re-implements the scheme before its cache held int8 signs: int64
draws turned into float32 matrices, 128 MiB of them cached, the rest drawn again at every
call. Both must give the same numbers bit for bit (checked). Run:
`.venv/bin/python benchmarks/projection_speed.py [--examples 1000 --dim 2048 --threads 2]`.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time

import torch
from torch import Tensor

from datafluence.gradients.projection import RandomProjection
from datafluence.gradients.space import ParamSpace
from datafluence.models.cnn import SmallCNN
from datafluence.runtime import tune_allocator


class EarlierProjection(RandomProjection):
    """The earlier block scheme: float32 blocks from int64 draws, 2^25 entries cached."""

    def _block(self, name: str, block: int, width: int) -> Tensor:
        key = (name, block)
        if key in self._cache:
            return self._cache[key]
        digest = hashlib.sha256(f"{self.seed}/{name}/{block}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if self.kind == "gaussian":
            m = torch.randn(self.dim, width, generator=gen)
        else:
            m = torch.randint(0, 2, (self.dim, width), generator=gen).float().mul_(2).sub_(1)
        m.div_(math.sqrt(self.dim))
        if self._cached + m.numel() <= 1 << 25:
            self._cache[key] = m
            self._cached += m.numel()
        return m

    def project(self, name: str, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        width = max(1, (1 << 22) // self.dim)
        out = x.new_zeros(x.shape[0], self.dim)
        for block, lo in enumerate(range(0, x.shape[1], width)):
            hi = min(lo + width, x.shape[1])
            out += x[:, lo:hi] @ self._block(name, block, hi - lo).to(x.device, x.dtype).T
        return out


def run(projector: RandomProjection, grads: dict[str, Tensor], n: int, chunk: int) -> Tensor:
    out = []
    for lo in range(0, n, chunk):
        b = min(chunk, n - lo)
        out.append(sum(projector.project(k, v[:b]) for k, v in grads.items()))
    return torch.cat(out)


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["rademacher", "gaussian"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    space = ParamSpace.of(SmallCNN())
    gen = torch.Generator().manual_seed(0)
    grads = {
        layer.name: torch.randn(args.chunk, *layer.shape, generator=gen) for layer in space.layers
    }
    print(
        f"SmallCNN, {space.dim} parameters, {args.examples} examples in chunks of {args.chunk}, "
        f"dim {args.dim}, {args.threads} threads"
    )
    for kind in args.kinds:
        times = {}
        outs = {}
        for label, make in (("earlier", EarlierProjection), ("now", RandomProjection)):
            start = time.perf_counter()
            outs[label] = run(make(args.dim, kind, seed=0), grads, args.examples, args.chunk)
            times[label] = time.perf_counter() - start
        same = torch.equal(outs["earlier"], outs["now"])
        print(
            f"{kind:>10}: earlier {times['earlier']:6.2f} s, now {times['now']:6.2f} s "
            f"({times['earlier'] / times['now']:.1f}x), identical: {same}"
        )
        if not same:
            raise SystemExit("the projection changed its numbers")


if __name__ == "__main__":
    main()
