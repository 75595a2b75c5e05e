"""The reference MLP classifier (784-256-256-10 ReLU): Grosse et al.'s influence-function
validation model, used by the CLI's reference setup and the mislabel experiment."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """784-hidden-hidden-10 ReLU MLP on flattened 28 x 28 images."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
