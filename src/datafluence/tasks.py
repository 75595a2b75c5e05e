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

    Tensors (not Python objects) so that batches slice cheaply and can be vmapped. `items`
    optionally keeps the raw items (e.g. texts) for methods that rebuild inputs from them,
    such as in-context (prompted) influence.
    """

    tensors: Mapping[str, Tensor]
    ids: tuple[str, ...]
    items: tuple[Any, ...] | None = None

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
        if self.items is not None and len(self.items) != n:
            raise ValueError(f"{len(self.items)} raw items given for {n} examples")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: slice | Sequence[int] | Tensor) -> Examples:
        if isinstance(index, slice):
            items = None if self.items is None else self.items[index]
            return Examples({k: v[index] for k, v in self.tensors.items()}, self.ids[index], items)
        idx = torch.as_tensor(index, dtype=torch.long).tolist()
        ids = tuple(self.ids[i] for i in idx)
        items = None if self.items is None else tuple(self.items[i] for i in idx)
        tensors = {k: v[torch.as_tensor(idx, dtype=torch.long)] for k, v in self.tensors.items()}
        return Examples(tensors, ids, items)

    def to(self, device: torch.device | str) -> Examples:
        return Examples({k: v.to(device) for k, v in self.tensors.items()}, self.ids, self.items)


ModelFn = Callable[..., Tensor]

LOGSUMEXP_BLOCK = 1 << 21  # elements per block: a block's temporaries stay in cache


def picked_log_probs(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits)[..., ids] over the last axis: logits [..., V], ids [...].

    Computed in blocks of rows: `torch.logsumexp` writes two temporaries the size of its
    input, and a language model's [tokens, vocabulary] logits are hundreds of MB, so in one
    call the pass is memory-bound; blockwise the temporaries stay in cache, and the result
    is equal bit for bit, since every row is reduced alone.
    """
    lse = row_logsumexp(logits.reshape(-1, logits.shape[-1]))
    picked = logits.gather(-1, ids[..., None])[..., 0]
    return picked - lse.view(picked.shape)


def row_logsumexp(flat: Tensor) -> Tensor:
    """logsumexp of each row of a 2-D tensor, in blocks of rows that stay in cache (equal bit
    for bit to one `torch.logsumexp` call: every row is reduced alone)."""
    rows = max(1, LOGSUMEXP_BLOCK // max(1, flat.shape[-1]))
    if len(flat) <= rows:
        return torch.logsumexp(flat, dim=-1)
    return torch.cat([torch.logsumexp(b, dim=-1) for b in flat.split(rows)])


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

    def loss(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-example training loss, shape [B]."""
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def measure(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-example measurement, shape [B]; higher = the example is more likely."""
        return self.measure_from_outputs(self.outputs(model, batch), batch)

    @abstractmethod
    def loss_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-example loss as a function of the model's outputs (curvature needs this)."""

    @abstractmethod
    def measure_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Per-example measurement as a function of the model's outputs."""

    def sample_labels(
        self, outputs: Tensor, batch: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """The batch with its targets drawn from the model's predictive distribution (for the
        true Fisher). Tasks without a predictive distribution cannot do this."""
        raise TypeError(
            f"{type(self).__name__} cannot draw labels from the model; use fisher='exact' "
            "or 'empirical'"
        )

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
        return _xy_examples(self, torch.as_tensor(x), torch.as_tensor(y), ids)

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

    def loss_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(outputs, batch["y"], reduction="none")

    def sample_labels(
        self, outputs: Tensor, batch: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        probs = torch.softmax(outputs.detach().double().cpu(), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return {**batch, "y": drawn.to(batch["y"].device)}

    def measure_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        logits = outputs
        if self.measurement == "neg_loss":
            return -F.cross_entropy(logits, batch["y"], reduction="none")
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch["y"][:, None])[:, 0]
        return logp.exp() if self.measurement == "prob" else logp

    def measure_copies(self, model_copies: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """Measurements [C, M] from a model that returns logits [C, M, n_classes] of C
        parameter copies at once (a model's `forward_copies`, used by the EIF engine)."""
        logits = model_copies(batch["x"])
        copies, m = logits.shape[:2]
        y = batch["y"].expand(copies, m).reshape(-1)
        return self.measure_from_outputs(logits.flatten(0, 1), {"y": y}).view(copies, m)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "num_classes": self.num_classes}


def _xy_examples(task: Task, x: Tensor, y: Tensor, ids: Sequence[str] | None) -> Examples:
    """Inputs `x` and targets `y` as checked examples (ids default to positions)."""
    if x.shape[0] == 0:
        raise ValueError("the example set is empty; give at least one example")
    names = tuple(str(i) for i in (ids if ids is not None else range(x.shape[0])))
    examples = Examples({"x": x, "y": y}, names)
    task.check(examples)
    return examples


def _maybe_eval(model: ModelFn) -> AbstractContextManager[Any]:
    return eval_mode(model) if isinstance(model, nn.Module) else nullcontext()


LMItem = str | tuple[str, str]


class CausalLMTask(Task):
    """Causal language modelling on texts or (prompt, completion) pairs.

    Training loss = summed token cross-entropy of the completion (of the whole text when
    there is no prompt); measurement = log p(completion | prompt) summed over completion
    tokens. Prompt tokens are masked from both. Sums, not means, so that a long completion
    counts as the product of its tokens' probabilities. `slice_logits=True` passes
    `logits_to_keep` (Hugging Face causal LMs); set it False for models without it.

    Every sequence starts with the tokenizer's BOS (or EOS) token; prompt and completion are
    tokenized separately and their id lists concatenated, so the boundary is exact.
    Sequences are right-padded; causal attention keeps padding from touching real tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        measurement: Measurement = "log_prob",
        max_length: int | None = None,
        slice_logits: bool = True,
    ) -> None:
        if measurement not in MEASUREMENTS:
            raise ValueError(f"unknown measurement {measurement!r}; choose one of {MEASUREMENTS}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "the tokenizer has no pad token; set one first, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked out)"
            )
        self.tokenizer = tokenizer
        self.measurement = measurement
        self.max_length = max_length
        self.slice_logits = slice_logits

    @property
    def start_id(self) -> int | None:
        """The token every sequence starts with: BOS, else EOS (GPT-2's convention), else none.

        With a start token every completion token, the first included, is predicted from
        some context, so a text and the same text after a prompt measure the same tokens.
        """
        tok = self.tokenizer
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(tok, name, None)
            if value is not None:
                return int(value)
        return None

    def encode(self, item: LMItem) -> tuple[list[int], int]:
        """Token ids of one item and the position where its completion starts."""
        if isinstance(item, str):
            prompt, completion = "", item
        elif isinstance(item, tuple | list) and len(item) == 2:
            prompt, completion = item
        else:
            raise ValueError(
                f"an LM example is a text or a (prompt, completion) pair, got {item!r}"
            )
        if not str(completion).strip():
            raise ValueError(f"empty completion in {item!r}; every example needs text to predict")
        tok = self.tokenizer
        start = [] if self.start_id is None else [self.start_id]
        head = start + (tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
        tail = tok(completion, add_special_tokens=False)["input_ids"]
        if not head:  # no start token and no prompt: the first token has no context
            head, tail = tail[:1], tail[1:]
        if not tail:
            raise ValueError(f"{item!r} leaves no completion token to predict; make it longer")
        return list(head) + list(tail), len(head)

    def examples(self, items: Sequence[LMItem], ids: Sequence[str] | None = None) -> Examples:
        """Tokenize, right-pad and mask a list of texts / (prompt, completion) pairs."""
        items = [tuple(i) if isinstance(i, list) else i for i in items]
        if not items:
            raise ValueError("the example set is empty; give at least one text")
        encoded = [self.encode(item) for item in items]
        return self.examples_from_ids(encoded, ids, tuple(items))

    def examples_from_ids(
        self,
        encoded: Sequence[tuple[list[int], int]],
        ids: Sequence[str] | None = None,
        items: tuple[Any, ...] | None = None,
    ) -> Examples:
        """Right-padded examples from (token ids, completion start) pairs."""
        if not encoded:
            raise ValueError("the example set is empty; give at least one text")
        longest = max(len(ids_) for ids_, _ in encoded)
        if self.max_length is not None and longest > self.max_length:
            worst = max(range(len(encoded)), key=lambda i: len(encoded[i][0]))
            shown = items[worst] if items is not None else f"number {worst}"
            raise ValueError(
                f"example {shown!r} has {longest} tokens, more than the model's context of "
                f"{self.max_length}; shorten it or raise max_length"
            )
        n = len(encoded)
        input_ids = torch.full((n, longest), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        target = torch.zeros((n, longest), dtype=torch.long)
        for row, (token_ids, start) in enumerate(encoded):
            input_ids[row, : len(token_ids)] = torch.as_tensor(token_ids)
            attention[row, : len(token_ids)] = 1
            target[row, start : len(token_ids)] = 1
        names = tuple(str(i) for i in ids) if ids is not None else tuple(str(i) for i in range(n))
        tensors = {"input_ids": input_ids, "attention_mask": attention, "target_mask": target}
        return Examples(tensors, names, items)

    def check(self, examples: Examples, role: str = "examples") -> None:
        super().check(examples, role)
        missing = {"input_ids", "attention_mask", "target_mask"} - set(examples.tensors)
        if missing:
            raise ValueError(
                f"language-model {role} need tensors {sorted(missing)}; build them with "
                "CausalLMTask.examples(texts)"
            )

    def check_model(self, model: ModelFn, examples: Examples, role: str = "examples") -> Tensor:
        """Also check the context length and the vocabulary against the model's config."""
        config = getattr(model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        longest = int(examples.tensors["attention_mask"].sum(-1).max())
        if limit is not None and longest > limit:
            raise ValueError(
                f"{role} contain a sequence of {longest} tokens but the model's context is "
                f"{limit}; shorten the texts"
            )
        vocab = getattr(config, "vocab_size", None)
        top = int(examples.tensors["input_ids"].max())
        if vocab is not None and top >= vocab:
            raise ValueError(
                f"{role} contain token id {top} but the model's vocabulary has {vocab} entries; "
                "use the model's own tokenizer"
            )
        return super().check_model(model, examples, role)

    def outputs(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits [B, T', V] for the positions that predict completion tokens.

        With `slice_logits` (Hugging Face models: `logits_to_keep`), the vocabulary
        projection runs only on the span [lo, hi) of positions that predict some
        completion token of the batch: far less memory and compute for long prompts.
        """
        lo, hi = self._span(batch)
        kwargs = {"logits_to_keep": torch.arange(lo, hi)} if self.slice_logits else {}
        out = model(
            input_ids=batch["input_ids"][:, :hi],
            attention_mask=batch["attention_mask"][:, :hi],
            **kwargs,
        )
        logits = out.logits if hasattr(out, "logits") else out
        if logits.ndim != 3:
            raise ValueError(
                f"the model returned shape {tuple(logits.shape)}; a causal LM must return "
                "logits [batch, tokens, vocab]"
            )
        return logits if self.slice_logits else logits[:, lo:hi]

    @staticmethod
    def _span(batch: Mapping[str, Tensor]) -> tuple[int, int]:
        """Positions lo..hi-1 predict tokens lo+1..hi: the completion tokens of the batch."""
        has_target = batch["target_mask"].bool().any(0).nonzero().flatten()
        return int(has_target[0]) - 1, int(has_target[-1])

    def token_log_probs(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        """log p(token_t | tokens_<t) for every completion token, 0 elsewhere: [B, T]."""
        return self.token_log_probs_from_outputs(self.outputs(model, batch), batch)

    def token_log_probs_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """outputs[:, t] (from `outputs`) predicts input_ids[:, lo + 1 + t]."""
        lo, hi = self._span(batch)
        logits = outputs if outputs.dtype == torch.float64 else outputs.float()
        ids = batch["input_ids"][:, lo + 1 : hi + 1]
        logp = picked_log_probs(logits, ids)
        mask = batch["target_mask"][:, lo + 1 : hi + 1].to(logp.dtype)
        width = batch["input_ids"].shape[1]
        return torch.nn.functional.pad(logp * mask, (lo + 1, width - hi - 1))

    def loss_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return -self.token_log_probs_from_outputs(outputs, batch).sum(-1)

    def measure_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Summed in float64: EIF subtracts two such sums, and a text's log-probability is
        large (-100 for 20 tokens, whose float32 spacing is already 8e-6)."""
        logp = self.token_log_probs_from_outputs(outputs, batch).double().sum(-1)
        return logp.exp() if self.measurement == "prob" else logp

    def sample_labels(
        self, outputs: Tensor, batch: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Sampled tokens replace the next-token targets, never the tokens the model reads:
        the outputs were computed on the real inputs and the loss is recomputed from them."""
        probs = torch.softmax(outputs.detach().double().cpu(), dim=-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        drawn = drawn.reshape(probs.shape[:-1])
        lo, hi = self._span(batch)
        ids = batch["input_ids"].clone()
        mask = batch["target_mask"][:, lo + 1 : hi + 1].bool()
        ids[:, lo + 1 : hi + 1] = torch.where(mask, drawn.to(ids.device), ids[:, lo + 1 : hi + 1])
        return {**batch, "input_ids": ids}

    def settings(self) -> dict[str, Any]:
        name = getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
        return {**super().settings(), "tokenizer": str(name), "max_length": self.max_length}


class RegressionTask(Task):
    """Real-valued targets `y` [N, k] (a 1-D target becomes [N, 1]) from inputs `x`.

    Loss L = ½ Σ_k (f(x)_k − y_k)² per example (the Gaussian negative log-likelihood with unit
    variance, up to a constant), so its Hessian in the outputs is the identity and the
    Gauss-Newton matrix is JᵀJ. The only measurement is "neg_loss" (= −L): higher = the
    model fits the example better, as for every task.
    """

    def __init__(self, measurement: str = "neg_loss") -> None:
        if measurement != "neg_loss":
            raise ValueError(
                f"a regression task measures 'neg_loss' (−½ squared error), got {measurement!r}"
            )
        self.measurement = measurement

    def examples(
        self, x: Tensor, y: Tensor | Sequence[float], ids: Sequence[str] | None = None
    ) -> Examples:
        """Build a checked set of examples from inputs and real targets."""
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        if not y.dtype.is_floating_point:
            y = y.to(x.dtype if x.dtype.is_floating_point else torch.get_default_dtype())
        return _xy_examples(self, x, y[:, None] if y.ndim == 1 else y, ids)

    def check(self, examples: Examples, role: str = "examples") -> None:
        super().check(examples, role)
        if "x" not in examples.tensors or "y" not in examples.tensors:
            raise ValueError(
                f"regression {role} need tensors 'x' (inputs) and 'y' (targets), "
                f"got {sorted(examples.tensors)}"
            )
        y = examples.tensors["y"]
        if not y.dtype.is_floating_point or y.ndim != 2:
            raise ValueError(
                f"{role} targets must be a floating-point tensor [N, k], got dtype {y.dtype} "
                f"and shape {tuple(y.shape)}; build them with RegressionTask.examples"
            )
        for name in ("x", "y"):
            t = examples.tensors[name]
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                raise ValueError(f"{role} {name!r} contains NaN or Inf; clean it first")

    def outputs(self, model: ModelFn, batch: Mapping[str, Tensor]) -> Tensor:
        out = model(batch["x"])
        y = batch["y"]
        if out.shape != y.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for targets of shape "
                f"{tuple(y.shape)}; a regressor must return [batch, k] like the targets"
            )
        return out

    def loss_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return 0.5 * (outputs - batch["y"].to(outputs.dtype)).pow(2).sum(-1)

    def measure_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return -self.loss_from_outputs(outputs, batch)

    def sample_labels(
        self, outputs: Tensor, batch: Mapping[str, Tensor], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """Targets drawn from the model's predictive N(f(x), I) (drawn on the CPU), so that
        E[g gᵀ] is the Gauss-Newton matrix (fisher="sample" in K-FAC / EK-FAC)."""
        noise = torch.randn(outputs.shape, generator=generator, dtype=torch.float64)
        drawn = outputs.detach().double().cpu() + noise
        return {**batch, "y": drawn.to(device=outputs.device, dtype=batch["y"].dtype)}
