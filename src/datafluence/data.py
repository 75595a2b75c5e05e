"""Data in the shapes people hold it, as `Examples`: the one conversion every method runs.

Accepted, besides `Examples` (returned as is):

- a map-style `torch.utils.data.Dataset` (anything with `__len__` and `__getitem__`), whose
  items are `(x, y)` tuples (named "x" and "y", as ClassificationTask and RegressionTask read
  them) or dicts of tensors / numbers / arrays;
- a `torch.utils.data.DataLoader` over such a dataset (its dataset is read item by item, so
  shuffling, sampling and batching do not reorder or drop examples);
- a Hugging Face `datasets.Dataset` (plain lists, or after `set_format("torch")`);
- a list of dicts or of `(x, y)` tuples;
- for a `CausalLMTask`: texts, `(prompt, completion)` pairs, or dicts with a "text" field or
  "prompt" and "completion" fields, tokenized by the task.

Ids come from an "id" field where the items have one (it is not a tensor of the examples),
else from positions ("0", "1", ...). Items must agree: the same fields, each field of one
shape for every item; anything else is refused naming the item index and the field. The
converted tensors sit in memory together (n items x the item size); the reading itself
holds one item at a time besides them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datafluence.tasks import CausalLMTask, Examples, Task

ID_FIELD = "id"
TEXT_FIELDS = ("text", "prompt", "completion")


def examples(data: Any, task: Task | None = None, role: str = "examples") -> Examples:
    """`data` (any form above) as checked-shape `Examples`; `role` names the side in errors."""
    if isinstance(data, Examples):
        return data
    if isinstance(data, str | bytes) or data is None:
        raise TypeError(
            f"the {role} must be a collection of examples (a Dataset, DataLoader, list of "
            f"dicts or (x, y) tuples, or Examples), got {type(data).__name__}"
        )
    source = _source(data)
    n = len(source)
    if n == 0:
        raise ValueError(f"the {role} set is empty; give at least one example")
    first = source[0]
    if isinstance(task, CausalLMTask) and _is_text(first):
        return _texts(source, task, role)
    fields = _fields(first, 0, role)
    columns: dict[str, list[Any]] = {f: [] for f in fields if f != ID_FIELD}
    ids: list[str] = []
    for i in range(n):
        item = _fields(source[i], i, role) if i else fields
        if set(item) != set(fields):
            raise ValueError(
                f"{role} item {i} has fields {sorted(item)} but item 0 has {sorted(fields)}; "
                "every item needs the same fields"
            )
        ids.append(str(item[ID_FIELD]) if ID_FIELD in item else str(i))
        for name in columns:
            columns[name].append(_tensor(item[name], i, name, role))
    tensors = {name: _stack(values, name, role) for name, values in columns.items()}
    if not tensors:
        raise ValueError(f"the {role} items hold no field besides {ID_FIELD!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"the {role} items' {ID_FIELD!r} values are not unique")
    return Examples(tensors, tuple(ids))


def _source(data: Any) -> Any:
    """The indexable collection behind `data` (a DataLoader's dataset, an HF dataset's rows)."""
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(data, "batch_size") and hasattr(data, "sampler"):
        data = dataset  # a DataLoader: read its dataset in order, one item at a time
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(
            f"cannot read examples from a {type(data).__name__}: give a map-style Dataset "
            "(with __len__ and __getitem__), a DataLoader over one, a Hugging Face Dataset "
            "or a list"
        )
    return data


def _fields(item: Any, i: int, role: str) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return {str(k): v for k, v in item.items()}
    if isinstance(item, tuple | list) and len(item) == 2:
        return {"x": item[0], "y": item[1]}
    raise TypeError(
        f"{role} item {i} is a {type(item).__name__}; items must be dicts of tensors or "
        "(x, y) pairs"
    )


def _tensor(value: Any, i: int, name: str, role: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, str | bytes):
        raise TypeError(
            f"{role} item {i} field {name!r} is a string ({str(value)[:40]!r}); tensors are "
            "needed: tokenize it first, or use a CausalLMTask with 'text' / 'prompt' + "
            "'completion' fields"
        )
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{role} item {i} field {name!r} ({type(value).__name__}) is not a tensor, a number "
            f"or an array: {err}"
        ) from None


def _stack(values: list[Tensor], name: str, role: str) -> Tensor:
    shape = values[0].shape
    for i, v in enumerate(values):
        if v.shape != shape:
            raise ValueError(
                f"{role} item {i} field {name!r} has shape {tuple(v.shape)} but item 0 has "
                f"{tuple(shape)}; pad or resize the items to one shape"
            )
    return torch.stack(values)


def _is_text(item: Any) -> bool:
    if isinstance(item, str):
        return True
    if isinstance(item, tuple | list) and len(item) == 2:
        return all(isinstance(p, str) for p in item)
    return isinstance(item, Mapping) and any(isinstance(item.get(f), str) for f in TEXT_FIELDS)


def _texts(source: Sequence[Any], task: CausalLMTask, role: str) -> Examples:
    """Texts, pairs or text dicts, tokenized by the task (ids from an "id" field)."""
    items: list[Any] = []
    ids: list[str] = []
    for i in range(len(source)):
        item = source[i]
        if isinstance(item, Mapping):
            if isinstance(item.get("text"), str):
                items.append(item["text"])
            elif isinstance(item.get("prompt"), str) and isinstance(item.get("completion"), str):
                items.append((item["prompt"], item["completion"]))
            else:
                raise ValueError(
                    f"{role} item {i} needs a 'text' field or 'prompt' and 'completion' "
                    f"fields (strings); it has {sorted(item)}"
                )
            ids.append(str(item[ID_FIELD]) if ID_FIELD in item else str(i))
        elif _is_text(item):
            items.append(tuple(item) if isinstance(item, list) else item)
            ids.append(str(i))
        else:
            raise TypeError(
                f"{role} item {i} is a {type(item).__name__}, not a text, a (prompt, "
                "completion) pair or a dict with text fields"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"the {role} items' {ID_FIELD!r} values are not unique")
    return task.examples(items, ids)
