"""Shared fixtures: tiny models built in code and random examples (built by helpers.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import TinyConvNet, random_examples, tiny_model

from datafluence.tasks import ClassificationTask, Examples


@pytest.fixture
def make_model() -> Callable[..., TinyConvNet]:
    """Factory: make_model(seed=0, dropout=0.3, train_mode=False) -> TinyConvNet."""
    return tiny_model


@pytest.fixture
def make_examples() -> Callable[..., Examples]:
    """Factory: make_examples(n, seed=0, prefix="t", side=8) -> Examples with labels 0..4."""
    return random_examples


@pytest.fixture
def task() -> ClassificationTask:
    return ClassificationTask()
