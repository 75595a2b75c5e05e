"""Many independent LoRA fine-tunes in one forward/backward: multi-adapter LoRA.

The batch is laid out copy-major: rows [c*R, (c+1)*R) belong to adapter c. Forward hooks on
the target modules add each row's own low-rank update, scale * x A_cᵀ B_cᵀ, to the frozen
module's output. Row c's loss depends only on adapter c, so one backward of the summed loss
gives every adapter its own gradient, and the shared base weights run as one large batch.
This is the batched engine for language models, whose Hugging Face forwards cannot be
vmapped (they branch on tensor values).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import Tensor, nn

from datafluence.finetune import functional_optim
from datafluence.finetune.adapter import LoRASpec
from datafluence.finetune.prefix_pack import MAX_PACKED_LENGTH, measure_packed, packing_matches
from datafluence.finetune.recipe import FinetuneRecipe
from datafluence.tasks import CausalLMTask, Examples, Task, eval_mode

Params = dict[str, Tensor]


class LoRAFinetuner:
    """Fine-tune stacked LoRA adapters, one per group, and measure probes under each."""

    def __init__(self, model: nn.Module, task: Task, recipe: FinetuneRecipe) -> None:
        if not recipe.lora_rank:
            raise ValueError("LoRAFinetuner needs a recipe with lora_rank > 0")
        self.model = model
        self.task = task
        self.recipe = recipe
        spec = LoRASpec.of(model, recipe)
        self.dims, self.init, self.scale = spec.dims, spec.init, spec.scale
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._packing: bool | None = None  # prefix packing checked on first use

    def fresh(self, n: int) -> Params:
        """n identical fresh adapters: A from the seed, B = 0."""
        params = {}
        for name, (_, d_out) in self.dims.items():
            a = self.init[name].to(self.device, self.dtype)
            params[f"{name}.A"] = a.unsqueeze(0).expand(n, *a.shape).clone()
            params[f"{name}.B"] = torch.zeros(n, d_out, self.recipe.lora_rank, **self._like())
        return params

    def unchanged(self) -> Params:
        """One fresh adapter: B = 0, so the model computes exactly its own function."""
        return self.fresh(1)

    def _packing_ok(self, probes: Examples) -> bool:
        longest = int(probes.tensors["attention_mask"].sum(1).max())
        if longest > MAX_PACKED_LENGTH:  # masks grow with the square of the row width
            return False
        if self._packing is None:
            self._packing = isinstance(self.task, CausalLMTask) and packing_matches(
                self.model, self.task, probes.tensors
            )
        return self._packing

    def _like(self) -> dict:
        return {"device": self.device, "dtype": self.dtype}

    @contextmanager
    def attached(self, params: Params) -> Iterator[None]:
        """Hooks adding adapter c's update to rows of copy c (copy-major batch)."""
        modules = dict(self.model.named_modules())
        handles = []
        for name in self.dims:
            a, b = params[f"{name}.A"], params[f"{name}.B"]

            def hook(_mod: nn.Module, inputs: tuple, output: Tensor, a=a, b=b) -> Tensor:
                x = inputs[0]
                copies = a.shape[0]
                low = torch.bmm(x.reshape(copies, -1, x.shape[-1]), a.transpose(1, 2))
                # scale * low Bᵀ accumulates into the output in place: no [C, R*T, d_out]
                # temporaries (autograd allows it: a linear layer keeps no copy of its output)
                out = output.view(copies, -1, output.shape[-1])
                out.baddbmm_(low, b.transpose(1, 2), alpha=self.scale)
                return output

            handles.append(modules[name].register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _frozen_base(self) -> Iterator[None]:
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            with eval_mode(self.model):
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def finetune(
        self, train: Examples, groups: Sequence[Sequence[int]], labels: Sequence[str]
    ) -> Params:
        """Adapters [C, ...] after fine-tuning adapter c on train[groups[c]] (mean loss)."""
        n = len(groups)
        width = max(len(g) for g in groups)
        index = torch.tensor([list(g) + [g[0]] * (width - len(g)) for g in groups])
        weight = torch.tensor([[1.0] * len(g) + [0.0] * (width - len(g)) for g in groups])
        weight = weight.to(self.device, torch.float32)
        batch = {k: v[index.flatten().to(v.device)] for k, v in train.tensors.items()}
        params = self.fresh(n)
        state = functional_optim.init_state(self.recipe, params)
        with self._frozen_base():
            for t in range(1, self.recipe.steps + 1):
                leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                with self.attached(leaves):
                    per = self.task.loss(self.model, batch).float().view(n, width)
                losses = (per * weight).sum(1) / weight.sum(1)
                bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
                if bad:
                    names = ", ".join(labels[i] for i in bad[:5])
                    raise FloatingPointError(
                        f"non-finite loss at fine-tuning step {t} on {names}; lower the "
                        "learning rate or check those examples"
                    )
                grad_list = torch.autograd.grad(losses.sum(), list(leaves.values()))
                grads = dict(zip(leaves, grad_list, strict=True))
                functional_optim.step(self.recipe, params, grads, state, t)
        return params

    @torch.no_grad()
    def measure(self, params: Params, probes: Examples, probe_chunk: int) -> Tensor:
        """Measurements [C, M]; each forward holds about `probe_chunk` (copy, probe) pairs.

        Causal LMs whose checks pass (`prefix_pack.packing_matches`, once per finetuner)
        measure the probes packed as prefix trees: shared prefixes and padding are not
        computed (on the knowledge-domain probes, 384 row positions instead of 832); probes
        longer than `MAX_PACKED_LENGTH` tokens are not packed.
        Otherwise probes go through in order of length, so that each forward is cut to its
        own longest probe instead of the longest of all.
        """
        n = next(iter(params.values())).shape[0]
        if self._packing_ok(probes):
            with self._frozen_base(), self.attached(params):
                # `_packing_ok` holds for causal LM tasks only
                task = cast(CausalLMTask, self.task)
                return measure_packed(self.model, task, probes.tensors, n, probe_chunk)
        per_forward = max(1, probe_chunk // n)
        order = _by_length(probes.tensors)
        cols = []
        with self._frozen_base(), self.attached(params):
            for s in range(0, len(probes), per_forward):
                chunk = probes[order[s : s + per_forward].tolist()].tensors
                rows = {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in chunk.items()}
                cols.append(self.task.measure(self.model, rows).view(n, -1))
        out = torch.empty(n, len(probes), dtype=cols[0].dtype, device=cols[0].device)
        out[:, order.to(out.device)] = torch.cat(cols, dim=1)
        return out


def _by_length(tensors: Mapping[str, Tensor]) -> Tensor:
    """Probe indices sorted (stably) by the position of their last scored token."""
    mask = tensors["target_mask"]  # CausalLMTask examples always carry it
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (mask.bool() * positions).amax(1)
    return torch.argsort(last.cpu(), stable=True)
