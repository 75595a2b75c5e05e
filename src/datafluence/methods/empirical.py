"""Empirical influence (EIF): really fine-tune on each training example, measure every probe.

EIF(s -> q) = m(θ_s, q) − m(θ, q), θ_s = K optimizer steps on s alone (or on a group).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from datafluence.finetune import (
    BatchedFinetuner,
    FinetuneRecipe,
    LoRAFinetuner,
    finetune_copy,
    measure,
)
from datafluence.methods.base import Method, Run, check_chunk_size
from datafluence.scores import Scores
from datafluence.tasks import Task


class EmpiricalInfluence(Method):
    """The train x probe matrix of measured changes after real per-example fine-tuning.

    `engine="batched"` trains `chunk_size` copies at once (vmap); `engine="naive"` copies
    the model and uses the stock torch optimizer one example at a time (the reference).
    Both give the same numbers (float32, to ~1e-5). `probe_chunk_size`: probes measured
    per forward pass.
    """

    name = "empirical"
    task: Task  # never None: the constructor takes one

    def __init__(
        self,
        task: Task,
        recipe: FinetuneRecipe | None = None,
        *,
        engine: Literal["batched", "naive"] = "batched",
        chunk_size: int = 32,
        probe_chunk_size: int = 256,
        progress: bool = True,
        **recipe_fields: Any,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size, progress=progress)
        if engine not in ("batched", "naive"):
            raise ValueError(f"unknown engine {engine!r}; choose 'batched' or 'naive'")
        self.probe_chunk_size = check_chunk_size(probe_chunk_size, "probe_chunk_size")
        self.recipe = replace(recipe or FinetuneRecipe(), **recipe_fields)
        self.engine = engine

    def settings(self) -> dict[str, Any]:
        """What changes the numbers (engine and chunking do not)."""
        return {"recipe": self.recipe.to_dict(), **self.task.settings()}

    def score(
        self,
        model: nn.Module | None,
        train: Any,
        queries: Any,
        *,
        groups: Sequence[Sequence[int]] | None = None,
        run: Run = None,
    ) -> Scores:
        """EIF of every training example (or group) on every query.

        With `run`, rows are saved in partitions as they finish and a re-run resumes; the
        partitions are keyed by a fingerprint of settings, model and data, so partitions
        made under anything else are never reused.
        """
        call = self.begin(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None: EIF fine-tunes the model
        train, queries = call.train, call.queries
        if groups is None:
            groups = [[i] for i in range(len(train))]
            row_ids = train.ids
        else:
            groups = [list(g) for g in groups]
            _check_groups(groups, len(train))
            row_ids = tuple("+".join(train.ids[i] for i in g) for g in groups)

        # The batched engine, or the naive loop: the batched one hands over to the loop the
        # first time the model fails under vmap (decided on the first chunk computed, so a
        # resumed run pays nothing extra); both give the same numbers.
        state: dict[str, Any] = {"finetuner": None, "used": "naive"}
        if self.engine == "batched":
            engine = LoRAFinetuner if self.recipe.lora_rank else BatchedFinetuner
            state["finetuner"] = engine(model, self.task, self.recipe)
            state["used"] = engine.__name__
        state["base"] = self._base(model, state["finetuner"], queries)

        def compute(lo: int, hi: int) -> np.ndarray:
            finetuner = state["finetuner"]
            after = None
            if finetuner is not None:
                try:
                    params = finetuner.finetune(train, groups[lo:hi], row_ids[lo:hi])
                except VMAP_ERRORS as err:
                    if not isinstance(finetuner, BatchedFinetuner):
                        raise
                    _warn_fallback(err)
                    state.update(finetuner=None, used="naive (the model does not run under vmap)")
                    state["base"] = self._base(model, None, queries)
                else:
                    after = finetuner.measure(params, queries, self.probe_chunk_size)
            if after is None:
                rows = []
                for i in range(lo, hi):
                    batch = train[groups[i]].tensors
                    tuned = finetune_copy(model, self.task, self.recipe, batch, row_ids[i])
                    rows.append(measure(tuned, self.task, queries.tensors))
                after = torch.stack(rows)
            delta = (after.double() - state["base"][None, :]).float()
            bad = (~torch.isfinite(delta)).any(1).nonzero().flatten().tolist()
            if bad:
                names = ", ".join(row_ids[lo + i] for i in bad[:5])
                raise FloatingPointError(
                    f"fine-tuning on {names}{' and others' if len(bad) > 5 else ''} gave "
                    "non-finite measurements; lower the learning rate or the number of steps"
                )
            return delta.cpu().numpy()

        values = call.table(
            len(groups), len(queries), compute, key={"rows": list(row_ids), "groups": groups}
        )
        return call.finish(values, row_ids, queries.ids, settings={"engine_used": state["used"]})

    def _base(self, model: nn.Module, finetuner: Any, queries: Any) -> torch.Tensor:
        """The untouched model's measurements, taken the way the copies will be measured
        (the same float32 rounding on both sides of each difference), in float64: LM
        measurements are float64 sums, subtracted before rounding."""
        if finetuner is not None:
            base = finetuner.measure(finetuner.unchanged(), queries, self.probe_chunk_size)[0]
        else:
            base = measure(model, self.task, queries.tensors)
        if not torch.isfinite(base).all():
            raise FloatingPointError(
                "the model's measurement of some probes is already non-finite before "
                "fine-tuning; check the model and the probes"
            )
        return base.double()


def _check_groups(groups: Sequence[Sequence[int]], n: int) -> None:
    if not groups:
        raise ValueError("groups is empty; give at least one group of training indices")
    for g in groups:
        if not g:
            raise ValueError("every group needs at least one training index")
        bad = [i for i in g if not 0 <= i < n]
        if bad:
            raise ValueError(f"group indices {bad} are outside the training set (0..{n - 1})")


#: what a model that cannot run under torch.func.vmap raises there
VMAP_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


def _warn_fallback(err: BaseException) -> None:
    """One line: why the batched engine cannot run this model, and what runs instead."""
    text = str(err).strip()
    first = text.splitlines()[0][:160] if text else type(err).__name__
    warnings.warn(
        f"EIF: the model does not run under torch.func.vmap ({first}); fine-tuning one copy "
        "at a time with the naive engine instead (the same numbers, slower)",
        UserWarning,
        stacklevel=4,
    )
