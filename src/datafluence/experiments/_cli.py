"""Small helpers shared by the experiments' click commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click


def comma_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@contextmanager
def cli_errors() -> Iterator[None]:
    """Bad input and failed runs become one clear line instead of a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError, ImportError) as err:
        raise click.ClickException(str(err)) from err
