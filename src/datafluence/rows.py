"""Which rows of a set of examples a computation covers: one reading of `rows` for every method.

Methods and ground truths that work on a subset of the training rows (PBRF, leave-one-out)
all accept the same forms, so the same `rows=` means the same examples everywhere.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from datafluence.tasks import Examples

Rows = Iterable[int | str] | slice | np.ndarray | torch.Tensor | None

__all__ = ["Rows", "resolve_rows"]


def resolve_rows(rows: Rows, examples: Examples, *, role: str = "training") -> list[int]:
    """Positions into `examples` of the rows asked for, in the order given.

    `rows` may be None (every row, in order); a slice (of positions, as `range(n)[rows]`);
    a sequence, range or 1-D array/tensor of positions (ints, 0 <= i < n) and/or ids
    (strings), mixed freely; or a 1-D boolean array/tensor of length n (a mask). The result
    must be non-empty and name each row once. Errors name the offending row; `role` names
    the set in them ("training" → "no training example with id 'x'").
    """
    n = len(examples)
    if rows is None:
        return list(range(n))
    if isinstance(rows, slice):
        out = list(range(n)[rows])
        if not out:
            raise ValueError(
                f"rows {rows} is empty: it selects none of the {n} {role} rows; give at least "
                "one (or None for all)"
            )
        return out
    items = _items(rows, n, role)
    if not items:
        raise ValueError(f"rows is empty; give at least one {role} row (or None for all)")
    lookup = {name: k for k, name in enumerate(examples.ids)}
    out = [_position(item, lookup, n, role) for item in items]
    if len(set(out)) != len(out):
        seen: dict[int, Any] = {}
        repeated = []
        for item, k in zip(items, out, strict=True):
            if k in seen:
                repeated.append(f"{seen[k]!r} and {item!r}" if seen[k] != item else repr(item))
            seen.setdefault(k, item)
        shown = "; ".join(repeated[:5]) + ("; ..." if len(repeated) > 5 else "")
        raise ValueError(f"rows contain duplicates ({shown}); give each {role} row once")
    return out


def _items(rows: Any, n: int, role: str) -> list[Any]:
    """The entries of `rows` as Python objects (a boolean mask becomes its positions)."""
    if isinstance(rows, str | bytes | int | np.integer):
        raise TypeError(
            f"rows must be a collection of positions or ids (or a slice, or None), got the "
            f"single value {rows!r}; wrap one row in a list: rows=[{rows!r}]"
        )
    if isinstance(rows, set | frozenset | Mapping):
        raise TypeError(
            f"rows must be ordered (a list, array, range or slice), got a {type(rows).__name__}; "
            "the result's rows follow the order given"
        )
    if isinstance(rows, np.ndarray | torch.Tensor):
        array = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else rows
        if array.ndim != 1:
            raise ValueError(f"rows must be 1-D, got an array of shape {tuple(array.shape)}")
        if array.dtype == bool:
            if array.shape[0] != n:
                raise ValueError(
                    f"a boolean rows mask needs one flag per {role} row ({n}), got {array.shape[0]}"
                )
            return np.flatnonzero(array).tolist()
        return array.tolist()
    return list(rows)


def _position(item: Any, lookup: Mapping[str, int], n: int, role: str) -> int:
    if isinstance(item, str):
        if item not in lookup:
            raise ValueError(f"no {role} example with id {item!r}")
        return lookup[item]
    if isinstance(item, bool | np.bool_):
        raise TypeError(f"rows must be positions or ids, got {item!r} (for a mask pass an array)")
    try:
        k = operator.index(item)
    except TypeError:
        raise TypeError(f"rows must be positions or ids, got {item!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"row {k} is outside the {role} set (positions 0..{n - 1})")
    return k
