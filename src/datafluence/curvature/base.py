"""One interface for every inverse-curvature strategy, and the registry of strategies.

Scale convention (identical for every strategy): G is the MEAN over training examples of the
per-example Gauss-Newton (or Hessian) matrices, each example's loss being a SUM over its
tokens. `solve(v)` returns (G + λI)⁻¹ v. Influence scores built on it therefore predict the
change of a measurement after upweighting an example by ε in the mean training objective as
ε × score, i.e. 1/N × score for adding one more copy of it to N examples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from datafluence.curvature.damping import Damping, check_damping, resolve
from datafluence.gradients.capture import chunks
from datafluence.gradients.layers import Layer
from datafluence.gradients.space import Blocks, ParamSpace
from datafluence.progress import bar as progress_bar
from datafluence.tasks import Examples, Task


@dataclass
class FitContext:
    """What a strategy may look at while fitting."""

    model: nn.Module
    task: Task
    train: Examples
    space: ParamSpace
    chunk_size: int = 32
    progress: bool = False
    seed: int = 0

    def batches(self, desc: str = "curvature") -> Iterator[dict[str, Tensor]]:
        total = -(-len(self.train) // self.chunk_size)
        for _, _, batch in progress_bar(
            chunks(self.train, self.chunk_size), progress=self.progress, total=total, desc=desc
        ):
            yield batch

    def generator(self, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + stream)


class Curvature(ABC):
    """(G + λI)⁻¹ applied to blocks of vectors {layer: [k, d_out, d_in']}."""

    name: ClassVar[str]
    block_diagonal: ClassVar[bool] = True

    def __init__(self, damping: Damping = None, *, damping_factor: float | None = None) -> None:
        self.damping, self.damping_factor = check_damping(damping, damping_factor)
        self.space: ParamSpace | None = None
        self.lambdas: dict[str, float] = {}  # the damping used, per block ("*" = whole)

    def options(self) -> dict[str, Any]:
        """Strategy-specific settings that change the numbers."""
        return {}

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "damping": self.damping,
            "damping_factor": self.damping_factor,
            **self.options(),
        }

    def resolve_damping(self, block: str, mean_eigenvalue: float) -> float:
        """λ for one block (recorded in `lambdas` by the caller): see curvature.damping."""
        return resolve(self.damping, self.damping_factor, block, mean_eigenvalue)

    @property
    def fitted(self) -> bool:
        return self.space is not None

    def fit(self, ctx: FitContext) -> None:
        self.space = ctx.space
        self._bind(ctx)
        self._fit(ctx)

    @abstractmethod
    def _fit(self, ctx: FitContext) -> None: ...

    def solve(self, vectors: Blocks) -> Blocks:
        """(G + λI)⁻¹ v for every vector; v given per layer as [k, d_out, d_in']."""
        if self.space is None:
            raise RuntimeError(f"the {self.name} curvature is not fitted; call fit first")
        return self._solve(vectors)

    @abstractmethod
    def _solve(self, vectors: Blocks) -> Blocks: ...

    def pair_products(
        self, layer: Layer, left: tuple[Tensor, Tensor], right: tuple[Tensor, Tensor]
    ) -> Tensor | None:
        """⟨Σ_t g_t a_tᵀ, (G_l + λI)⁻¹ Σ_s g'_s a'_sᵀ⟩ per example [B] for two sets of factors
        (a, g) of the same examples, when the strategy can get it from the factors more
        cheaply than by solving gradient matrices (self-influence); None otherwise."""
        return None

    def state(self) -> dict[str, Tensor]:
        """Everything fitted, as tensors (saved with safetensors)."""
        return {}

    def load_state(self, state: dict[str, Tensor], ctx: FitContext) -> None:
        """Restore a fitted strategy; matrix-free ones also keep `ctx` for their products."""
        self.space = ctx.space
        self._bind(ctx)
        self._load(state)

    def _bind(self, ctx: FitContext) -> None:  # noqa: B027 - optional override
        """Keep what solving needs besides the saved state (the data, for matrix-free)."""

    def _load(self, state: dict[str, Tensor]) -> None:  # noqa: B027 - optional override
        """Restore from `state()` (fitted tensors are moved to the model's device)."""

    def _lambda_state(self) -> dict[str, Tensor]:
        return {
            f"damping/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.lambdas.items()
        }

    def _load_lambdas(self, state: dict[str, Tensor]) -> None:
        self.lambdas = {
            k.split("/", 1)[1]: float(v) for k, v in state.items() if k.startswith("damping/")
        }


REGISTRY: dict[str, type[Curvature]] = {}


def register(cls: type[Curvature]) -> type[Curvature]:
    REGISTRY[cls.name] = cls
    return cls


def make_curvature(
    curvature: str | Curvature,
    damping: Damping = None,
    damping_factor: float | None = None,
    **options: Any,
) -> Curvature:
    """A strategy by name (with its options) or an instance as is."""
    if isinstance(curvature, Curvature):
        if options or damping is not None or damping_factor is not None:
            raise ValueError(
                "pass damping and options to the curvature object itself, not next to it"
            )
        return curvature
    if curvature not in REGISTRY:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of {sorted(REGISTRY)}")
    if damping_factor is not None:
        options = {**options, "damping_factor": damping_factor}
    try:
        return REGISTRY[curvature](damping=damping, **options)
    except TypeError as err:
        raise TypeError(f"bad options for curvature {curvature!r}: {err}") from None
