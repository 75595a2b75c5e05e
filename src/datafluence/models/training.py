"""Plain minibatch training of a classifier, cached on disk by its exact recipe.

The experiment's starting model θ must be reproducible, and retraining it on every run
wastes minutes, so a checkpoint is keyed by a hash of the recipe and the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from datafluence import store


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    """Where trained checkpoints are kept: $DATAFLUENCE_CACHE or ~/.cache/datafluence."""
    root = os.environ.get("DATAFLUENCE_CACHE") or Path.home() / ".cache" / "datafluence"
    return Path(root) / "models"


def train_classifier(
    make_model: Callable[[], nn.Module],
    images: Tensor,
    labels: Tensor,
    recipe: TrainRecipe,
    name: str,
    data_key: str,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, bool]:
    """Train (Adam, cross-entropy, shuffled minibatches) or load the cached result.

    Returns the model in eval mode and whether it came from the cache. The initial weights
    come from `recipe.seed` too, so the same call trains the same model on any machine,
    whatever drew random numbers before it in the process.
    """
    key = store.fingerprint(
        {"name": name, "recipe": recipe.to_dict(), "data": data_key, "init": "seeded"}
    )
    path = cache_dir() / f"{name}-{key}.safetensors"
    torch.manual_seed(recipe.seed)
    model = make_model()
    if use_cache and path.exists():
        model.load_state_dict(load_file(path))
        return model.eval(), True
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    n = images.shape[0]
    steps = recipe.epochs * ((n + recipe.batch_size - 1) // recipe.batch_size)
    bar = tqdm(total=steps, desc=f"training {name}", unit="step", disable=not progress, leave=False)
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        with store.atomic_path(path) as tmp:
            save_file(state, str(tmp))
    return model, False


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    for s in range(0, images.shape[0], batch):
        correct += int((model(images[s : s + batch]).argmax(-1) == labels[s : s + batch]).sum())
    model.train(was)
    return correct / images.shape[0]
