"""Prompted (in-context) empirical influence: the training text placed in the prompt.

EIF_ctx(s -> q) = log p_θ(c_q | s ⊕ p_q) − log p_θ(c_q | p_q): no weight changes, the same
completion tokens measured with and without the training text in front of the prompt.

A sequence is assembled from token lists, [start] + tokens(prefix) + tokens(prompt + suffix)
+ tokens(completion), where the template "…{context}…{prompt}…" gives the prefix (up to
{prompt}, with the context filled in) and the suffix. Every query of a row shares the
prefix, so its key/value cache is computed once and reused across the row's queries.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from datafluence.finetune import measure
from datafluence.methods.base import Method, Run, check_chunk_size
from datafluence.scores import Scores
from datafluence.tasks import CausalLMTask, Examples, Task, eval_mode, picked_log_probs

DEFAULT_TEMPLATE = "{context}\n{prompt}"


class PromptedInfluence(Method):
    """The in-context counterpart of EmpiricalInfluence for causal language models.

    `template` joins a training text (`{context}`) and a query's prompt (`{prompt}`, empty
    for plain-text queries); it is saved with the scores. `chunk_size` training rows are
    computed (and saved) at a time, as in every method; `probe_chunk_size` sequences go
    through the model per forward pass (as in EmpiricalInfluence).
    """

    name = "prompted"

    def __init__(
        self,
        task: CausalLMTask,
        template: str = DEFAULT_TEMPLATE,
        *,
        chunk_size: int = 8,
        probe_chunk_size: int = 64,
        reuse_prefix: bool = True,
        progress: bool = True,
    ) -> None:
        if not isinstance(task, CausalLMTask):
            raise TypeError("prompted influence needs a CausalLMTask (text in, text out)")
        super().__init__(task, chunk_size=chunk_size, progress=progress)
        if template.count("{context}") != 1 or template.count("{prompt}") != 1:
            raise ValueError(
                f"template {template!r} must contain both {{context}} and {{prompt}} once, "
                "e.g. '{context}\n{prompt}'"
            )
        if template.index("{context}") > template.index("{prompt}"):
            raise ValueError("the template must place {context} before {prompt}")
        if task.start_id is None:
            raise ValueError(
                "the tokenizer has neither a BOS nor an EOS token, so a plain-text query's first "
                "token cannot be measured the same way with and without context; give queries "
                "as (prompt, completion) pairs or a tokenizer with a BOS token"
            )
        self.task: CausalLMTask = task
        self.template = template
        self.probe_chunk_size = check_chunk_size(probe_chunk_size, "probe_chunk_size")
        self.reuse_prefix = reuse_prefix

    @classmethod
    def supports(cls, task: Task | None) -> bool:
        return isinstance(task, CausalLMTask)

    def settings(self) -> dict[str, Any]:
        return {"template": self.template, **self.task.settings()}

    def _tokens(self, text: str) -> list[int]:
        return self.task.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prefix_ids(self, context: str) -> list[int]:
        head = self.template.split("{prompt}")[0].format(context=context)
        start = self.task.start_id
        assert start is not None  # __init__ refuses a tokenizer without one
        return [start, *self._tokens(head)]

    def rests(self, queries: Examples) -> list[tuple[list[int], int]]:
        """Per query: the tokens after the prefix, and where its completion starts in them."""
        suffix = self.template.split("{prompt}")[1]
        out = []
        for item in _items(queries, "queries"):
            prompt, completion = ("", item) if isinstance(item, str) else item
            head, tail = self._tokens(prompt + suffix), self._tokens(completion)
            if not tail:
                raise ValueError(f"query {item!r} has no completion token to measure")
            out.append((head + tail, len(head)))
        return out

    def score(
        self, model: nn.Module | None, train: Any, queries: Any, *, run: Run = None
    ) -> Scores:
        """Scores [n_train, n_query]: the change in each query's log-probability when the
        training text is placed in front of its prompt."""
        call = self.begin(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None: the model is measured
        train, queries = call.train, call.queries
        contexts = [_as_text(item) for item in _items(train, "training examples")]
        device = next(model.parameters()).device
        base = measure(model, self.task, queries.tensors).double()
        rests = self.rests(queries)
        step = self.probe_chunk_size

        def compute(lo: int, hi: int) -> np.ndarray:
            rows = []
            for context in contexts[lo:hi]:
                prefix = self.prefix_ids(context)
                if self.reuse_prefix:
                    values = self._with_cache(model, prefix, rests, device)
                else:
                    full = [(prefix + ids, len(prefix) + at) for ids, at in rests]
                    examples = self.task.examples_from_ids(full).to(device)
                    self.task.check_model(model, examples, "prompted queries")
                    values = torch.cat(
                        [
                            measure(model, self.task, examples[s : s + step].tensors)
                            for s in range(0, len(examples), step)
                        ]
                    )
                rows.append((values.double() - base).float())
            return torch.stack(rows).cpu().numpy()

        texts = [list(q) if isinstance(q, tuple) else q for q in _items(queries, "queries")]
        values = call.table(
            len(contexts), len(queries), compute, key={"train_texts": contexts, "queries": texts}
        )
        return call.finish(values, train.ids, queries.ids)

    @torch.no_grad()
    def _with_cache(
        self, model: nn.Module, prefix: list[int], rests: list[tuple[list[int], int]], device
    ) -> torch.Tensor:
        """log p(completion | prefix + rest) for every rest, the prefix run once."""
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        longest = len(prefix) + max(len(ids) for ids, _ in rests)
        if limit is not None and longest > limit:
            raise ValueError(
                f"a prompted query has {longest} tokens but the model's context is {limit}; "
                "shorten the texts"
            )
        with eval_mode(model):
            out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            last = torch.log_softmax(out.logits[0, -1].float(), -1)
            results = []
            for s in range(0, len(rests), self.probe_chunk_size):
                chunk = rests[s : s + self.probe_chunk_size]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), int(self.task.tokenizer.pad_token_id))
                mask = torch.zeros((len(chunk), len(prefix) + width), dtype=torch.long)
                target = torch.zeros((len(chunk), width))
                for r, (tokens, at) in enumerate(chunk):
                    ids[r, : len(tokens)] = torch.tensor(tokens)
                    mask[r, : len(prefix) + len(tokens)] = 1
                    target[r, at : len(tokens)] = 1
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(len(chunk))
                logits = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache
                ).logits.float()
                # token r of the rest is predicted by rest position r-1, token 0 by the prefix
                head = logits[:, :-1]
                logp = picked_log_probs(head, ids[:, 1:].to(device))
                first = last[ids[:, 0].to(device)]
                token_logp = torch.cat([first[:, None], logp], dim=1)
                results.append((token_logp * target.to(device)).double().sum(1))
        values = torch.cat(results)
        return values.exp() if self.task.measurement == "prob" else values


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
