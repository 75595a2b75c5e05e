"""Seconds of CG and LiSSA solves with the curvature operator, beside its earlier conversions.

A 784-64-10 MLP (float32), 500 training examples (chunks of 32), 10 query gradients solved at
once. "earlier" re-implements the operator before its conversions were batched: the vectors
turned into parameter tensors column by column for every chunk, and every chunk's result
flattened column by column. Both must give the same numbers bit for bit (checked). Run:
`.venv/bin/python benchmarks/curvature_operator_speed.py [--threads 2]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from datafluence.curvature import iterative
from datafluence.curvature.fisher import loss_from_outputs
from datafluence.curvature.operator import CurvatureOperator, _grad
from datafluence.gradients.capture import batch_size_of, chunks, per_example, per_example_gradients
from datafluence.methods.influence import InfluenceFunction
from datafluence.runtime import tune_allocator
from datafluence.tasks import ClassificationTask, eval_mode


class EarlierOperator(CurvatureOperator):
    """Per-chunk, per-column conversions between [P, k] and parameter tensors."""

    def matvec(self, vectors: Tensor, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        ctx = self.ctx
        examples = ctx.train if indices is None else ctx.train[torch.as_tensor(indices)]
        out = torch.zeros(vectors.shape, dtype=torch.float64, device=vectors.device)
        with eval_mode(ctx.model), ctx.space.gradients_on(ctx.model) as params:
            for _, _, batch in chunks(examples, ctx.chunk_size):
                product = self._gn_flat if self.matrix == "gn" else self._hessian_flat
                out += product(batch, params, vectors)
        return out / len(examples)

    def _hessian_flat(self, batch: dict[str, Tensor], params: list, vectors: Tensor) -> Tensor:
        losses = per_example(
            self.ctx.task.loss(self.ctx.model, batch), batch_size_of(batch), "loss"
        )
        grads = torch.autograd.grad(losses.sum(), params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:
            return torch.zeros_like(vectors)
        v = self._columns_to_params(vectors)
        return self._columns_flat(
            _grad([grads[i] for i in used], params, [v[i] for i in used]), params
        )

    def _gn_flat(self, batch: dict[str, Tensor], params: list, vectors: Tensor) -> Tensor:
        task = self.ctx.task
        outputs = task.outputs(self.ctx.model, batch)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        jt_dummy = torch.autograd.grad(outputs, params, dummy, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(jt_dummy) if g is not None]
        out_d = outputs.detach().requires_grad_(True)
        losses = loss_from_outputs(task, out_d, batch)
        (dl,) = torch.autograd.grad(losses.sum(), out_d, create_graph=True)
        v = self._columns_to_params(vectors)
        (jv,) = _grad([jt_dummy[i] for i in used], [dummy], [v[i] for i in used])
        (hjv,) = _grad([dl], [out_d], [jv])
        return self._columns_flat(_grad([outputs], params, [hjv]), params)

    def _columns_to_params(self, vectors: Tensor) -> list[Tensor]:
        cols = [self.ctx.space.to_param_tensors(vectors[:, j]) for j in range(vectors.shape[1])]
        return [torch.stack(group) for group in zip(*cols, strict=True)]

    def _columns_flat(self, grads: Sequence[Tensor | None], params: list) -> Tensor:
        k = next(g.shape[0] for g in grads if g is not None)
        filled = [
            torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
            for g, p in zip(grads, params, strict=True)
        ]
        return torch.stack(
            [self.ctx.space.from_param_grads([g[j] for g in filled]) for j in range(k)], dim=1
        ).double()


def solve(kind: str, operator: type, model, task, train, grads, **options) -> tuple[float, dict]:
    iterative.CurvatureOperator = operator  # what CG / LiSSA bind when fitted
    try:
        start = time.perf_counter()
        method = InfluenceFunction(task, kind, progress=False, **options).fit(model, train)
        out = method.curvature.solve(grads)
        return time.perf_counter() - start, out
    finally:
        iterative.CurvatureOperator = CurvatureOperator


def main() -> None:
    tune_allocator()  # the same allocator settings as the CLI (benchmarks/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    task = ClassificationTask(num_classes=10)
    gen = torch.Generator().manual_seed(0)
    train = task.examples(
        torch.rand(500, 1, 28, 28, generator=gen), torch.randint(0, 10, (500,), generator=gen)
    )
    queries = task.examples(
        torch.rand(10, 1, 28, 28, generator=gen),
        torch.randint(0, 10, (10,), generator=gen),
        [f"q{i}" for i in range(10)],
    )
    grads = per_example_gradients(model, task, queries)
    print(f"784-64-10 MLP, 500 training examples, 10 queries, {args.threads} threads")
    cases = {
        "cg (fit + solve)": ("cg", {"damping": 1e-2}),
        "lissa, depth 30 (fit + solve)": ("lissa", {"damping": 1e-2, "depth": 30}),
    }
    for label, (kind, options) in cases.items():
        before, a = solve(kind, EarlierOperator, model, task, train, grads, **options)
        after, b = solve(kind, CurvatureOperator, model, task, train, grads, **options)
        same = all(torch.equal(a[n], b[n]) for n in a)
        print(
            f"{label:>30}: earlier {before:6.2f} s, now {after:6.2f} s "
            f"({before / after:.1f}x), identical: {same}"
        )
        if not same:
            raise SystemExit("the operator changed its numbers")


if __name__ == "__main__":
    main()
