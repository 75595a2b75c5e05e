"""Per-example gradients from module hooks: no model surgery, the user's forward untouched.

A forward hook records each selected module's input and puts a tensor hook on its output;
every backward pass then delivers the gradient at that output. Because examples do not mix
inside a forward pass (eval mode), the output gradient of a summed per-example loss is each
example's own gradient, and Σ_t g_t a_tᵀ is that example's weight gradient, summed over its
tokens. A module called several times in one forward contributes its calls as extra tokens.
The tensor hook is registered before any in-place op on the output, so it still receives the
gradient with respect to the module's own output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from datafluence.gradients.space import Blocks, ParamSpace
from datafluence.tasks import Examples, Task, eval_mode

Factors = dict[str, tuple[Tensor, Tensor]]


class Capture:
    """Hooks on the selected layers; read `factors()` after each backward pass."""

    def __init__(self, space: ParamSpace) -> None:
        self.space = space
        self._inputs: dict[str, list[Tensor]] = {}
        self._grads: dict[str, dict[int, Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Capture:
        for layer in self.space.layers:
            self._handles.append(
                layer.module.register_forward_hook(partial(self._forward, layer.name))
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward(self, name: str, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(f"module {name!r} returned {type(output).__name__}, not a tensor")
        calls = self._inputs.setdefault(name, [])
        calls.append(inputs[0].detach())
        if output.requires_grad:
            output.register_hook(partial(self._backward, name, len(calls) - 1))

    def _backward(self, name: str, call: int, grad: Tensor) -> None:
        self._grads.setdefault(name, {})[call] = grad.detach()

    def new_pass(self) -> None:
        """Forget output gradients (inputs stay): call before each backward pass."""
        self._grads = {}

    def clear(self) -> None:
        self._inputs, self._grads = {}, {}

    def inputs(self, batch_size: int) -> dict[str, Tensor]:
        """Each layer's inputs [B, T, d_in'] (indices for embeddings), calls joined as tokens."""
        out = {}
        for layer in self.space.layers:
            calls = self._inputs.get(layer.name)
            if not calls:
                raise RuntimeError(
                    f"module {layer.name!r} was not called in the forward pass; it may be used "
                    "through its weights directly (as inside nn.MultiheadAttention) or not at "
                    "all; leave it out of `modules`"
                )
            out[layer.name] = _join([layer.inputs(x, batch_size) for x in calls])
        return out

    def factors(self, batch_size: int, inputs: Mapping[str, Tensor] | None = None) -> Factors:
        """(a [B, T, d_in'], g [B, T, d_out]) per layer for the last backward pass."""
        inputs = inputs if inputs is not None else self.inputs(batch_size)
        out = {}
        for layer in self.space.layers:
            got = self._grads.get(layer.name, {})
            n_calls = len(self._inputs[layer.name])
            if len(got) != n_calls:
                raise RuntimeError(
                    f"no gradient reached module {layer.name!r} in the backward pass (got "
                    f"{len(got)} of {n_calls} calls); does the loss depend on it?"
                )
            g = _join([layer.output_grads(got[k], batch_size) for k in range(n_calls)])
            out[layer.name] = (inputs[layer.name], g)
        return out


def _join(calls: list[Tensor]) -> Tensor:
    """Calls of one module as extra tokens; a single call is returned as is (no copy)."""
    return calls[0] if len(calls) == 1 else torch.cat(calls, dim=1)


def per_example(values: Tensor, batch_size: int, what: str) -> Tensor:
    """Check that a task returned one value per example."""
    if values.ndim != 1 or values.shape[0] != batch_size:
        raise ValueError(
            f"the task's {what} returned shape {tuple(values.shape)} for a batch of {batch_size} "
            f"examples; influence needs one {what} per example (reduction='none', summed over "
            "tokens), shape [batch]"
        )
    if not torch.isfinite(values).all():
        raise FloatingPointError(
            f"the task's {what} is NaN or Inf on some examples; check the model and the data"
        )
    return values


def objective(task: Task, which: str) -> Callable[[nn.Module, Mapping[str, Tensor]], Tensor]:
    if which == "loss":
        return task.loss
    if which == "measure":
        return task.measure
    raise ValueError(f"which must be 'loss' or 'measure', got {which!r}")


def batch_size_of(batch: Mapping[str, Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def gradient_factors(
    model: nn.Module,
    task: Task,
    batch: Mapping[str, Tensor],
    space: ParamSpace,
    which: str = "loss",
) -> Factors:
    """(a, g) per layer for the per-example loss ("loss") or measurement ("measure")."""
    fn = objective(task, which)
    b = batch_size_of(batch)
    with eval_mode(model), space.gradients_on(model) as params, Capture(space) as cap:
        values = per_example(fn(model, batch), b, which)
        torch.autograd.grad(values.sum(), params, allow_unused=True)
        return cap.factors(b)


def factors_to_gradients(space: ParamSpace, factors: Factors) -> Blocks:
    return {n: space.by_name[n].per_example(a, g) for n, (a, g) in factors.items()}


def per_example_gradients(
    model: nn.Module,
    task: Task,
    examples: Examples | Mapping[str, Tensor],
    space: ParamSpace | None = None,
    which: str = "loss",
    chunk_size: int = 64,
) -> Blocks:
    """Per-example gradients {layer: [N, d_out, d_in']} of the loss or the measurement.

    The matrix form puts the bias in the last column (see `Layer`); use
    `ParamSpace.flatten` for [N, P] vectors.
    """
    space = space or ParamSpace.of(model)
    tensors = examples.tensors if isinstance(examples, Examples) else examples
    n = batch_size_of(tensors)
    parts: dict[str, list[Tensor]] = {name: [] for name in space.names}
    for lo in range(0, n, chunk_size):
        batch = {k: v[lo : lo + chunk_size] for k, v in tensors.items()}
        for name, grads in factors_to_gradients(
            space, gradient_factors(model, task, batch, space, which)
        ).items():
            parts[name].append(grads)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def chunks(examples: Examples, size: int) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
    """(lo, hi, batch) over a set of examples."""
    n = len(examples)
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        yield lo, hi, {k: v[lo:hi] for k, v in examples.tensors.items()}


def check_devices(model: nn.Module, examples: Sequence[tuple[str, Examples]]) -> torch.device:
    """The model's device; a clear error when some examples live elsewhere."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("the model has no parameters") from None
    for role, ex in examples:
        for key, t in ex.tensors.items():
            if t.device != device:
                raise ValueError(
                    f"the {role} tensor {key!r} is on {t.device} but the model is on {device}; "
                    f"move them together, e.g. {role} = {role}.to({str(device)!r})"
                )
    return device


def all_factors(
    model: nn.Module,
    task: Task,
    examples: Examples,
    space: ParamSpace,
    which: str = "measure",
    chunk_size: int = 64,
) -> Factors:
    """(a, g) per layer for a whole (small) set of examples, e.g. the queries."""
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in space.names}
    for _, _, batch in chunks(examples, chunk_size):
        for name, pair in gradient_factors(model, task, batch, space, which).items():
            parts[name].append(pair)
    return {
        name: (_cat_tokens([a for a, _ in pairs]), _cat_tokens([g for _, g in pairs]))
        for name, pairs in parts.items()
    }


def _cat_tokens(blocks: list[Tensor]) -> Tensor:
    """Chunks of factors [B, T, d] joined along B; a chunk of shorter sequences (a causal
    LM's forward stops at its chunk's last predicting token) is zero-padded to the longest T,
    which adds nothing to any Σ_t g_t a_tᵀ."""
    if len(blocks) > 1 and blocks[0].ndim == 3:
        width = max(b.shape[1] for b in blocks)
        blocks = [torch.nn.functional.pad(b, (0, 0, 0, width - b.shape[1])) for b in blocks]
    return torch.cat(blocks)
