"""Influence functions: score(i, j) = ∇m_j(θ)ᵀ (G + λI)⁻¹ (−∇L_i(θ)).

m_j is the query's measurement (log-likelihood of its label by default), L_i the training
example's loss, summed over its tokens. For m = −L this is ∇L_jᵀ (G + λI)⁻¹ ∇L_i. Positive
means: upweighting training example i raises query j's measurement.

Scale: G is the MEAN over the N training examples of the per-example Gauss-Newton (or
Hessian) matrices, the same for every curvature strategy. Upweighting example i by ε in the
mean training objective changes m_j by ≈ ε × score; adding one more copy of it to the N
examples, by ≈ score / N.

Queries are preconditioned once; training examples are streamed in chunks against them and
rows are written as they finish (resumable partitions in a run directory), so the train x
query matrix never has to sit in memory.

A training gradient is Σ_t g_t a_tᵀ over its token positions and the preconditioning sits
on the query side, so every score splits exactly into per-token terms −Σ_layers g_tᵀ Q_j a_t
(`token_scores`, Grosse et al. 2023), for every curvature strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datafluence import store
from datafluence.curvature import Curvature, FitContext, make_curvature, persist
from datafluence.curvature.damping import Damping
from datafluence.gradients.capture import all_factors, gradient_factors
from datafluence.gradients.dots import (
    QueryBlock,
    layer_dots,
    layer_token_dots,
    low_rank,
    query_block,
)
from datafluence.gradients.layers import Modules, modules_setting
from datafluence.gradients.space import ParamSpace
from datafluence.methods.base import SELF_COLUMN, Call, Method, Run
from datafluence.scores import Scores
from datafluence.tasks import Examples, Task


class InfluenceFunction(Method):
    """Influence of every training example on every query through a chosen curvature.

    `curvature`: "identity", "diagonal", "explicit", "cg", "lissa", "arnoldi", "kfac",
    "ekfac" (strategy options as keywords, e.g. fisher="exact", matrix="hessian"), or a
    `Curvature` object. `damping`: absolute λ on the mean curvature (a number, or {layer:
    number}); `damping_factor`: λ = factor x the mean eigenvalue (per layer for
    block-diagonal strategies); neither: factor 0.1. `modules`: names, globs or types of the
    layers to attribute through (None: every Linear, Conv2d and GPT-2 Conv1D layer with
    weights of its own; embeddings only when named). `query_rank`: keep each preconditioned
    query gradient at this rank per layer (scored from activation/gradient factors without
    building per-example weight gradients; approximate). The task's per-example loss must be
    a sum over tokens, not a mean.
    """

    name = "influence"
    task: Task  # never None: the constructor takes one

    def __init__(
        self,
        task: Task,
        curvature: str | Curvature = "ekfac",
        *,
        damping: Damping = None,
        damping_factor: float | None = None,
        modules: Modules = None,
        query_rank: int | None = None,
        chunk_size: int = 32,
        seed: int = 0,
        progress: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size, progress=progress, seed=seed)
        if query_rank is not None and (isinstance(query_rank, bool) or query_rank < 1):
            raise ValueError(f"query_rank must be at least 1 (or None), got {query_rank}")
        self.curvature = make_curvature(curvature, damping, damping_factor, **options)
        self.modules = modules
        self.query_rank = query_rank
        self._fitted_on: str | None = None  # model fingerprint
        self._fitted_data: str | None = None  # training-data fingerprint

    def settings(self) -> dict[str, Any]:
        """What changes the numbers (chunk size and progress bars do not)."""
        return {
            "curvature": self.curvature.settings(),
            "modules": modules_setting(self.modules),
            "query_rank": self.query_rank,
            "seed": self.seed,
            **self.task.settings(),
        }

    @property
    def is_fitted(self) -> bool:
        return self._fitted_on is not None

    def fit(
        self, model: nn.Module | None, train: Any, *, run: Run = None, overwrite: bool = False
    ) -> InfluenceFunction:
        """Fit the curvature on the training set; with `run`, reuse or save it there."""
        call = self.begin(model, run, train=train)
        self._fit(call, overwrite)
        return self

    def _fit(self, call: Call, overwrite: bool = False) -> None:
        model, train = call.model, call.train
        assert model is not None
        ctx = self._context(model, train)
        model_fp = call.model_fp
        assert model_fp is not None  # there is a model
        settings = {**self.settings(), "train": store.examples_fingerprint(train)}
        directory = None if call.run is None else call.run.path / "curvature"
        if directory is not None and persist.exists(directory) and not overwrite:
            head = persist.header(self.curvature, ctx, settings, model_fp)
            persist.load(directory, self.curvature, ctx, head)
        else:
            self.curvature.fit(ctx)
            if directory is not None:
                head = persist.header(self.curvature, ctx, settings, model_fp)
                persist.save(directory, self.curvature, head)
        self._fitted_on, self._fitted_data = model_fp, settings["train"]

    def score(
        self,
        model: nn.Module | None,
        train: Any,
        queries: Any,
        *,
        run: Run = None,
        per_layer: bool = True,
    ) -> Scores:
        """Scores [n_train, n_query]; parts["per_layer"] [n_layers, n_train, n_query] sum to
        the values exactly. Fits the curvature first if `fit` was not called."""
        call = self._prepare(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None (it is call.model)
        space = self._space(model)
        train, queries = call.train, call.queries
        query = self._lazy_query_side(model, queries, space)

        def compute(lo: int, hi: int) -> Tensor:
            batch = {k: v[lo:hi] for k, v in train.tensors.items()}
            factors = gradient_factors(model, self.task, batch, space, "loss")
            blocks = query()
            return -torch.stack(
                [
                    layer_dots(layer, *factors[layer.name], blocks[layer.name])
                    for layer in space.layers
                ],
                dim=1,
            )

        values, parts = call.layered(
            len(train),
            len(queries),
            len(space.layers),
            compute,
            key=self._key(),
            per_layer=per_layer,
        )
        return self._scores(call, values, {} if parts is None else {"per_layer": parts}, space)

    def token_scores(
        self,
        model: nn.Module | None,
        train: Any,
        queries: Any,
        *,
        run: Run = None,
    ) -> Scores:
        """Scores [n_train, n_query] and parts["per_token"] [T, n_train, n_query]: the share
        of each training token position (T = the training examples' padded `input_ids`
        width), summing to the values exactly.

        Position t's term −Σ_layers g_tᵀ Q_j a_t is what the layers' weight gradient at
        input position t contributes: for a causal LM, the prediction of token t + 1 plus
        the way position t's representation serves later predictions. Positions a sequence
        does not use (padding, and its last token, which predicts nothing) hold 0. Every
        selected layer must run once per forward pass on the input positions (Linear,
        GPT-2 Conv1D, token Embedding of a sequence model); Conv2d layers, modules called
        several times, and output heads run on fewer positions (CausalLMTask with
        slice_logits=True) are refused. Like `score`, rows stream in chunks and resume from
        a run directory; the result holds T + 1 matrices the size of the values.
        """
        check_token_layers(self._space(model))
        call = self._prepare(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None (it is call.model)
        train, queries = call.train, call.queries
        width = token_width(train)
        space = self._space(model)
        query = self._lazy_query_side(model, queries, space)

        def compute(lo: int, hi: int) -> Tensor:
            batch = {k: v[lo:hi] for k, v in train.tensors.items()}
            with count_calls(space) as calls:
                factors = gradient_factors(model, self.task, batch, space, "loss")
            fed = token_count(space, factors, calls, width)
            blocks = query()
            first = factors[space.layers[0].name][1]
            out = torch.zeros(
                hi - lo, width, len(queries), dtype=torch.float64, device=first.device
            )
            for layer in space.layers:
                terms = layer_token_dots(layer, *factors[layer.name], blocks[layer.name])
                out[:, :fed] -= terms.double()
            return out

        values, parts = call.layered(
            len(train),
            len(queries),
            width,
            compute,
            key={**self._key(), "parts": "per_token"},
            per_layer=True,
        )
        assert parts is not None
        return self._scores(call, values, {"per_token": parts}, space)

    def self_score(self, model: nn.Module | None, train: Any, *, run: Run = None) -> Scores:
        """Self-influence score(i, i) for every training example: Scores [n_train, 1].

        For classification (m = −L) it is ∇L_iᵀ (G + λI)⁻¹ ∇L_i ≥ 0: how much an example
        relies on itself; high values flag atypical or mislabelled examples. Computed from
        each example's own gradients (never the n x n matrix); resumable with `run`.
        """
        call = self._prepare(model, run, train=train)
        assert model is not None  # begin() refuses None (it is call.model)
        train = call.train
        space = self._space(model)

        def compute(lo: int, hi: int) -> Tensor:
            batch = {k: v[lo:hi] for k, v in train.tensors.items()}
            loss = gradient_factors(model, self.task, batch, space, "loss")
            meas = gradient_factors(model, self.task, batch, space, "measure")
            total = torch.zeros(hi - lo, dtype=torch.float64)
            rest = []  # layers the strategy cannot pair from factors: solve their gradients
            for layer in space.layers:
                pair = None
                if self.curvature.block_diagonal:
                    pair = self.curvature.pair_products(layer, loss[layer.name], meas[layer.name])
                if pair is None:
                    rest.append(layer)
                else:
                    total = total - pair.detach().double().cpu()
            if rest:
                pre = self.curvature.solve(
                    {l.name: l.per_example(*meas[l.name]) for l in rest}  # noqa: E741
                )
                for layer in rest:
                    grads = layer.per_example(*loss[layer.name])
                    dots = (grads * pre[layer.name].to(grads.dtype)).sum(dim=(1, 2))
                    total = total - dots.detach().double().cpu()
            return total[:, None]

        values = call.table(len(train), 1, compute, key={**self._key(), "what": "self_score"})
        return self._scores(call, values, {}, space, query_ids=(SELF_COLUMN,))

    # -- internals --

    def _prepare(self, model: nn.Module | None, run: Run, **sets: Any) -> Call:
        """The shared preparation, then the curvature fitted if it is not yet: what every
        scoring pass does."""
        call = self.begin(model, run, **sets)
        if self._fitted_on is None:
            self._fit(call)
        elif call.model_fp != self._fitted_on:
            raise ValueError(
                "the curvature was fitted on another model (its weights differ); call "
                "fit(model, train) again for this model"
            )
        return call

    def _lazy_query_side(
        self, model: nn.Module, queries: Examples, space: ParamSpace
    ) -> Callable[[], dict[str, QueryBlock]]:
        """The preconditioned queries, built on first use: a resumed run whose partitions are
        all on disk never preconditions them again."""
        cache: dict[str, dict[str, QueryBlock]] = {}

        def get() -> dict[str, QueryBlock]:
            if "query" not in cache:
                cache["query"] = self._query_side(model, queries, space)
            return cache["query"]

        return get

    def _key(self) -> dict[str, Any]:
        """What else fixes the numbers of a scoring pass (names its partitions)."""
        return {"fitted_model": self._fitted_on, "fitted_on": self._fitted_data}

    def _scores(
        self,
        call: Call,
        values: np.ndarray,
        parts: dict[str, np.ndarray],
        space: ParamSpace,
        query_ids: tuple[str, ...] | None = None,
    ) -> Scores:
        return call.finish(
            values,
            call.train.ids,
            query_ids or call.queries.ids,
            parts=parts,
            settings={"layers": space.names, "damping_used": dict(self.curvature.lambdas)},
        )

    def _context(self, model: nn.Module, train: Examples) -> FitContext:
        return FitContext(
            model, self.task, train, self._space(model), self.chunk_size, self.progress, self.seed
        )

    def _space(self, model: nn.Module | None) -> ParamSpace:
        assert model is not None
        return self.space(model)

    def _query_side(
        self, model: nn.Module | None, queries: Examples, space: ParamSpace
    ) -> dict[str, QueryBlock]:
        """Query gradients ∇m_j, preconditioned, in the cheapest exact (or low-rank) form."""
        assert model is not None
        factors = all_factors(model, self.task, queries, space, "measure", self.chunk_size)
        identity = self.curvature.name == "identity"
        if identity and self.query_rank is None:
            return {n: query_block(space.by_name[n], a, g) for n, (a, g) in factors.items()}
        grads = {n: space.by_name[n].per_example(a, g) for n, (a, g) in factors.items()}
        pre = self.curvature.solve(grads)
        if self.query_rank is None:
            return {n: QueryBlock(dense=v) for n, v in pre.items()}
        return {n: QueryBlock(lowrank=low_rank(v, self.query_rank)) for n, v in pre.items()}


def token_width(train: Examples) -> int:
    """The training sequences' padded length: the token axis of per-token scores."""
    ids = train.tensors.get("input_ids")
    if ids is None or ids.ndim != 2:
        got = {k: tuple(v.shape) for k, v in train.tensors.items()}
        raise ValueError(
            "per-token scores need token sequences: the training examples must hold a 2-D "
            f"'input_ids' tensor [n, T], but they hold {got}; build them with "
            "CausalLMTask.examples(texts), or use score() for per-example scores"
        )
    return int(ids.shape[1])


def check_token_layers(space: ParamSpace) -> None:
    """Refuse layers whose 'tokens' are not input positions (known before any pass)."""
    for layer in space.layers:
        if layer.kind == "conv2d":
            raise ValueError(
                f"layer {layer.name!r} is a Conv2d: its tokens are spatial patches, not input "
                "positions; per-token decomposition needs layers applied once per input token "
                "(Linear, GPT-2 Conv1D, token Embedding); leave it out of `modules`"
            )


@contextmanager
def count_calls(space: ParamSpace) -> Iterator[dict[str, int]]:
    """How many times each selected module runs in the forward passes inside the block."""
    calls = dict.fromkeys(space.names, 0)

    def hook(name: str) -> Callable[..., None]:
        def count(*_: Any) -> None:
            calls[name] += 1

        return count

    handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in space.layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def token_count(
    space: ParamSpace, factors: dict[str, tuple[Tensor, Tensor]], calls: dict[str, int], width: int
) -> int:
    """The number of input positions fed to the model, checked to be the token count of every
    selected layer (position t of a layer = input position t)."""
    hint = (
        "per-token decomposition needs layers applied once per input token; leave it out of "
        "`modules`"
    )
    for name, n in calls.items():
        if n != 1:
            raise ValueError(f"module {name!r} ran {n} times in one forward pass; {hint}")
    counts = {name: int(g.shape[1]) for name, (_, g) in factors.items()}
    fed = max(counts.values())
    widest = max(counts, key=counts.__getitem__)
    if fed > width:
        raise ValueError(
            f"layer {widest!r} sees {fed} tokens per example but the training sequences have "
            f"{width} positions; {hint}"
        )
    for name, n in counts.items():
        if n != fed:
            raise ValueError(
                f"layer {name!r} sees {n} tokens per example while layer {widest!r} sees {fed} "
                f"(the input positions); {hint} (a CausalLMTask with slice_logits=True runs the "
                "output head on the predicting positions only: pass slice_logits=False)"
            )
    return fed
