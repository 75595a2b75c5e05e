"""Per-example gradients from module hooks, their matrix form, and random projection."""

from datafluence.gradients.capture import (
    Capture,
    gradient_factors,
    per_example_gradients,
)
from datafluence.gradients.layers import SUPPORTED, Layer, layer_kind, resolve_layers
from datafluence.gradients.projection import RandomProjection
from datafluence.gradients.space import ParamSpace

__all__ = [
    "SUPPORTED",
    "Capture",
    "Layer",
    "ParamSpace",
    "RandomProjection",
    "gradient_factors",
    "layer_kind",
    "per_example_gradients",
    "resolve_layers",
]
