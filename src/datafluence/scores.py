"""Scores: the one container every method returns.

Rows are training examples, columns are queries; a positive value means that learning the
training example makes the query more likely (raises its measurement / lowers its loss).
One container and one storage format, so any estimate can be held against any ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datafluence import store


def as_array(values: Scores | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The float64 matrix behind a Scores object or array-like (metrics work in float64)."""
    if isinstance(values, Scores):
        return np.asarray(values.values, dtype=np.float64)
    return np.asarray(values, dtype=np.float64)


@dataclass
class Scores:
    """An influence matrix with the ids of both sides and how it was made.

    `parts` holds optional decompositions whose last two axes are [n_train, n_query]
    (for example per-layer scores [n_layers, n_train, n_query]). `settings` say what
    changes the numbers; `timings` (seconds) say what a run cost and never key a result.
    """

    values: np.ndarray
    train_ids: tuple[str, ...]
    query_ids: tuple[str, ...]
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.train_ids = tuple(str(i) for i in self.train_ids)
        self.query_ids = tuple(str(i) for i in self.query_ids)
        if self.values.ndim != 2:
            raise ValueError(
                f"Scores.values must be 2-D [n_train, n_query], got shape {self.values.shape}"
            )
        expected = (len(self.train_ids), len(self.query_ids))
        if self.values.shape != expected:
            raise ValueError(
                f"Scores.values has shape {self.values.shape} but there are {expected[0]} "
                f"train ids and {expected[1]} query ids; pass one id per row and per column"
            )
        for name, part in self.parts.items():
            if tuple(np.shape(part)[-2:]) != expected:
                raise ValueError(
                    f"Scores part {name!r} has shape {np.shape(part)}; its last two axes must be "
                    f"{expected} like the values"
                )

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def column(self, query: str | int) -> np.ndarray:
        """One query's scores over all training examples, by id or position."""
        return self.values[:, self._query_index(query)]

    def top(
        self, k: int = 10, query: str | int | None = None, ascending: bool = False
    ) -> pd.DataFrame:
        """The k most supportive training examples per query (or for one query), best first;
        `ascending=True` gives the strongest opponents instead (`bottom`). Ties keep row
        order; NaN ("not computed", e.g. outside a pre-filter) always ranks last."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        columns = range(len(self.query_ids)) if query is None else [self._query_index(query)]
        k = min(k, len(self.train_ids))
        rows = []
        for j in columns:
            col = self.values[:, j]
            order = np.argsort(col if ascending else -col, kind="stable")[:k]
            for rank, i in enumerate(order, start=1):
                rows.append(
                    {
                        "query": self.query_ids[j],
                        "rank": rank,
                        "train": self.train_ids[i],
                        "score": float(col[i]),
                    }
                )
        return pd.DataFrame(rows, columns=["query", "rank", "train", "score"])

    def bottom(self, k: int = 10, query: str | int | None = None) -> pd.DataFrame:
        """The k strongest opponents per query (most negative first): the training examples
        whose learning makes the query least likely."""
        return self.top(k, query, ascending=True)

    def to_pandas(self) -> pd.DataFrame:
        """The matrix as a DataFrame: index = training ids, columns = query ids."""
        return pd.DataFrame(self.values, index=list(self.train_ids), columns=list(self.query_ids))

    def save(self, directory: str | Path) -> Path:
        """Write scores.npy (+ parts) and, under meta.json's "scores" key, the method,
        settings and ids; every file atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        store.atomic_save_npy(directory / "scores.npy", self.values)
        for name, part in self.parts.items():
            store.atomic_save_npy(directory / f"parts.{name}.npy", np.asarray(part))
        # Under its own key: a run directory's top-level "settings" belong to the run.
        store.RunDir(directory).update_meta(
            scores={
                "method": self.method,
                "settings": _jsonable(self.settings),
                "timings": _jsonable(self.timings),
                "shape": list(self.values.shape),
                "parts": sorted(self.parts),
                "train_ids": list(self.train_ids),
                "query_ids": list(self.query_ids),
            }
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False) -> Scores:
        """Read what `save` wrote; `mmap=True` leaves the matrix on disk."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not (directory / "scores.npy").exists() or not meta_path.exists():
            raise FileNotFoundError(
                f"{directory} holds no scores (scores.npy and meta.json are needed); "
                "is it a finished run directory?"
            )
        meta = store.read_json(meta_path).get("scores")
        if meta is None:
            raise FileNotFoundError(f"{meta_path} describes no scores; was the run finished?")
        values = np.load(directory / "scores.npy", mmap_mode="r" if mmap else None)
        parts = {
            name: np.load(directory / f"parts.{name}.npy", mmap_mode="r" if mmap else None)
            for name in meta.get("parts", [])
        }
        return cls(
            values=values,
            train_ids=tuple(meta["train_ids"]),
            query_ids=tuple(meta["query_ids"]),
            method=meta["method"],
            settings=meta.get("settings", {}),
            parts=parts,
            timings=meta.get("timings", {}),
        )

    def _query_index(self, query: str | int) -> int:
        if isinstance(query, int | np.integer):
            if not -len(self.query_ids) <= int(query) < len(self.query_ids):
                raise IndexError(f"query position {query} out of range 0..{len(self.query_ids)}")
            return int(query)
        try:
            return self.query_ids.index(str(query))
        except ValueError:
            shown = ", ".join(self.query_ids[:5])
            raise KeyError(
                f"no query with id {query!r}; ids look like: {shown}{', ...' if len(self.query_ids) > 5 else ''}"
            ) from None


def _jsonable(value: Any) -> Any:
    """Settings become JSON: tuples to lists, numpy scalars to Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
