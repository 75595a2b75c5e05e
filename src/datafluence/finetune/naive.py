"""The reference: copy the model, fine-tune it with a stock torch optimizer, measure.

Slow (one example at a time) but obviously right; the batched engines are tested against it.
LoRA copies are wrapped by peft, an implementation independent of the multi-adapter engine:
the two share only the adapter spec (`adapter.LoRASpec`), never training code.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn

from datafluence.finetune.adapter import LoRASpec
from datafluence.finetune.recipe import FinetuneRecipe
from datafluence.tasks import Task, eval_mode


def finetune_copy(
    model: nn.Module,
    task: Task,
    recipe: FinetuneRecipe,
    batch: Mapping[str, Tensor],
    label: str = "",
) -> nn.Module:
    """A fine-tuned deep copy of `model` after `recipe.steps` steps on `batch` (mean loss).

    With LoRA in the recipe the copy is wrapped by peft (`peft_copy`).
    """
    if recipe.lora_rank:
        return peft_copy(model, task, recipe, batch, label)
    tuned = copy.deepcopy(model).eval()
    names = set(recipe.trainable_names(tuned))
    params: list[Tensor] = []
    for name, p in tuned.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    return train_steps(tuned, params, task, recipe, batch, label)


def peft_copy(
    model: nn.Module,
    task: Task,
    recipe: FinetuneRecipe,
    batch: Mapping[str, Tensor],
    label: str = "",
) -> nn.Module:
    """A deep copy wrapped by peft's LoRA, started from the spec's adapter, trained like
    any other copy: the stock optimizer on the adapter's parameters only."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the naive LoRA reference needs peft: pip install peft") from err
    spec = LoRASpec.of(model, recipe)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=cast(int, spec.alpha),  # peft annotates int; it takes any number
        target_modules=list(spec.dims),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=spec.conv1d,
    )
    tuned = get_peft_model(copy.deepcopy(model), config).eval()
    for name, module in tuned.named_modules():
        short = name.removeprefix("base_model.model.")
        if short in spec.dims and hasattr(module, "lora_A"):
            module.lora_A["default"].weight.data.copy_(spec.init[short])
            module.lora_B["default"].weight.data.zero_()
    params: list[Tensor] = [p for n, p in tuned.named_parameters() if "lora_" in n]
    return train_steps(tuned, params, task, recipe, batch, label)


def train_steps(
    model: nn.Module,
    params: list[Tensor],
    task: Task,
    recipe: FinetuneRecipe,
    batch: Mapping[str, Tensor],
    label: str = "",
) -> nn.Module:
    """`recipe.steps` steps of the stock torch optimizer on `params`, mean loss over `batch`."""
    opt = recipe.torch_optimizer(params)
    for t in range(recipe.steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at fine-tuning step {t + 1} on "
                f"{label or 'a group'}; lower the learning rate or check the example"
            )
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def measure(model: nn.Module, task: Task, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-example measurements of `batch` under `model` in eval mode."""
    with eval_mode(model):
        return task.measure(model, batch)
