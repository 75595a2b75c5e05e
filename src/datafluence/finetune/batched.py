"""Many independent fine-tunes at once: stacked parameter copies under torch.func.vmap.

Copy c trains on its own group of examples; one vmapped forward/backward serves all copies
of a chunk, and each copy then measures the probes in batched forwards. Memory grows with
the chunk sizes, never with n_train x n_probe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from datafluence.finetune import functional_optim
from datafluence.finetune.recipe import FinetuneRecipe
from datafluence.tasks import Examples, Task, eval_mode

Params = dict[str, Tensor]


class BatchedFinetuner:
    """Fine-tune stacked copies of one model, each on its own group, and measure probes."""

    def __init__(self, model: nn.Module, task: Task, recipe: FinetuneRecipe) -> None:
        self.model = model
        self.task = task
        self.recipe = recipe
        self.train_names = recipe.trainable_names(model)
        chosen = set(self.train_names)
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
        self.base = {n: p.detach() for n, p in model.named_parameters() if n in chosen}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}

    def unchanged(self) -> Params:
        """The model's own trainable parameters as a stack of one copy."""
        return {n: p.unsqueeze(0) for n, p in self.base.items()}

    def _call(self, params: Params, *args: Tensor, **kwargs: Tensor) -> Tensor:
        return functional_call(self.model, (params, self.frozen, self.buffers), args, kwargs)

    def _group_loss(self, params: Params, batch: Mapping[str, Tensor], weight: Tensor) -> Tensor:
        per_example = self.task.loss(partial(self._call, params), batch)
        return (per_example * weight).sum() / weight.sum()

    def finetune(
        self, train: Examples, groups: Sequence[Sequence[int]], labels: Sequence[str]
    ) -> Params:
        """Stacked parameters [C, ...] after fine-tuning copy c on train[groups[c]]."""
        index, weight = _pad_groups(groups, device=next(iter(self.base.values())).device)
        batch = {k: v[index] for k, v in train.tensors.items()}  # [C, g, ...]
        n = len(groups)
        # copies of their own: the optimizer steps write into them
        params = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in self.base.items()}
        state = functional_optim.init_state(self.recipe, params)
        grad_fn = vmap(grad_and_value(self._group_loss))
        with eval_mode(self.model):
            for t in range(1, self.recipe.steps + 1):
                grads, losses = grad_fn(params, batch, weight)
                bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
                if bad:
                    names = ", ".join(labels[i] for i in bad[:5])
                    raise FloatingPointError(
                        f"non-finite loss at fine-tuning step {t} on {names}"
                        f"{' and others' if len(bad) > 5 else ''}; lower the learning rate "
                        "or check those examples"
                    )
                functional_optim.step(self.recipe, params, grads, state, t)
        return params

    @torch.no_grad()
    def measure(self, params: Params, probes: Examples, probe_chunk: int) -> Tensor:
        """Measurements [C, M] of every probe under every stacked copy.

        A model that defines `forward_copies(params, x) -> [C, M, ...]` (all parameters
        stacked [C, ...]; see `SmallCNN.forward_copies`) measures all copies in one call
        when the task can read such outputs (`measure_copies`): it can share work between
        copies that see the same probes. Otherwise a plain loop over copies, each measuring
        a chunk of probes in one batched forward: on CPU this beats vmap, which turns
        convolutions with per-copy weights into grouped convolutions that run 2-3x slower
        per FLOP than the ordinary kernels.
        """
        n_copies = next(iter(params.values())).shape[0]
        chunks = [probes[s : s + probe_chunk].tensors for s in range(0, len(probes), probe_chunk)]
        stacked = getattr(self.model, "forward_copies", None)
        if stacked is not None and hasattr(self.task, "measure_copies") and not self.buffers:
            full = {n: p.expand(n_copies, *p.shape) for n, p in self.frozen.items()}
            full.update(params)
            with eval_mode(self.model):
                return torch.cat(
                    [self.task.measure_copies(partial(stacked, full), chunk) for chunk in chunks],
                    dim=1,
                )
        rows = []
        with eval_mode(self.model):
            for c in range(n_copies):
                copy = {k: v[c] for k, v in params.items()}
                model = partial(self._call, copy)
                rows.append(torch.cat([self.task.measure(model, chunk) for chunk in chunks]))
        return torch.stack(rows)


def _pad_groups(groups: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Index [C, g] and weights [C, g]: groups of unequal size padded with weight-0 copies."""
    width = max(len(g) for g in groups)
    index = torch.zeros(len(groups), width, dtype=torch.long)
    weight = torch.zeros(len(groups), width)
    for c, group in enumerate(groups):
        index[c, : len(group)] = torch.as_tensor(list(group), dtype=torch.long)
        index[c, len(group) :] = group[0]
        weight[c, : len(group)] = 1.0
    return index.to(device), weight.to(device)
