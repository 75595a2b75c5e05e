"""Representation similarity: cosine (or dot product) of one layer's activations.

score(i, j) = cos(h_i, h_j) (or h_i · h_j) where h is the output of the named module for an
example, read by a forward hook in eval mode (no gradients). Activations become one vector
per example:
  - [B, D]: as is;
  - [B, T, D] from a language model (the batch has an attention mask of width T): the mean
    over the example's real tokens (`pooling="mean"`, padding excluded), or its last real
    token (`pooling="last"`); `span="completion"` pools over the completion tokens only
    (target_mask) instead of every token;
  - anything else (conv feature maps [B, C, H, W], [B, T, D] without a mask): flattened.
A module returning a tuple (Hugging Face blocks) contributes its first element.
Positive = similar representations, the baseline's stand-in for "supports".
Training rows are computed `chunk_size` at a time; with `run`, each chunk is saved as it
finishes (resumable partitions keyed by settings, weights and data, as for every method).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from datafluence.gradients.capture import chunks
from datafluence.methods.base import Method, Run
from datafluence.models.defaults import default_representation_layer
from datafluence.scores import Scores
from datafluence.tasks import CausalLMTask, Examples, Task, eval_mode

KINDS = ("cosine", "dot")
POOLINGS = ("mean", "last", "flatten")
SPANS = ("all", "completion")


class RepresentationSimilarity(Method):
    """Similarity of the activations of `module` (a name from model.named_modules(); None:
    a language model's last decoder block, a classifier's last activation before its head,
    see `models.defaults.default_representation_layer`)."""

    name = "representation_similarity"
    task: Task  # never None: the constructor takes one

    def __init__(
        self,
        task: Task,
        module: str | None = None,
        *,
        kind: str = "cosine",
        pooling: str = "mean",
        span: str = "all",
        chunk_size: int = 64,
        progress: bool = True,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size, progress=progress)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if span not in SPANS:
            raise ValueError(f"unknown span {span!r}; choose one of {SPANS}")
        if module is not None and not isinstance(module, str):
            raise TypeError(f"module must be a module name (str) or None, got {module!r}")
        self.module, self.kind = module, kind
        self.pooling, self.span = pooling, span

    def settings(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "pooling": self.pooling,
            "span": self.span,
            **self.task.settings(),
        }

    def layer(self, model: nn.Module) -> str:
        """The module compared: the one given, or the model's default."""
        return self.module or default_representation_layer(model, self.task)

    def features(self, model: nn.Module, examples: Examples) -> Tensor:
        """One pooled activation vector per example, float64 [N, D]."""
        modules = dict(model.named_modules())
        name = self.layer(model)
        if name not in modules:
            close = [n for n in modules if n and (name in n or n in name)][:8]
            hint = f" Similar names: {close}." if close else ""
            raise ValueError(f"the model has no module named {name!r}.{hint}")
        captured: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple | list) else output
            if not isinstance(out, Tensor):
                raise TypeError(f"module {name!r} returned {type(out).__name__}, not a tensor")
            captured.append(out.detach())

        out = []
        handle = modules[name].register_forward_hook(hook)
        try:
            with eval_mode(model), torch.no_grad():
                for _, _, batch in chunks(examples, self.chunk_size):
                    captured.clear()
                    self._forward(model, batch)
                    if not captured:
                        raise RuntimeError(f"module {name!r} was not called in the forward pass")
                    out.append(self._pool(captured[-1], batch))
        finally:
            handle.remove()
        return torch.cat(out)

    def _forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> None:
        if isinstance(self.task, CausalLMTask):
            # The whole sequence (the task's own forward stops at the last predicting token).
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        else:
            self.task.outputs(model, batch)

    def _pool(self, h: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        b = next(iter(batch.values())).shape[0]
        if h.shape[0] != b:
            raise ValueError(
                f"the compared module's output has shape {tuple(h.shape)}, not one row per "
                f"example of a batch of {b}"
            )
        h = h.double()
        mask = batch.get("attention_mask")
        sequence = h.ndim == 3 and mask is not None and mask.shape[1] == h.shape[1]
        if self.pooling == "flatten" or not sequence:
            return h.reshape(b, -1)
        assert mask is not None
        if self.span == "completion":
            mask = batch["target_mask"]
        weights = mask.to(h.dtype)  # [B, T]
        if self.pooling == "last":
            last = (weights * torch.arange(1, h.shape[1] + 1, dtype=h.dtype)).argmax(dim=1)
            return h[torch.arange(b), last]
        count = weights.sum(dim=1, keepdim=True).clamp(min=1)
        return (h * weights[..., None]).sum(dim=1) / count

    def score(
        self, model: nn.Module | None, train: Any, queries: Any, *, run: Run = None
    ) -> Scores:
        """Scores [n_train, n_query]; with `run`, rows are saved as they finish and a re-run
        computes only the missing ones."""
        call = self.begin(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None: activations need the model
        train = call.train
        b = self.features(model, call.queries)  # cheap (one forward pass) and names the dim
        if self.kind == "cosine":
            b = _normalise(b)

        def compute(lo: int, hi: int) -> Tensor:
            a = self.features(model, train[lo:hi])
            if self.kind == "cosine":
                a = _normalise(a)
            return a @ b.T

        values = call.table(len(train), len(call.queries), compute, key={})
        return call.finish(
            values,
            train.ids,
            call.queries.ids,
            method=f"repsim_{self.kind}",
            settings={"layer": self.layer(model), "dim": int(b.shape[1])},
        )


def _normalise(x: Tensor) -> Tensor:
    """Rows scaled to unit length; all-zero rows stay zero (similarity 0 with everything)."""
    norms = x.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, x / norms.clamp(min=1e-300), torch.zeros_like(x))
