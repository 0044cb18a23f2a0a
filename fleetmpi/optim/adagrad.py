"""AdaGrad: a per-coordinate step lr / (sqrt(sum of squared gradients) + eps).

The default of online learners on hashed text (Vowpal Wabbit's adaptive updates): a
rare n-gram keeps a large step while a frequent one slows down. On CSR batches without
L2 the update touches only the batch's features (``kernels.update.adagrad_rows``), with
the dense update's result bit for bit.
"""

from __future__ import annotations

import numpy as np

from fleetmpi.optim.sgd import learning_rate
from fleetmpi.spec import OptimizerSpec
from kernels import lazy_function

# kernels.update's (numba), imported at the first step: the CLI imports this module.
_adagrad_dense = lazy_function("kernels.update", "adagrad_dense")
_adagrad_rows = lazy_function("kernels.update", "adagrad_rows")

# Keeps the first step of a coordinate finite (its accumulator starts at 0); as PyTorch's default.
EPS = 1e-10


class Adagrad:
    """acc <- acc + grad^2,  params <- params - lr * grad / (sqrt(acc) + EPS)."""

    name = "adagrad"

    def __init__(self, spec: OptimizerSpec, n_params: int) -> None:
        self.spec = spec
        self.acc = np.zeros(n_params)

    def lr(self, step: int) -> float:
        """Return the learning rate at global step ``step`` (0-based)."""
        return learning_rate(self.spec.lr, self.spec.schedule, step)

    def apply_sum(self, params: np.ndarray, g: np.ndarray, batch: int, l2: float, mask: np.ndarray, lr: float,
                  rows: np.ndarray | None = None, k: int = 0) -> None:
        """Update ``params`` from gradient sum ``g`` over ``batch`` rows plus ``l2 * mask * params``; one pass.

        ``rows`` as in ``SGD.apply_sum``: without L2 only they and the bias row are updated.
        """
        if rows is not None and not l2:
            _adagrad_rows(params, g, rows, k, batch, self.acc, lr, EPS)
        else:
            _adagrad_dense(params, g, batch, l2, mask, self.acc, lr, EPS)

    def state(self) -> dict[str, np.ndarray]:
        """Return the accumulator under its checkpoint name."""
        return {"adagrad_acc": self.acc}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the accumulator from a checkpoint's arrays where it fits the model (every rank)."""
        a = arrays.get("adagrad_acc")
        if a is not None and a.shape == self.acc.shape:
            self.acc[...] = a
