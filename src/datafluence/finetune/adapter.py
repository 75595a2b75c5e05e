"""The LoRA adapter a recipe asks for: target modules, their shapes, the fresh A, the scale.

The batched multi-adapter engine (`lora.LoRAFinetuner`) and the peft reference
(`naive.finetune_copy`) both build their adapters from this one spec, so that they start
from the same adapter and differ only in how they train it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datafluence.finetune.recipe import FinetuneRecipe


@dataclass(frozen=True)
class LoRASpec:
    """A fresh adapter: rank-r updates scale * B A on `dims`, A = `init`, B = 0."""

    dims: dict[str, tuple[int, int]]  # target module name -> (d_in, d_out)
    init: dict[str, Tensor]  # target module name -> A [rank, d_in], float32 on the CPU
    rank: int
    alpha: float
    conv1d: bool  # the targets are GPT-2 Conv1D layers (weight [in, out]: peft's fan_in_fan_out)

    @property
    def scale(self) -> float:
        """alpha / r, peft's scaling without rank stabilisation."""
        return self.alpha / self.rank

    @classmethod
    def of(cls, model: nn.Module, recipe: FinetuneRecipe) -> LoRASpec:
        """The adapter `recipe` asks for on `model`; a clear error when no target matches."""
        dims = lora_modules(model, recipe.lora_targets)
        conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n in dims)
        return cls(dims, lora_init(recipe, dims), recipe.lora_rank, recipe.lora_alpha, conv1d)


def lora_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Target module names -> (d_in, d_out): nn.Linear and GPT-2's Conv1D whose names match."""
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if isinstance(module, nn.Linear):
            found[name] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: x @ W, W [in, out]
            found[name] = tuple(module.weight.shape)  # type: ignore[assignment]
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"no nn.Linear / Conv1D module name matches lora_targets={list(patterns)}; "
            f"linear modules look like: {', '.join(linear)}"
        )
    return found


def lora_init(recipe: FinetuneRecipe, dims: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    """A fresh adapter's A matrices: Kaiming-uniform like nn.Linear/peft, from lora_seed."""
    gen = torch.Generator().manual_seed(recipe.lora_seed)
    out = {}
    for name, (d_in, _) in dims.items():
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [r, d_in] weight
        out[name] = (torch.rand(recipe.lora_rank, d_in, generator=gen) * 2 - 1) * bound
    return out
