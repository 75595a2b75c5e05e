"""Prompted (in-context) empirical influence: the training text placed in the prompt.

EIF_ctx(s -> q) = log p_θ(c_q | s ⊕ p_q) − log p_θ(c_q | p_q): no weight changes, the same
completion tokens measured with and without the training text in front of the prompt.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from datafluence import store
from datafluence.finetune import measure
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import CausalLMTask, Examples

DEFAULT_TEMPLATE = "{context}\n{prompt}"


class PromptedInfluence:
    """The in-context counterpart of EmpiricalInfluence for causal language models.

    `template` joins a training text (`{context}`) and a query's prompt (`{prompt}`, empty
    for plain-text queries); it is saved with the scores. Each row's contexts are
    measured in batches of about `batch_size` sequences.
    """

    name = "prompted"

    def __init__(
        self,
        task: CausalLMTask,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        if not isinstance(task, CausalLMTask):
            raise TypeError("prompted influence needs a CausalLMTask (text in, text out)")
        if "{context}" not in template or "{prompt}" not in template:
            raise ValueError(
                f"template {template!r} must contain both {{context}} and {{prompt}}, "
                "e.g. '{context}\\n{prompt}'"
            )
        if task.start_id is None:
            raise ValueError(
                "the tokenizer has neither a BOS nor an EOS token, so a plain-text query's first "
                "token cannot be measured the same way with and without context; give queries "
                "as (prompt, completion) pairs or a tokenizer with a BOS token"
            )
        self.task = task
        self.template = template
        self.batch_size = batch_size
        self.progress = progress

    def settings(self) -> dict[str, Any]:
        return {"template": self.template, **self.task.settings()}

    def pairs(self, context: str, queries: Examples) -> list[tuple[str, str]]:
        """(prompt with the context in front, completion) for every query."""
        out = []
        for item in _items(queries, "queries"):
            prompt, completion = ("", item) if isinstance(item, str) else item
            out.append((self.template.format(context=context, prompt=prompt), completion))
        return out

    def score(
        self, model: nn.Module, train: Examples, queries: Examples, run: RunDir | None = None
    ) -> Scores:
        contexts = [_as_text(item) for item in _items(train, "training examples")]
        self.task.check(queries, "probe")
        device = next(model.parameters()).device
        base = measure(model, self.task, queries.to(device).tensors).float()
        start = time.perf_counter()

        def compute(lo: int, hi: int) -> np.ndarray:
            rows = []
            for context in contexts[lo:hi]:
                examples = self.task.examples(self.pairs(context, queries)).to(device)
                if lo == 0 and not rows:
                    self.task.check_model(model, examples, "prompted queries")
                values = torch.cat(
                    [
                        measure(model, self.task, examples[s : s + self.batch_size].tensors)
                        for s in range(0, len(examples), self.batch_size)
                    ]
                ).float()
                rows.append(values - base)
            return torch.stack(rows).cpu().numpy()

        n = len(contexts)
        per_part = max(1, self.batch_size // max(1, len(queries)))
        if run is None:
            bounds = range(0, n, per_part)
            bar = tqdm(bounds, desc="prompted EIF", disable=not self.progress, leave=False)
            values = np.concatenate([compute(lo, min(lo + per_part, n)) for lo in bar])
        else:
            key = store.fingerprint(
                {
                    "settings": self.settings(),
                    "model": store.model_fingerprint(model),
                    "train": contexts,
                    "queries": [list(q) if isinstance(q, tuple) else q for q in queries.items],
                }
            )
            values = run.partitioned(
                f"prompted-{key}", n, len(queries), per_part, compute, progress=self.progress
            )
        settings = {**self.settings(), "seconds": round(time.perf_counter() - start, 3)}
        return Scores(values, train.ids, queries.ids, method=self.name, settings=settings)


def _items(examples: Examples, role: str) -> tuple[Any, ...]:
    if examples.items is None:
        raise ValueError(
            f"prompted influence needs the raw texts of the {role}; build them with "
            "CausalLMTask.examples(texts) so the texts are kept"
        )
    if not examples.items:
        raise ValueError(f"the {role} set is empty")
    return examples.items


def _as_text(item: Any) -> str:
    """A training item as the text placed in context (a pair is joined as written)."""
    return item if isinstance(item, str) else f"{item[0]}{item[1]}"
