"""Seeded random projection of per-example gradients (Johnson–Lindenstrauss).

Each layer gets its own matrix R_l [dim, P_l] with i.i.d. entries of variance 1/dim
(Gaussian, or ±1/√dim Rademacher), so E[⟨R x, R y⟩] = ⟨x, y⟩ and a whole gradient projects
to Σ_l R_l x_l. Entries are drawn on the CPU from a generator seeded by (seed, layer name,
column block): the same seed gives the same projection on any device, in any process, and a
big layer never needs its whole matrix in memory at once.

Drawing the entries costs several times the product itself, and callers project chunk after
chunk of examples with the same matrices, so each projector keeps the blocks it drew, up to
CACHE_BYTES (256 MiB) per projector: Rademacher blocks as ±1 int8 signs (1 byte an entry:
256 M entries, e.g. the 80 k-parameter SmallCNN at dim 2048 takes 164 MiB), Gaussian blocks
as float32 (4 bytes: 64 M entries). Blocks beyond the bound are drawn again at every call.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

KINDS = ("rademacher", "gaussian")
_BLOCK_ELEMENTS = 1 << 22  # entries generated at a time
CACHE_BYTES = 1 << 28  # blocks kept between calls, per projector


class RandomProjection:
    """project(layer_name, x [B, P_l]) -> [B, dim]."""

    def __init__(self, dim: int, kind: str = "rademacher", seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"projection dim must be at least 1, got {dim}")
        if kind not in KINDS:
            raise ValueError(f"unknown projection kind {kind!r}; choose one of {KINDS}")
        self.dim, self.kind, self.seed = int(dim), kind, int(seed)
        self._cache: dict[tuple[str, int], Tensor] = {}
        self._cached = 0  # bytes
        # 1/√dim as a float32 entry holds it (float32 ±1 divided by √dim)
        self._scale = float(torch.ones(1).div_(math.sqrt(self.dim)))

    def settings(self) -> dict[str, object]:
        return {"dim": self.dim, "kind": self.kind, "seed": self.seed}

    def _block(self, name: str, block: int, width: int) -> Tensor:
        """A block as stored: float32 entries (Gaussian) or ±1 int8 signs (Rademacher)."""
        key = (name, block)
        if key in self._cache:
            return self._cache[key]
        digest = hashlib.sha256(f"{self.seed}/{name}/{block}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if self.kind == "gaussian":
            m = torch.randn(self.dim, width, generator=gen).div_(math.sqrt(self.dim))
        else:  # the same draws as int64 randint (the dtype only changes the storage)
            m = torch.randint(0, 2, (self.dim, width), generator=gen, dtype=torch.int8)
            m.mul_(2).sub_(1)
        size = m.numel() * m.element_size()
        if self._cached + size <= CACHE_BYTES:
            self._cache[key] = m
            self._cached += size
        return m

    def project(self, name: str, x: Tensor) -> Tensor:
        """x [B, P_l] (or [B, d_out, d_in']) -> [B, dim] in x's dtype and device."""
        x = x.reshape(x.shape[0], -1)
        width = max(1, _BLOCK_ELEMENTS // self.dim)
        out = x.new_zeros(x.shape[0], self.dim)
        for block, lo in enumerate(range(0, x.shape[1], width)):
            hi = min(lo + width, x.shape[1])
            m = self._block(name, block, hi - lo).to(device=x.device, dtype=x.dtype)
            if self.kind == "rademacher":
                m = m.mul_(self._scale)  # ±1 x the float32 1/√dim: exactly ±1/√dim entries
            out += x[:, lo:hi] @ m.T
        return out
