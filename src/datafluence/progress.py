"""Progress bars with one policy for every long loop.

`progress=True` (every method's default) shows a bar only where someone can see it: on a
terminal, on the main rank under torchrun. `progress=False` shows nothing anywhere. Bars
go to stderr and vanish when done (`leave=False`), so results printed on stdout stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

from datafluence import distributed

T = TypeVar("T")


def is_tty() -> bool:
    """Whether stderr (where bars go) is a terminal; a function so tests can pretend."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def shown(progress: bool) -> bool:
    """Whether a bar asked for with `progress` is drawn here."""
    return bool(progress) and is_tty() and distributed.is_main()


def bar(
    iterable: Iterable[T] | None = None,
    *,
    progress: bool,
    desc: str,
    total: int | None = None,
    initial: int = 0,
    unit: str = "chunk",
) -> Any:
    """A tqdm bar under the policy above (a disabled bar is still iterable and updatable)."""
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not shown(progress),
        leave=False,
        file=sys.stderr,
    )


def check_progress(progress: Any) -> bool:
    """`progress` must be a bool (a common slip is passing a number or a string)."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    return progress
