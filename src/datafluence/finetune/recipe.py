"""The fine-tuning recipe: every choice that changes an empirical-influence number.

It is saved with every result, so nothing about how θ_s was reached hides in code.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

Optimizer = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[Optimizer, ...] = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class FinetuneRecipe:
    """K optimizer steps on one example (or one group of examples), from θ.

    `trainable` holds fnmatch patterns of parameter names (e.g. ``("fc.*",)``); empty means
    every parameter trains. With `lora_rank > 0` the base weights stay frozen and a fresh
    LoRA adapter (rank r, scale alpha / r, A seeded by `lora_seed` and identical for every
    example, B = 0) is trained on the modules whose names match `lora_targets`.
    The loss of a group is the mean of its examples' losses.
    During fine-tuning and measurement the model is in eval mode: dropout is off and
    BatchNorm uses (and never updates) its running statistics, because batch statistics of
    a single example are meaningless and would make the result depend on batch grouping.
    """

    steps: int = 1
    lr: float = 1e-2
    optimizer: Optimizer = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    trainable: tuple[str, ...] = ()
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_seed: int = 0

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError("momentum applies to sgd only; for adam set betas instead")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "trainable", _patterns(self.trainable))
        object.__setattr__(self, "lora_targets", _patterns(self.lora_targets))
        if self.lora_rank < 0 or int(self.lora_rank) != self.lora_rank:
            raise ValueError(f"lora_rank must be a non-negative integer, got {self.lora_rank}")
        if self.lora_rank and self.trainable:
            raise ValueError("choose either LoRA (lora_rank > 0) or trainable patterns, not both")
        if self.lora_rank and not self.lora_targets:
            raise ValueError(
                "LoRA needs lora_targets, module-name patterns such as ('*q_proj', '*v_proj') "
                "for Llama or ('*c_attn',) for GPT-2"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trainable_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters that fine-tuning updates; a clear error when none match."""
        names = [n for n, _ in model.named_parameters()]
        if not names:
            raise ValueError("the model has no parameters to fine-tune")
        if not self.trainable:
            return names
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.trainable)]
        if not chosen:
            shown = ", ".join(names[:8])
            raise ValueError(
                f"no parameter name matches trainable={list(self.trainable)}; "
                f"names look like: {shown}{', ...' if len(names) > 8 else ''}"
            )
        return chosen

    def torch_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The stock torch optimizer for this recipe (the naive reference uses it)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return cls(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )


def _patterns(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """One pattern or several; a plain string is one pattern, never its characters."""
    return (value,) if isinstance(value, str) else tuple(value)
