"""Checkpoints as state dicts or files, swapped into a model and restored afterwards.

Shared by the methods that read several checkpoints of one training run (TracIn-CP, TRAK).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

Checkpoint = Mapping[str, Tensor] | str | Path


def read_checkpoint(checkpoint: Checkpoint) -> Mapping[str, Tensor]:
    """A state dict from a mapping or a file."""
    if isinstance(checkpoint, Mapping):
        state: Any = checkpoint
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {checkpoint if not isinstance(checkpoint, Mapping) else '(mapping)'} "
            "is not a state dict of tensors"
        )
    return state


def describe_checkpoint(checkpoint: Checkpoint | None) -> str:
    """How a checkpoint is named in settings: its path, or 'state dict' / 'model weights'."""
    if checkpoint is None:
        return "model weights"
    return str(checkpoint) if isinstance(checkpoint, str | Path) else "state dict"


@contextmanager
def using_checkpoint(model: nn.Module, checkpoint: Checkpoint | None) -> Iterator[nn.Module]:
    """`model` with the checkpoint's weights loaded (strictly), its own restored after.

    None leaves the model as it is.
    """
    if checkpoint is None:
        yield model
        return
    state = read_checkpoint(checkpoint)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        model.load_state_dict(saved)
        raise ValueError(
            f"checkpoint {describe_checkpoint(checkpoint)} does not fit the model: {err}"
        ) from err
    try:
        yield model
    finally:
        model.load_state_dict(saved)


def check_checkpoints(
    checkpoints: Sequence[Checkpoint] | None,
) -> list[Checkpoint | None]:
    if checkpoints is None:
        return [None]
    if isinstance(checkpoints, Mapping | str | Path):
        raise TypeError("give checkpoints as a list (of state dicts or paths)")
    out: list[Checkpoint | None] = list(checkpoints)
    if not out:
        raise ValueError("give at least one checkpoint (or None for the model's own weights)")
    return out
