"""Optimizers. Each keeps its state in named float64 arrays so checkpoints can hold it."""

from .lbfgs import LBFGS
from .sgd import SGD, learning_rate

__all__ = ["LBFGS", "SGD", "learning_rate"]
