"""Optimizers. Each keeps its state in named float64 arrays so checkpoints can hold it."""

from fleetmpi.optim.lbfgs import LBFGS
from fleetmpi.optim.sgd import SGD, learning_rate

__all__ = ["LBFGS", "SGD", "learning_rate"]
