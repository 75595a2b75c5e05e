"""Start models for Simfluence runs: what the generic loop needs from a model family.

Every run of a Simfluence collection, every TracIn checkpoint and every counterfactual
re-training must start from the very same weights, so a `Setup` hands out a factory that
resets the start on every call, and the start is saved (`start_path`) the first time so a
resumed experiment does not retrain or re-draw it. Two families: an MLP classifier
pre-trained on images kept out of the pool, and LoRA adapters on a frozen causal LM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from datafluence import store
from datafluence.datasets import ImageSet
from datafluence.models import TrainRecipe, evaluate_accuracy, train_classifier
from datafluence.tasks import CausalLMTask, ClassificationTask, Examples, Task


@dataclass
class Setup:
    """What the generic part of the experiment needs from a model family."""

    task: Task
    pool: Examples
    test: Examples
    make_model: Callable[[], nn.Module]  # the starting weights, freshly reset on every call
    pool_groups: np.ndarray  # [N] group name of every pool example (class or domain)
    test_groups: np.ndarray  # [M]
    info: dict[str, Any]


def mlp(hidden: int, n_in: int = 28 * 28, n_classes: int = 10) -> nn.Module:
    """One hidden layer: a step costs ~1.5 ms on a core, so the fits get the time budget."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
    )


def _saved_start(
    path: Path, make: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The start weights at `path`, or `make()`'s, saved there atomically."""
    if path.exists():
        return load_file(path)
    start = make()
    with store.atomic_path(path) as tmp:
        save_file(start, str(tmp))
    return start


def classifier_setup(
    pre: ImageSet,
    pool_set: ImageSet,
    test_set: ImageSet,
    *,
    hidden: int,
    pretrain_epochs: int,
    seed: int,
    start_path: Path,
    dataset: str,
    progress: bool = False,
) -> Setup:
    """An MLP pre-trained (Adam) on `pre`, so fine-tuning moves each test loss its own way.

    From a partially trained start some test losses saturate, some barely move and some
    rise, which an additive roll-out cannot follow and the linear simulator can.
    """
    task = ClassificationTask(num_classes=len(pool_set.classes))
    side = int(np.prod(pool_set.images.shape[1:]))

    def build() -> nn.Module:
        return mlp(hidden, side, len(pool_set.classes))

    def pretrain() -> dict[str, torch.Tensor]:
        def seeded() -> nn.Module:  # train_classifier seeds only after building the model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return build()

        model, _ = train_classifier(
            seeded,
            pre.images,
            pre.labels,
            TrainRecipe(epochs=pretrain_epochs, batch_size=32, lr=1e-3, seed=seed),
            name="simfluence-mlp",
            data_key="",
            use_cache=False,
            progress=progress,
        )
        return {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    start = _saved_start(start_path, pretrain)

    def make_model() -> nn.Module:
        model = build()
        model.load_state_dict(start)
        return model

    start_model = make_model()
    classes = np.array([str(int(y)) for y in range(len(pool_set.classes))])
    return Setup(
        task=task,
        pool=task.examples(pool_set.images, pool_set.labels, pool_set.ids),
        test=task.examples(test_set.images, test_set.labels, test_set.ids),
        make_model=make_model,
        pool_groups=classes[pool_set.labels.numpy()],
        test_groups=classes[test_set.labels.numpy()],
        info={
            "model": f"MLP {side}-{hidden}-{len(pool_set.classes)}",
            "dataset": dataset,
            "pretrained_on": len(pre),
            "test_accuracy": evaluate_accuracy(start_model, test_set.images, test_set.labels),
        },
    )


def lm_setup(
    model_name: str,
    chosen: Sequence[tuple[str, str]],
    ids: Sequence[str],
    *,
    pool_size: int,
    lora_rank: int,
    lora_targets: Sequence[str],
    seed: int,
    start_path: Path,
    source: str,
    progress: bool = False,
) -> Setup:
    """LoRA adapters on a frozen causal LM; the first `pool_size` (domain, text) pairs are
    the pool, the rest the test set, and domains are the groups.

    Only the adapters are trained, so only they are saved and reset; `source` says in the
    run's info where the texts came from.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(
            "the language-model path needs peft: `pip install peft` (or use --model mlp)"
        ) from err
    from datafluence.models.language import load_causal_lm

    base, tokenizer = load_causal_lm(model_name, progress=progress)
    for p in base.parameters():
        p.requires_grad_(False)
    task = CausalLMTask(tokenizer)
    examples = task.examples([t for _, t in chosen], list(ids))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            target_modules=list(lora_targets),
            lora_dropout=0.0,
        )
        model = get_peft_model(base, lora)
    start = _saved_start(
        start_path,
        lambda: {
            k: v.detach().clone().contiguous()
            for k, v in model.state_dict().items()
            if "lora_" in k
        },
    )

    def make_model() -> nn.Module:
        # One model object: every call resets its adapters to the start (the base is frozen).
        model.load_state_dict(start, strict=False)
        return model

    groups = np.array([d for d, _ in chosen])
    n = pool_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Setup(
        task=task,
        pool=examples[:n],
        test=examples[n:],
        make_model=make_model,
        pool_groups=groups[:n],
        test_groups=groups[n:],
        info={
            "model": f"{model_name} + LoRA r={lora_rank} on {','.join(lora_targets)}",
            "trainable_parameters": trainable,
            "texts": source,
        },
    )
