"""Tasks: how a model is trained and measured on a batch of examples.

A method never needs to know whether it faces a classifier or a language model: it asks the
task for per-example training losses and per-example measurements. Both are per example
(never reduced over the batch) because influence is a per-example quantity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Measurement = Literal["log_prob", "prob", "neg_loss"]
MEASUREMENTS: tuple[str, ...] = ("log_prob", "prob", "neg_loss")


@dataclass(frozen=True)
class Examples:
    """A set of examples as a dict of tensors sharing the leading dimension, plus ids.

    Tensors (not Python objects) so that batches slice cheaply and can be vmapped.
    """

    tensors: Mapping[str, Tensor]
    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("Examples need at least one tensor (e.g. {'x': ..., 'y': ...})")
        lengths = {name: int(t.shape[0]) for name, t in self.tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"all tensors of a set of examples must have the same first dimension, got {lengths}"
            )
        n = next(iter(lengths.values()))
        if len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids given for {n} examples; give one id per example")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("example ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: slice | Sequence[int] | Tensor) -> Examples:
        if isinstance(index, slice):
            ids = self.ids[index]
            return Examples({k: v[index] for k, v in self.tensors.items()}, ids)
        idx = torch.as_tensor(index, dtype=torch.long)
        ids = tuple(self.ids[i] for i in idx.tolist())
        return Examples({k: v[idx] for k, v in self.tensors.items()}, ids)

    def to(self, device: torch.device | str) -> Examples:
        return Examples({k: v.to(device) for k, v in self.tensors.items()}, self.ids)


ModelFn = Callable[..., Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off, BatchNorm reads but never updates its statistics), restored after.

    Every forward pass that is not training (measurements, checks) goes through it, so
    looking at a model never changes it.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Task(ABC):
    """Per-example loss (what fine-tuning minimises) and measurement (what a probe reports)."""

    measurement: str

    @abstractmethod
    def loss(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-example training loss, shape [B]."""

    @abstractmethod
    def measure(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-example measurement, shape [B]; higher = the example is more likely."""

    def check(self, examples: Examples, role: str = "examples") -> None:
        """Raise a clear error if the examples cannot be used with this task."""
        if len(examples) == 0:
            raise ValueError(f"the {role} set is empty; give at least one example")

    def check_model(self, model: ModelFn, examples: Examples, role: str = "examples") -> Tensor:
        """Run one example through the model eagerly, turning shape errors into clear ones.

        Returns that example's raw output so subclasses can check it further.
        """
        batch = examples[:1].tensors
        try:
            with torch.no_grad(), _maybe_eval(model):
                return self.outputs(model, batch)
        except (RuntimeError, ValueError, IndexError) as err:
            shapes = {k: tuple(v.shape[1:]) for k, v in examples.tensors.items()}
            raise ValueError(
                f"the model cannot run on the {role}: per-example shapes {shapes} gave: {err} "
                "Make the inputs match what the model was built for."
            ) from err

    @abstractmethod
    def outputs(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """The model's raw output on a batch, checked for shape."""

    def settings(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "measurement": self.measurement}


class ClassificationTask(Task):
    """Cross-entropy classification; examples hold inputs `x` and integer labels `y`.

    Measurements: "log_prob" = log p(y|x) (default), "prob" = p(y|x), "neg_loss" = −loss.
    """

    def __init__(self, num_classes: int | None = None, measurement: Measurement = "log_prob"):
        if measurement not in MEASUREMENTS:
            raise ValueError(f"unknown measurement {measurement!r}; choose one of {MEASUREMENTS}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.measurement = measurement

    def examples(self, x: Tensor, y: Tensor | Sequence[int], ids: Sequence[str] | None = None):
        """Build a checked set of examples from inputs and labels."""
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if x.shape[0] == 0:
            raise ValueError("the example set is empty; give at least one example")
        if ids is None:
            ids = [str(i) for i in range(x.shape[0])]
        examples = Examples({"x": x, "y": y}, tuple(str(i) for i in ids))
        self.check(examples)
        return examples

    def check(self, examples: Examples, role: str = "examples") -> None:
        super().check(examples, role)
        if "x" not in examples.tensors or "y" not in examples.tensors:
            raise ValueError(
                f"classification {role} need tensors 'x' (inputs) and 'y' (labels), "
                f"got {sorted(examples.tensors)}"
            )
        y = examples.tensors["y"]
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim != 1:
            raise ValueError(
                f"{role} labels must be a 1-D integer tensor of class indices, got dtype "
                f"{y.dtype} and shape {tuple(y.shape)}"
            )
        low, high = int(y.min()), int(y.max())
        if low < 0 or (self.num_classes is not None and high >= self.num_classes):
            bound = self.num_classes if self.num_classes is not None else "the number of classes"
            raise ValueError(
                f"{role} labels must lie in [0, {bound}), found labels from {low} to {high}; "
                "relabel them or set num_classes"
            )
        if not torch.isfinite(examples.tensors["x"].float()).all():
            raise ValueError(f"{role} inputs contain NaN or Inf; clean them first")

    def outputs(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        logits = model(batch["x"])
        y = batch["y"]
        if logits.ndim != 2 or logits.shape[0] != y.shape[0]:
            raise ValueError(
                f"the model returned shape {tuple(logits.shape)} for {y.shape[0]} inputs; a "
                "classifier must return logits [batch, n_classes]"
            )
        return logits

    def check_model(self, model: ModelFn, examples: Examples, role: str = "examples") -> Tensor:
        """Also check labels against the model's output size (it reads values: no vmap)."""
        logits = super().check_model(model, examples, role)
        high = int(examples.tensors["y"].max())
        if high >= logits.shape[-1]:
            raise ValueError(
                f"{role} label {high} is out of range for a model with {logits.shape[-1]} "
                "outputs; check the labels or the model's output size"
            )
        return logits

    def loss(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(self.outputs(model, batch), batch["y"], reduction="none")

    def measure(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        logits = self.outputs(model, batch)
        if self.measurement == "neg_loss":
            return -F.cross_entropy(logits, batch["y"], reduction="none")
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["y"][:, None])[:, 0]
        return logp.exp() if self.measurement == "prob" else logp

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_classes": self.num_classes}


def _maybe_eval(model: ModelFn) -> AbstractContextManager[Any]:
    return eval_mode(model) if isinstance(model, nn.Module) else nullcontext()
