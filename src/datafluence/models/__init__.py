"""Reference models and the cached training that produces them."""

from datafluence.models.cnn import SmallCNN
from datafluence.models.mlp import MLP
from datafluence.models.training import TrainRecipe, evaluate_accuracy, train_classifier

__all__ = ["MLP", "SmallCNN", "TrainRecipe", "evaluate_accuracy", "train_classifier"]
