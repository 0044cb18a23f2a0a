"""Optimizers. Each keeps its state in named float64 arrays so checkpoints can hold it."""

from fleetmpi.optim.adagrad import Adagrad
from fleetmpi.optim.bfgs import BFGS
from fleetmpi.optim.lbfgs import LBFGS
from fleetmpi.optim.sgd import SGD, learning_rate

__all__ = ["BFGS", "LBFGS", "SGD", "Adagrad", "learning_rate"]
