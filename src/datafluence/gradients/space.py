"""The parameter space influence works in: the selected layers, each as one matrix.

Vectors over it travel in two forms: a dict {layer name: [k, d_out, d_in']} (what block-wise
strategies use) and a flat [k, P] tensor (what full-matrix strategies use), laid out layer
after layer with each matrix flattened row-major.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from datafluence.gradients.layers import Layer, resolve_layers

Blocks = dict[str, Tensor]


class ParamSpace:
    """The selected layers of one model and the conversions between vector forms."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        if not layers:
            raise ValueError("no layers selected")
        self.layers = list(layers)
        self.names = [layer.name for layer in self.layers]
        self.by_name = {layer.name: layer for layer in self.layers}
        self.sizes = [layer.numel for layer in self.layers]
        self.dim = sum(self.sizes)

    @classmethod
    def of(
        cls, model: nn.Module, modules: str | type | Iterable[str | type] | None = None
    ) -> ParamSpace:
        return cls(resolve_layers(model, modules))

    def describe(self) -> list[dict[str, object]]:
        """What the space is made of (saved with fitted curvature to detect another model)."""
        return [
            {"name": layer.name, "kind": layer.kind, "shape": list(layer.shape)}
            for layer in self.layers
        ]

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.parameters()]

    def flatten(self, blocks: Blocks) -> Tensor:
        """{name: [k, d_out, d_in']} -> [k, P]."""
        return torch.cat([blocks[n].reshape(blocks[n].shape[0], -1) for n in self.names], dim=1)

    def unflatten(self, flat: Tensor) -> Blocks:
        """[k, P] -> {name: [k, d_out, d_in']}."""
        parts = torch.split(flat, self.sizes, dim=1)
        return {
            layer.name: part.reshape(flat.shape[0], *layer.shape)
            for layer, part in zip(self.layers, parts, strict=True)
        }

    def from_param_grads(self, grads: Sequence[Tensor | None]) -> Tensor:
        """Gradients aligned with `parameters()` -> one flat vector [P]."""
        out, i = [], 0
        for layer in self.layers:
            n = len(layer.parameters())
            chunk = [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(grads[i : i + n], layer.parameters(), strict=True)
            ]
            i += n
            out.append(layer.to_matrix(chunk[0], chunk[1] if n == 2 else None).reshape(-1))
        return torch.cat(out)

    def to_param_tensors(self, flat: Tensor) -> list[Tensor]:
        """One flat vector [P] -> tensors aligned with `parameters()` (in their dtype)."""
        out: list[Tensor] = []
        for layer, block in zip(self.layers, torch.split(flat, self.sizes), strict=True):
            dtype = layer.weight.dtype
            out.extend(t.to(dtype) for t in layer.from_matrix(block.reshape(layer.shape)))
        return out

    @contextmanager
    def gradients_on(self, model: nn.Module) -> Iterator[list[nn.Parameter]]:
        """Selected parameters require grad, every other one does not; restored after.

        Frozen layers can then still be studied, and no work is spent on the others.
        """
        selected = {id(p) for p in self.parameters()}
        saved = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in saved:
                p.requires_grad_(id(p) in selected)
            for p in self.parameters():  # also those registered outside `model`
                p.requires_grad_(True)
            yield self.parameters()
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
