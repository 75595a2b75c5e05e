"""Shared builders for the tests: tiny models built in code and random examples (the fixtures in
conftest.py hand them out; test modules may import them directly)."""

from __future__ import annotations

import torch
from torch import nn

from datafluence.tasks import ClassificationTask, Examples

N_CLASSES = 5
SIDE = 8


class TinyConvNet(nn.Module):
    """conv3x3(4) - BatchNorm - ReLU - Dropout - flatten - linear(5) on 1x8x8 inputs."""

    def __init__(self, n_classes: int = N_CLASSES, dropout: float = 0.3, side: int = SIDE):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * (side - 2) ** 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tiny_model(seed: int = 0, dropout: float = 0.3, train_mode: bool = False) -> TinyConvNet:
    torch.manual_seed(seed)
    model = TinyConvNet(dropout=dropout)
    with torch.no_grad():
        # Non-trivial BatchNorm state, so using batch statistics instead of the running
        # ones (or updating them) changes the numbers.
        bn = model.body[1]
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.2)
        bn.num_batches_tracked.fill_(10)
    return model.train(train_mode)


def random_examples(
    n: int,
    seed: int = 0,
    prefix: str = "t",
    side: int = SIDE,
    task: ClassificationTask | None = None,
) -> Examples:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, side, side, generator=gen)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    return (task or ClassificationTask()).examples(x, y, [f"{prefix}{i}" for i in range(n)])
