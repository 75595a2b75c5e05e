"""Empirical influence (EIF): really fine-tune on each training example, measure every probe.

EIF(s -> q) = m(θ_s, q) − m(θ, q), θ_s = K optimizer steps on s alone (or on a group).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from datafluence import store
from datafluence.finetune import (
    BatchedFinetuner,
    FinetuneRecipe,
    LoRAFinetuner,
    finetune_copy,
    measure,
)
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import Examples, Task


class EmpiricalInfluence:
    """The train x probe matrix of measured changes after real per-example fine-tuning.

    `engine="batched"` trains `chunk_size` copies at once (vmap); `engine="naive"` copies
    the model and uses the stock torch optimizer one example at a time (the reference).
    Both give the same numbers (float32, to ~1e-5).
    """

    name = "empirical"

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
        if engine not in ("batched", "naive"):
            raise ValueError(f"unknown engine {engine!r}; choose 'batched' or 'naive'")
        if chunk_size < 1 or probe_chunk_size < 1:
            raise ValueError("chunk_size and probe_chunk_size must be at least 1")
        self.task = task
        self.recipe = replace(recipe or FinetuneRecipe(), **recipe_fields)
        self.engine = engine
        self.chunk_size = chunk_size
        self.probe_chunk_size = probe_chunk_size
        self.progress = progress

    def settings(self) -> dict[str, Any]:
        """What changes the numbers (engine and chunking do not)."""
        return {"recipe": self.recipe.to_dict(), **self.task.settings()}

    def score(
        self,
        model: nn.Module,
        train: Examples,
        queries: Examples,
        groups: Sequence[Sequence[int]] | None = None,
        run: RunDir | None = None,
    ) -> Scores:
        """EIF of every training example (or group) on every query.

        With `run`, rows are saved in partitions as they finish and a re-run resumes; the
        partitions are keyed by a fingerprint of settings, model and data, so partitions
        made under anything else are never reused.
        """
        self.task.check(train, "training")
        self.task.check(queries, "probe")
        if groups is None:
            groups = [[i] for i in range(len(train))]
            row_ids = train.ids
        else:
            groups = [list(g) for g in groups]
            _check_groups(groups, len(train))
            row_ids = tuple("+".join(train.ids[i] for i in g) for g in groups)
        device = _device_of(model)
        train, queries = train.to(device), queries.to(device)
        self.task.check_model(model, train, "training")
        self.task.check_model(model, queries, "probe")

        start = time.perf_counter()
        finetuner = None
        if self.engine == "batched":
            engine = LoRAFinetuner if self.recipe.lora_rank else BatchedFinetuner
            finetuner = engine(model, self.task, self.recipe)
            # the untouched model measured the way the copies will be: the same float32
            # rounding on both sides of each difference
            base = finetuner.measure(finetuner.unchanged(), queries, self.probe_chunk_size)[0]
        else:
            base = measure(model, self.task, queries.tensors)
        base = base.double()  # LM measurements are float64 sums: subtract before rounding
        if not torch.isfinite(base).all():
            raise FloatingPointError(
                "the model's measurement of some probes is already non-finite before "
                "fine-tuning; check the model and the probes"
            )

        def compute(lo: int, hi: int) -> np.ndarray:
            if finetuner is not None:
                params = finetuner.finetune(train, groups[lo:hi], row_ids[lo:hi])
                after = finetuner.measure(params, queries, self.probe_chunk_size)
            else:
                rows = []
                for i in range(lo, hi):
                    batch = train[groups[i]].tensors
                    tuned = finetune_copy(model, self.task, self.recipe, batch, row_ids[i])
                    rows.append(measure(tuned, self.task, queries.tensors))
                after = torch.stack(rows)
            delta = (after.double() - base[None, :]).float()
            bad = (~torch.isfinite(delta)).any(1).nonzero().flatten().tolist()
            if bad:
                names = ", ".join(row_ids[lo + i] for i in bad[:5])
                raise FloatingPointError(
                    f"fine-tuning on {names}{' and others' if len(bad) > 5 else ''} gave "
                    "non-finite measurements; lower the learning rate or the number of steps"
                )
            return delta.cpu().numpy()

        n = len(groups)
        size = self.chunk_size if self.engine == "batched" else max(1, self.chunk_size)
        if run is None:
            values = np.concatenate(
                [
                    compute(lo, min(lo + size, n))
                    for lo in tqdm(
                        range(0, n, size),
                        desc="EIF",
                        unit="chunk",
                        disable=not self.progress,
                        leave=False,
                    )
                ]
            )
        else:
            key = store.fingerprint(
                {
                    "settings": self.settings(),
                    "model": store.model_fingerprint(model),
                    "rows": list(row_ids),
                    "groups": groups,
                    "train": store.examples_fingerprint(train),
                    "queries": store.examples_fingerprint(queries),
                }
            )
            values = run.partitioned(
                f"eif-{key}", n, len(queries), size, compute, desc="EIF", progress=self.progress
            )
        settings = {**self.settings(), "seconds": round(time.perf_counter() - start, 3)}
        return Scores(values, row_ids, queries.ids, method=self.name, settings=settings)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise ValueError("the model has no parameters")


def _check_groups(groups: list[list[int]], n: int) -> None:
    if not groups:
        raise ValueError("groups is empty; give at least one group of training indices")
    for g in groups:
        if not g:
            raise ValueError("every group needs at least one training index")
        bad = [i for i in g if not 0 <= i < n]
        if bad:
            raise ValueError(f"group indices {bad} are outside the training set (0..{n - 1})")
