"""The paper reproductions and CLI commands end to end: heavier than the unit tests (real data,
trained reference models), so every test here is marked slow; CI still runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
