"""TRAK (Park et al. 2023): a kernel regression on projected gradients of the model output.

For each checkpoint (or independently trained model) θ_m:
  - output function f(z; θ): the margin log(p/(1 − p)) of the correct class (classification);
  - features φ(z) = Pᵀ ∇_θ f(z; θ_m), P a seeded random projection to `projection_dim`
    dimensions (one per checkpoint, as in the reference implementation), or the raw
    gradient when projection_dim=None; Φ [N, k] stacks the training features;
  - out-to-loss weights Q_i = 1 − p_i (p_i: the probability of the correct class), since
    ∂L_i/∂f_i = −(1 − p_i) for the cross-entropy L = log(1 + e^(−f)).
Scores, averaged over the M checkpoints as in Park et al. (Algorithm 1):

    score(i, j) = [ (1/M) Σ_m φ_m(z_j)ᵀ (Φ_mᵀ Φ_m + λ_m I)⁻¹ φ_m(z_i) ] · [ (1/M) Σ_m Q_m,i ]

Positive: training on i raises the query's margin (makes its label more likely), the
package's sign convention. The query side is always the margin of the query's own label,
whatever the task's `measurement`. Damping has the meaning it has for every method
(`curvature.damping`): `damping=λ` is added to the MEAN kernel ΦᵀΦ / N, i.e. λ_m = N λ on
ΦᵀΦ (0 for none: a pseudo-inverse then drops null directions); `damping_factor=f` gives
λ = f × the mean eigenvalue of the mean kernel (the default f = 1e-3 keeps the solve
well-posed when k ≥ N; per checkpoint). The reference implementation uses no ridge and,
optionally, soft-thresholding of the scores; neither is reproduced.

Language models (CausalLMTask): f = Σ_t log(p_t/(1 − p_t)) over the completion tokens and
Q = the mean over those tokens of (1 − p_t), exact for one completion token and an
approximation otherwise (each token really has its own weight). A custom task may supply
its own output function as a method `trak_output(model, batch) -> (f [B], Q [B])`.

With a run directory, each checkpoint's training features (the expensive part) are saved as
they finish and score rows are written chunk by chunk, so an interrupted run resumes and the
train x query matrix never sits in memory at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from datafluence import store
from datafluence.curvature.damping import check_damping
from datafluence.gradients.capture import chunks, gradient_factors
from datafluence.gradients.layers import Modules, modules_setting
from datafluence.gradients.projection import RandomProjection
from datafluence.methods.base import Method, Run
from datafluence.models.checkpoints import (
    Checkpoint,
    check_checkpoints,
    describe_checkpoint,
    using_checkpoint,
)
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import CausalLMTask, ClassificationTask, Examples, Task

DEFAULT_FACTOR = 1e-3
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def output_function(task: Task, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """TRAK's model output f [B] (differentiable) and out-to-loss weight Q [B] (detached)."""
    custom = getattr(task, "trak_output", None)
    if callable(custom):
        f, q = custom(model, batch)
        return f, q.detach()
    check_supported(task)
    return output_from_logits(task, task.outputs(model, batch), batch)


def check_supported(task: Any) -> None:
    if callable(getattr(task, "trak_output", None)):
        return
    if not isinstance(task, ClassificationTask | CausalLMTask):
        raise TypeError(
            f"TRAK has no output function for {type(task).__name__}; use ClassificationTask "
            "or CausalLMTask, or give the task a method trak_output(model, batch) -> (f, Q)"
        )


def output_from_logits(
    task: Task, logits: Tensor, batch: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """(f, Q) from the task's raw outputs (classification or causal-LM logits)."""
    if isinstance(task, ClassificationTask):
        f = _margins(logits, batch["y"])
        return f, torch.sigmoid(-f).detach()  # 1 − p, as p = sigmoid(f)
    if isinstance(task, CausalLMTask):
        lo, hi = task._span(batch)
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        ids = batch["input_ids"][:, lo + 1 : hi + 1]
        mask = batch["target_mask"][:, lo + 1 : hi + 1].to(logits.dtype)
        margins = _margins(logits, ids)  # [B, T']
        f = (margins * mask).sum(-1)
        q = (torch.sigmoid(-margins.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return f, q
    check_supported(task)
    raise AssertionError("unreachable")


def _margins(logits: Tensor, labels: Tensor) -> Tensor:
    """log(p/(1 − p)) of each label = its logit − logsumexp of the other logits."""
    correct = logits.gather(-1, labels[..., None])[..., 0]
    hide = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, labels[..., None], True)
    others = logits.masked_fill(hide, float("-inf")).logsumexp(-1)
    return correct - others


class _OutputTask:
    """The task seen through TRAK's output function: its measurement is f, so the gradient
    machinery (which differentiates a task's measurement) is reused as is. Keeps the last Q
    it computed. Duck-typed (not a Task subclass) so it only forwards what it needs."""

    measurement = "trak_margin"

    def __init__(self, base: Task) -> None:
        self.base = base
        self.q: Tensor | None = None

    def outputs(self, model: Any, batch: Mapping[str, Tensor]) -> Tensor:
        return self.base.outputs(model, batch)

    def loss(self, model: Any, batch: Mapping[str, Tensor]) -> Tensor:
        return self.base.loss(model, batch)

    def measure(self, model: Any, batch: Mapping[str, Tensor]) -> Tensor:
        f, self.q = output_function(self.base, model, batch)
        return f

    def measure_from_outputs(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        f, self.q = output_from_logits(self.base, outputs, batch)
        return f

    def settings(self) -> dict[str, Any]:
        return {**self.base.settings(), "measurement": self.measurement}


class TRAK(Method):
    """TRAK attribution with ensembling over checkpoints.

    `checkpoints`: state dicts or paths loaded into the model in turn (None: the model's own
    weights). `projection_dim`: k (None: no projection, the raw gradient; small models only,
    the kernel is P x P). `projection`: "rademacher" or "gaussian", drawn from `seed`.
    `modules`: the layers whose parameters are used (as in InfluenceFunction).
    `damping` / `damping_factor`: see the module docstring.
    """

    name = "trak"
    task: Task  # never None: the constructor takes one

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[Checkpoint] | None = None,
        *,
        projection_dim: int | None = 2048,
        damping: float | None = None,
        damping_factor: float | None = None,
        modules: Modules = None,
        projection: str = "rademacher",
        seed: int = 0,
        chunk_size: int = 32,
        progress: bool = True,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size, progress=progress, seed=seed)
        if isinstance(damping, Mapping):
            raise TypeError("TRAK takes one damping number (its kernel is not split by layer)")
        checked, self.damping_factor = check_damping(damping, damping_factor, allow_zero=True)
        self.damping = cast("float | None", checked)  # a Mapping was refused above
        check_supported(task)
        self.checkpoints = check_checkpoints(checkpoints)
        self.projector = (
            None
            if projection_dim is None
            else RandomProjection(projection_dim, projection, self.seed)
        )
        self.modules = modules
        self._fitted: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "checkpoints": [describe_checkpoint(c) for c in self.checkpoints],
            "projection": None if self.projector is None else self.projector.settings(),
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            "modules": modules_setting(self.modules),
            "output": "margin log(p/(1-p))",
            "out_to_loss": "1 - p",
            "ensemble": "mean kernel term x mean Q",
            **self.task.settings(),
        }

    @property
    def is_fitted(self) -> bool:
        return self._fitted is not None

    # -- fitting: training features and kernels --

    def fit(self, model: nn.Module | None, train: Any, *, run: Run = None) -> TRAK:
        """Training features Φ_m (Φ_mᵀΦ_m + λ_m I)⁻¹ and Q for every checkpoint.

        With `run`, each checkpoint's Φ_m and Q_m are saved there as they finish (among the
        run's partitions, so `drop_partitions` frees them) and reused by a re-run.
        """
        call = self.begin(model, run, train=train)
        assert model is not None  # begin() refuses None: TRAK reads the model
        train = call.train
        if self.projector is not None and self.projector.dim >= len(train):
            warnings.warn(
                f"TRAK's projection_dim={self.projector.dim} is at least the number of training "
                f"examples ({len(train)}): the kernel then fits every training example exactly, "
                "every leverage tends to 1 and the scores collapse onto the loss ranking; "
                f"choose projection_dim well below {len(train)} (e.g. {max(1, len(train) // 4)})",
                UserWarning,
                stacklevel=2,
            )
        features, qs, lambdas, fingerprints = [], [], [], []
        layers: list[str] = []
        for m, checkpoint in enumerate(self.checkpoints):
            with using_checkpoint(model, checkpoint):
                fingerprints.append(store.model_fingerprint(model))
                layers = self.space(model).names
                phi, q = self._train_features(model, train, m, fingerprints[-1], call.run)
            x, lam = _kernel_features(phi, self.damping, self.damping_factor)
            features.append(x.to(phi.dtype))
            qs.append(q.double())
            lambdas.append(lam)
        self._fitted = {
            "features": features,
            "q": torch.stack(qs).mean(0),
            "ids": train.ids,
            "index": {i: n for n, i in enumerate(train.ids)},
            "data": store.examples_fingerprint(train),
            "models": fingerprints,
            "damping_used": lambdas,
            "layers": layers,
            "dim": int(features[0].shape[1]),
        }
        return self

    def _train_features(
        self, model: nn.Module, train: Examples, m: int, model_fp: str, run: RunDir | None
    ) -> tuple[Tensor, Tensor]:
        """`_features` of the training set, loaded from / saved to the run when there is one.

        Keyed by what fixes them (projection, layers, task, checkpoint, weights, data), not
        by the damping, which only enters the kernel solve.
        """
        if run is None:
            return self._features(model, train, m)
        what = {k: v for k, v in self.settings().items() if k not in ("checkpoints", "damping")}
        key = store.fingerprint(
            {
                "settings": what,
                "checkpoint": m,
                "model": model_fp,
                "train": store.examples_fingerprint(train),
            }
        )
        folder = run.path / "partitions" / f"trak_features-{key}"
        phi_path, q_path = folder / "features.npy", folder / "q.npy"
        device = next(model.parameters()).device
        if phi_path.exists() and q_path.exists():
            phi = torch.from_numpy(np.load(phi_path)).to(device)
            return phi, torch.from_numpy(np.load(q_path)).to(device)
        phi, q = self._features(model, train, m)
        if phi.dtype in _NUMPY_FLOATS and q.dtype in _NUMPY_FLOATS:  # bfloat16: not cached
            store.atomic_save_npy(q_path, q.cpu().numpy())
            store.atomic_save_npy(phi_path, phi.cpu().numpy())  # last: marks the pair done
        return phi, q

    def _features(self, model: nn.Module, examples: Examples, m: int) -> tuple[Tensor, Tensor]:
        """Output-function gradient features [N, k] (projected or raw) and Q [N]."""
        space = self.space(model)
        out_task = _OutputTask(self.task)
        # A fresh projector per checkpoint: its matrix cache then holds this checkpoint's
        # matrices only (the projection is a pure function of seed and name either way).
        proj = None
        if self.projector is not None:
            proj = RandomProjection(self.projector.dim, self.projector.kind, self.projector.seed)
        feats, qs = [], []
        for _, _, batch in chunks(examples, self.chunk_size):
            factors = gradient_factors(model, out_task, batch, space, "measure")  # type: ignore[arg-type]
            assert out_task.q is not None
            qs.append(out_task.q)
            grads = {n: space.by_name[n].per_example(a, g) for n, (a, g) in factors.items()}
            if proj is None:
                feats.append(space.flatten(grads))
            else:
                feats.append(
                    cast(
                        Tensor, sum(proj.project(f"checkpoint{m}/{n}", v) for n, v in grads.items())
                    )
                )
        return torch.cat(feats).detach(), torch.cat(qs)

    # -- scoring --

    def score(
        self, model: nn.Module | None, train: Any, queries: Any, *, run: Run = None
    ) -> Scores:
        """Scores [n_train, n_query]; fits on `train` first if `fit` was not called.

        After fit, `train` may be the fitted set or a subset of it (matched by id), e.g. a
        query's pre-filtered candidates. With `run`, the fit's features and the score rows
        are saved as they finish and a re-run computes only what is missing.
        """
        call = self.begin(model, run, train=train, queries=queries)
        assert model is not None  # begin() refuses None: TRAK reads the model
        train, queries = call.train, call.queries
        if self._fitted is None:
            self.fit(model, train, run=call.run)
        fitted = self._fitted
        assert fitted is not None
        rows = self._rows(train)
        for m, checkpoint in enumerate(self.checkpoints):
            with using_checkpoint(model, checkpoint):
                if store.model_fingerprint(model) != fitted["models"][m]:
                    raise ValueError(
                        f"checkpoint {m} ({describe_checkpoint(checkpoint)}) differs from the one "
                        "TRAK was fitted with; call fit(model, train) again"
                    )
        cache: dict[str, list[Tensor]] = {}  # built on first use: a resumed run whose
        # partitions are all on disk never computes the query features again

        def compute(lo: int, hi: int) -> Tensor:
            if "query" not in cache:
                cache["query"] = [self._query_features(model, queries, m) for m in range(n)]
            idx = rows[lo:hi]
            total = sum(
                fitted["features"][m][idx].double() @ phi_q.T
                for m, phi_q in enumerate(cache["query"])
            )
            values = (total / n) * fitted["q"][idx, None].to(total.device)  # type: ignore[union-attr]
            return values

        n = len(self.checkpoints)
        values = call.table(
            len(train),
            len(queries),
            compute,
            key={"models": fitted["models"], "fitted_on": fitted["data"]},
        )
        return call.finish(
            values,
            train.ids,
            queries.ids,
            settings={
                "layers": fitted["layers"],
                "damping_used": fitted["damping_used"],
                "feature_dim": fitted["dim"],
            },
        )

    def _query_features(self, model: nn.Module, queries: Examples, m: int) -> Tensor:
        """Query features φ_m(z_j) [Q, k] in float64 at checkpoint m."""
        with using_checkpoint(model, self.checkpoints[m]):
            phi_q, _ = self._features(model, queries, m)
        return phi_q.double()

    def _rows(self, train: Examples) -> Tensor:
        fitted = self._fitted
        assert fitted is not None
        if train.ids == fitted["ids"]:
            if store.examples_fingerprint(train) != fitted["data"]:
                raise ValueError(
                    "the training examples differ from those TRAK was fitted on (same ids, other "
                    "data); call fit(model, train) again"
                )
            return torch.arange(len(train))
        missing = [i for i in train.ids if i not in fitted["index"]]
        if missing:
            raise ValueError(
                f"{len(missing)} training examples (e.g. {missing[:3]}) were not in the set TRAK "
                "was fitted on; call fit(model, train) with the full training set"
            )
        return torch.as_tensor([fitted["index"][i] for i in train.ids], dtype=torch.long)


def _kernel_features(
    phi: Tensor, damping: float | None, damping_factor: float | None
) -> tuple[Tensor, float]:
    """Φ (ΦᵀΦ + NλI)⁻¹ [N, k] in float64, and λ (on the mean kernel ΦᵀΦ / N); null
    directions dropped when λ = 0.

    Solved in the smaller of the two spaces: with N < k through the N x N Gram matrix, as
    Φ (ΦᵀΦ + λI)⁻¹ = (ΦΦᵀ + λI)⁻¹ Φ (pseudo-inverses alike when λ = 0).
    """
    phi = phi.double()
    n, k = phi.shape
    dual = n < k
    gram = phi @ phi.T if dual else phi.T @ phi
    if damping is None:  # the mean kernel's mean eigenvalue is tr(ΦᵀΦ) / (N k)
        factor = DEFAULT_FACTOR if damping_factor is None else damping_factor
        lam = factor * float(torch.trace(gram)) / (n * k)
    else:
        lam = damping
    eig, vec = torch.linalg.eigh(gram)
    shifted = eig.clamp(min=0) + n * lam
    tol = shifted.max().clamp(min=1e-300) * max(n, k) * torch.finfo(torch.float64).eps
    inv = torch.where(shifted > tol, 1.0 / shifted, torch.zeros_like(shifted))
    if dual:
        return (vec * inv) @ (vec.T @ phi), lam
    return ((phi @ vec) * inv) @ vec.T, lam
