"""SGD with heavy-ball momentum and a learning-rate schedule indexed by the global step."""

from __future__ import annotations

import math

import numpy as np

from fleetmpi.spec import OptimizerSpec, ScheduleSpec
from kernels import lazy_function

# kernels.update's (numba), imported at the first step: the CLI imports this module.
_sgd_dense = lazy_function("kernels.update", "sgd_dense")
_sgd_rows = lazy_function("kernels.update", "sgd_rows")


def learning_rate(base: float, sched: ScheduleSpec, step: int) -> float:
    """Return the learning rate at global step ``step`` (0-based); independent of rank count."""
    if sched.warmup_steps and step < sched.warmup_steps:
        return base * (step + 1) / sched.warmup_steps
    s = step - sched.warmup_steps
    if sched.kind == "constant":
        return base
    if sched.kind == "step":
        return base * sched.gamma ** (s // sched.every_steps)
    if sched.kind == "exp":
        return base * sched.gamma ** (s / sched.every_steps)
    frac = min(s / sched.total_steps, 1.0)  # cosine
    return sched.min_lr + 0.5 * (base - sched.min_lr) * (1.0 + math.cos(math.pi * frac))


class SGD:
    """params <- params - lr * v,  v <- momentum * v + grad."""

    name = "sgd"

    def __init__(self, spec: OptimizerSpec, n_params: int) -> None:
        self.spec = spec
        self.velocity = np.zeros(n_params)

    def lr(self, step: int) -> float:
        """Return the learning rate at global step ``step`` (0-based)."""
        return learning_rate(self.spec.lr, self.spec.schedule, step)

    def step(self, params: np.ndarray, grad: np.ndarray, step: int) -> float:
        """Update ``params`` in place from the mean gradient; return the learning rate used."""
        lr = self.lr(step)
        self.apply(params, grad, lr)
        return lr

    def apply(self, params: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """Update ``params`` in place from the mean gradient at learning rate ``lr``."""
        if self.spec.momentum:
            self.velocity *= self.spec.momentum
            self.velocity += grad
            params -= lr * self.velocity
        else:
            params -= lr * grad

    def apply_sum(self, params: np.ndarray, g: np.ndarray, batch: int, l2: float, mask: np.ndarray, lr: float,
                  rows: np.ndarray | None = None, k: int = 0) -> None:
        """Update ``params`` from gradient sum ``g`` over ``batch`` rows plus ``l2 * mask * params``; one pass.

        Bitwise what ``apply(params, g / batch + l2 * mask * params, lr)`` gives. ``rows``: the
        rows of a (d + 1, k) table outside which ``g`` is +0.0 (a CSR batch's touched
        features, ``Sync.touched``); where the update is exactly sparse (no momentum, no L2)
        only they and the bias row are updated, with the same result.
        """
        if rows is not None and not self.spec.momentum and not l2:
            _sgd_rows(params, g, rows, k, batch, lr)
        else:
            _sgd_dense(params, g, batch, l2, mask, self.velocity, self.spec.momentum, lr)

    def state(self) -> dict[str, np.ndarray]:
        """Return the velocity under its checkpoint name; {} while it is all zero (never stepped with momentum).

        A zero velocity is what ``load_state`` keeps where a checkpoint has none, so leaving it
        out changes no resume and spares writing and hashing 8 bytes per parameter.
        """
        return {"sgd_velocity": self.velocity} if self.velocity.any() else {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the velocity from a checkpoint's arrays where it fits the model (every rank)."""
        v = arrays.get("sgd_velocity")
        if v is not None and v.shape == self.velocity.shape:
            self.velocity[...] = v
