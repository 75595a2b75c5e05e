"""Plain minibatch training of a classifier, cached on disk by its exact recipe.

The experiment's starting model θ must be reproducible, and retraining it on every run
wastes minutes, so a checkpoint is keyed by a hash of the recipe and the data. TracIn-CP
also needs the weights after every epoch of that same run: `train_classifier_checkpoints`
keeps them from the one training run (beside the final model, same key + epoch) instead of
retraining for 1, 2, ..., E epochs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from datafluence import store
from datafluence.progress import bar as progress_bar

State = dict[str, Tensor]


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
    path = _cache_paths(name, recipe, data_key)[-1]
    model = _seeded(make_model, recipe)
    if use_cache and path.exists():
        model.load_state_dict(load_file(path))
        return model.eval(), True
    _fit(model, images, labels, recipe, name, progress, keep_epochs=False)
    if use_cache:
        _save(model.state_dict(), path)
    return model, False


def train_classifier_checkpoints(
    make_model: Callable[[], nn.Module],
    images: Tensor,
    labels: Tensor,
    recipe: TrainRecipe,
    name: str,
    data_key: str,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, list[State], bool]:
    """`train_classifier` that also returns the state dict after every epoch (the last one
    is the final model's weights), for TracIn-CP.

    Same training, same cache key: the final model is the one `train_classifier` trains and
    loads. The epoch checkpoints are cached beside it; when any is missing the whole run is
    trained again (rewriting the same final model) rather than trusting a partial set.
    """
    if recipe.epochs < 1:
        raise ValueError(f"epoch checkpoints need at least one epoch, got epochs={recipe.epochs}")
    paths = _cache_paths(name, recipe, data_key)
    model = _seeded(make_model, recipe)
    if use_cache and all(p.exists() for p in paths):
        states = [load_file(p) for p in paths]
        model.load_state_dict(states[-1])
        return model.eval(), states, True
    states = _fit(model, images, labels, recipe, name, progress, keep_epochs=True)
    if use_cache:
        for state, path in zip(states, paths, strict=True):  # the final model last
            _save(state, path)
    return model, states, False


def _cache_paths(name: str, recipe: TrainRecipe, data_key: str) -> list[Path]:
    """Epoch 1 .. E-1 checkpoints, then the final model (= epoch E)."""
    key = store.fingerprint(
        {"name": name, "recipe": recipe.to_dict(), "data": data_key, "init": "seeded"}
    )
    stem = cache_dir() / f"{name}-{key}"
    epochs = [Path(f"{stem}-epoch{e:03d}.safetensors") for e in range(1, recipe.epochs)]
    return [*epochs, Path(f"{stem}.safetensors")]


def _seeded(make_model: Callable[[], nn.Module], recipe: TrainRecipe) -> nn.Module:
    torch.manual_seed(recipe.seed)
    return make_model()


def _fit(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    recipe: TrainRecipe,
    name: str,
    progress: bool,
    keep_epochs: bool,
) -> list[State]:
    """Train `model` in place (left in eval mode); the state after each epoch if asked."""
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    n = images.shape[0]
    steps = recipe.epochs * ((n + recipe.batch_size - 1) // recipe.batch_size)
    bar = progress_bar(progress=progress, total=steps, desc=f"training {name}", unit="step")
    states: list[State] = []
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
        if keep_epochs:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    bar.close()
    model.eval()
    return states


def _save(state: State, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with store.atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    for s in range(0, images.shape[0], batch):
        correct += int((model(images[s : s + batch]).argmax(-1) == labels[s : s + batch]).sum())
    model.train(was)
    return correct / images.shape[0]
