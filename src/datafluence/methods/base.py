"""The one contract every attribution method implements, and the machinery they share.

Every method answers "how much does training example i move query j?" with a `Scores`
matrix [n_train, n_query] (positive = i supports j), through the same calls:

    method.fit(model, train, *, run=None)            # a no-op where nothing is fitted
    method.score(model, train, queries, *, run=None) # -> Scores [n_train, n_query]
    method.self_score(model, train, *, run=None)     # -> Scores [n_train, 1], column "self"
    method.settings()                                # only what changes the numbers

and the same keyword-only options with one meaning each:

    chunk_size  training rows computed (and, with a run directory, saved) at a time
    progress    a progress bar on a terminal (default True; never off a terminal)
    seed        every random draw of the method (projections, sampled labels, probes)
    modules     the layers attributed through (`datafluence.gradients.layers.Modules`)
    damping     absolute λ added to the MEAN curvature (G + λI); `damping_factor` instead
                scales the mean eigenvalue (λ = factor × mean eigenvalue); never both

`run=` is a `RunDir`, a `str` or a `Path` everywhere: rows are saved in partitions as they
finish, keyed by the settings, weights and data, so a re-run computes only what is missing
and never reuses rows made under anything else. `Method.begin` is the shared preparation
every entry point runs (data checks, device, run, timer); `Call.table` / `Call.layered`
is the one chunk/partition loop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from datafluence import distributed, progress, store
from datafluence.data import examples as data_examples
from datafluence.gradients.space import ParamSpace
from datafluence.models.defaults import default_modules
from datafluence.progress import check_progress
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import Examples, Task

Run = RunDir | str | Path | None
ROLES = {"train": "training", "queries": "query"}
SELF_COLUMN = "self"


def check_chunk_size(value: Any, name: str = "chunk_size") -> int:
    """A positive integer; the message names the option."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value!r}")
    return int(value)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives: examples are moved there."""
    for p in model.parameters():
        return p.device
    raise ValueError(
        f"the model ({type(model).__name__}) has no parameters; attribution needs a model "
        "with trainable weights"
    )


def place(examples: Examples, device: torch.device, role: str) -> Examples:
    """The examples on the model's device (one policy for every method: data follow the
    model), or a clear error naming the tensor that cannot move."""
    moved = {}
    for key, t in examples.tensors.items():
        if t.device == device:
            moved[key] = t
            continue
        try:
            moved[key] = t.to(device)
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(
                f"the {role} tensor {key!r} is on {t.device} and cannot be moved to the model's "
                f"device {device} ({err}); put the data and the model on one device"
            ) from None
    return Examples(moved, examples.ids, examples.items)


def to_examples(data: Any, task: Task | None, role: str) -> Examples:
    """The data of one side as `Examples` (the conversion every entry point runs once):
    Examples, a Dataset, a DataLoader, a Hugging Face dataset, a list (`datafluence.data`)."""
    return data_examples(data, task, role)


class Method(ABC):
    """Base of every attribution method: options, the shared preparation, the row loop."""

    name: ClassVar[str]
    #: False for methods that read no model (text similarity): `model` may then be None.
    uses_model: ClassVar[bool] = True

    def __init__(
        self, task: Task | None, *, chunk_size: int, progress: bool = True, seed: int = 0
    ) -> None:
        self.task = task
        self.chunk_size = check_chunk_size(chunk_size)
        self.progress = check_progress(progress)
        self.seed = check_seed(seed)

    # -- the contract --

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What changes the numbers (never chunking, progress or timings): JSON-able."""

    @classmethod
    def supports(cls, task: Task | None) -> bool:
        """Whether the method can run with this task (None: no model, texts only)."""
        return task is not None

    @property
    def is_fitted(self) -> bool:
        """Whether `fit` has state to reuse; methods that fit nothing are always fitted."""
        return True

    def fit(self, model: nn.Module | None, train: Any, *, run: Run = None) -> Method:
        """Fit what the method needs from the training set: nothing by default (its inputs
        are checked when it scores, once)."""
        return self

    @abstractmethod
    def score(
        self, model: nn.Module | None, train: Any, queries: Any, *, run: Run = None
    ) -> Scores:
        """Scores [n_train, n_query]: rows = training examples, columns = queries."""

    def self_score(self, model: nn.Module | None, train: Any, *, run: Run = None) -> Scores:
        """score(i, i) for every training example, as Scores [n_train, 1] (column "self").

        By default each chunk of training examples is scored against itself and the
        diagonal kept: exact for every method whose score(i, j) does not depend on the
        other training examples (a fitted curvature or kernel is fitted on all of `train`
        first). Methods with training-set statistics override it.
        """
        call = self.begin(model, run, train=train)
        if not self.is_fitted:
            self.fit(model, call.train, run=call.run)
        examples = call.train

        def compute(lo: int, hi: int) -> np.ndarray:
            block = examples[lo:hi]
            values = self.score(model, block, block).values
            return np.diag(values).astype(np.float64)[:, None]

        values = call.table(len(examples), 1, compute, key={"what": "self_score"})
        return call.finish(values, examples.ids, (SELF_COLUMN,))

    # -- shared machinery --

    def space(self, model: nn.Module) -> ParamSpace:
        """The parameters attributed through: `self.modules`, or the model's defaults
        (`models.defaults.default_modules`: a causal LM's last MLPs, else every layer)."""
        modules = default_modules(model, self.task, getattr(self, "modules", None))
        return ParamSpace.of(model, modules)

    def begin(self, model: nn.Module | None, run: Run = None, **sets: Any) -> Call:
        """Check and place the data of every side, open the run, start the timer.

        Each side is converted to Examples, checked by the task, moved to the model's
        device and run through the model once eagerly (so shape errors read clearly).
        """
        start = time.perf_counter()
        device = None
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            device = model_device(model)
        elif self.uses_model:
            raise ValueError(f"{type(self).__name__} needs a model; got model=None")
        checked: dict[str, Examples] = {}
        for side, data in sets.items():
            role = ROLES.get(side, side)
            examples = to_examples(data, self.task, role)
            if device is not None:
                examples = place(examples, device, role)
            if self.task is not None:
                self.task.check(examples, role)
                if model is not None:
                    self.task.check_model(model, examples, role)
            checked[side] = examples
        _same_fields(checked)
        return Call(self, model, store.as_run(run), checked, start)


def _same_fields(sets: Mapping[str, Examples]) -> None:
    """Every side must hold the same tensors (the model reads them all alike)."""
    names = {side: sorted(ex.tensors) for side, ex in sets.items()}
    if len({tuple(v) for v in names.values()}) > 1:
        shown = "; ".join(f"{ROLES.get(s, s)}: {v}" for s, v in names.items())
        raise ValueError(
            f"the training and query examples hold different fields ({shown}); give both "
            "sides the same keys"
        )


@dataclass
class Call:
    """One call of a method: its checked data, run directory and timer."""

    method: Method
    model: nn.Module | None
    run: RunDir | None
    sets: dict[str, Examples]
    start: float
    _model_fp: str | None = field(default=None, repr=False)

    @property
    def train(self) -> Examples:
        return self.sets["train"]

    @property
    def queries(self) -> Examples:
        return self.sets["queries"]

    @property
    def model_fp(self) -> str | None:
        """The weights' fingerprint, computed once per call (None without a model)."""
        if self._model_fp is None and self.model is not None:
            self._model_fp = store.model_fingerprint(self.model)
        return self._model_fp

    def key(self, extra: Mapping[str, Any]) -> str:
        """What fixes this pass's numbers: settings, weights, data, and `extra`."""
        return store.fingerprint(
            {
                "settings": self.method.settings(),
                "model": self.model_fp,
                **{side: store.examples_fingerprint(ex) for side, ex in self.sets.items()},
                **extra,
            }
        )

    def table(
        self,
        n_rows: int,
        width: int,
        compute: Callable[[int, int], np.ndarray | Tensor],
        *,
        key: Mapping[str, Any],
        desc: str | None = None,
        chunk_size: int | None = None,
    ) -> np.ndarray:
        """An [n_rows, width] float32 table computed `chunk_size` rows at a time.

        With a run directory the chunks are resumable partitions (named by the method and
        `self.key(key)`, assembled memory-mapped on disk); without one, under torchrun,
        each rank computes its share and all gather the whole.
        """
        size = chunk_size or self.method.chunk_size
        name = f"{self.method.name}-{self.key(key)}"
        label = desc or self.method.name
        shown = self.method.progress

        def block(lo: int, hi: int) -> np.ndarray:
            out = compute(lo, hi)
            if isinstance(out, Tensor):
                out = out.detach().double().cpu().numpy()
            return np.asarray(out, dtype=np.float64).reshape(hi - lo, width).astype(np.float32)

        if self.run is None:
            starts = range(0, n_rows, size)
            mine = distributed.shard(len(starts))
            done = distributed.gather(
                {
                    i: block(starts[i], min(starts[i] + size, n_rows))
                    for i in progress.bar(mine, progress=shown, desc=label)
                }
            )
            return np.concatenate([done[i] for i in range(len(starts))])
        self.run.path.mkdir(parents=True, exist_ok=True)
        return self.run.partitioned(
            name,
            n_rows,
            width,
            size,
            block,
            desc=label,
            progress=shown,
            dest=self.run.path / "partitions" / name / "assembled.npy",
        )

    def layered(
        self,
        n_rows: int,
        n_cols: int,
        n_layers: int,
        compute: Callable[[int, int], Tensor],
        *,
        key: Mapping[str, Any],
        per_layer: bool = True,
        desc: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(values [n_rows, n_cols], per-layer parts [n_layers, n_rows, n_cols] or None) from
        chunks of per-layer scores [B, n_layers, n_cols]; the values are their sum in float64,
        so the parts add up to the values by construction."""

        def block(lo: int, hi: int) -> np.ndarray:
            parts = compute(lo, hi).detach().double().cpu().numpy()
            total = parts.sum(axis=1, dtype=np.float64)
            if not per_layer:
                return total
            return np.concatenate([total, parts.reshape(hi - lo, -1)], axis=1)

        width = n_cols * (1 + n_layers) if per_layer else n_cols
        rows = self.table(
            n_rows,
            width,
            block,
            key={**key, "per_layer": per_layer, "n_layers": n_layers},
            desc=desc,
        )
        values = rows[:, :n_cols]
        if not per_layer:
            return values, None
        parts = rows[:, n_cols:].reshape(n_rows, n_layers, n_cols).transpose(1, 0, 2)
        return values, parts

    def finish(
        self,
        values: np.ndarray,
        train_ids: tuple[str, ...],
        query_ids: tuple[str, ...],
        *,
        method: str | None = None,
        parts: Mapping[str, np.ndarray] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Scores:
        """The result: settings = the method's plus what this call resolved (layers used,
        λ used); the seconds it took go to `Scores.timings`, never into settings."""
        return Scores(
            values,
            train_ids,
            query_ids,
            method=method or self.method.name,
            settings={**self.method.settings(), **(settings or {})},
            parts=dict(parts or {}),
            timings={"seconds": round(time.perf_counter() - self.start, 3)},
        )
