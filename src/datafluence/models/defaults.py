"""Default layers: which modules a method attributes through or compares, when not told.

The same defaults for Python users and the CLI. A classifier is attributed through every
supported layer (`modules=None`); a causal language model through the MLP projections of
its last `LM_BLOCKS` decoder blocks (attributing through every projection of a 135M model
is slow on a CPU, and later MLPs are where Grosse et al. 2023 find most of the influence);
representation similarity compares a language model's last block output and a
classifier's last activation before its output layer.
"""

from __future__ import annotations

from torch import nn

from datafluence.gradients.layers import Modules, layer_kind
from datafluence.tasks import CausalLMTask, Task

LM_BLOCKS = 2
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish)


def decoder_blocks(model: nn.Module) -> list[str]:
    """Names of a transformer's blocks: the longest ModuleList (model.layers, transformer.h)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(
            f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList); "
            "name the layers with modules=[...] (--modules) and the compared layer with "
            "module=... (--layer)"
        )
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" for i in range(len(blocks))]


def default_lm_modules(model: nn.Module, blocks: int = LM_BLOCKS) -> list[str]:
    """The MLP projections (Linear or GPT-2 Conv1D) of the last `blocks` decoder blocks; all
    their projections when no module of theirs is called an MLP."""
    last = decoder_blocks(model)[-blocks:]
    inside = [
        n
        for n, m in model.named_modules()
        if layer_kind(m) in ("linear", "conv1d") and any(n.startswith(f"{b}.") for b in last)
    ]
    return [n for n in inside if ".mlp." in n] or inside


def default_modules(model: nn.Module, task: Task | None, modules: Modules) -> Modules:
    """`modules` as given; "all" = every supported layer; None = every supported layer, but
    on a causal LM with decoder blocks (a ModuleList) `default_lm_modules`."""
    if isinstance(modules, str) and modules == "all":
        return None
    if modules is None and isinstance(task, CausalLMTask) and _has_blocks(model):
        return default_lm_modules(model)
    return modules


def _has_blocks(model: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) and len(m) for m in model.modules())


def default_representation_layer(model: nn.Module, task: Task | None = None) -> str:
    """A language model's last decoder block; otherwise the last activation module (the
    penultimate representation of a classifier)."""
    if isinstance(task, CausalLMTask):
        return decoder_blocks(model)[-1]
    named = [n for n, m in model.named_modules() if isinstance(m, ACTIVATIONS)]
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no activation module (nn.ReLU, nn.GELU, ...) whose "
            "output could serve as its representation; name one with module=... (--layer)"
        )
    return named[-1]
