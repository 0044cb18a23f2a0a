"""Model families: each maps a flat float64 parameter vector to loss, gradient and predictions."""

from __future__ import annotations

from typing import Any

from fleetmpi.errors import BadInput
from fleetmpi.models.base import Model
from fleetmpi.spec import ModelSpec

# The model classes load their kernels (numba, 0.15-0.2 s): they are imported where a model
# is built, so the CLI's checks (task_of, preflight) run before mpiexec starts without them.
_CLASSES = {"LinearRegression": "linear", "LogisticRegression": "linear", "MLP": "mlp",
            "SoftmaxRegression": "softmax"}


def __getattr__(name: str) -> Any:
    """Return a model class named from this package (``from fleetmpi.models import MLP``), imported now."""
    if name in _CLASSES:
        import importlib
        return getattr(importlib.import_module(f"fleetmpi.models.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# The built-in kinds' tasks; ``task_of`` answers for a custom class and the tree kinds too.
TASKS = {"linear": "regression", "logistic": "binary", "softmax": "multiclass", "mlp": "multiclass",
         "ar": "regression"}
# Tree ensembles take their task from the spec (model.task; default binary, multiclass with classes > 2).
TREE_KINDS = ("gbdt", "forest", "tree")


def task_of(spec: ModelSpec) -> str:
    """Return the task (regression | binary | multiclass) of ``spec``; imports a custom class (BadInput if it cannot)."""
    if spec.kind == "custom":
        from fleetmpi.models.custom import resolve
        return resolve(spec).task
    if spec.kind == "gp":
        return "regression"   # fitted by its own technique (fleetmpi.engine.gp), not a flat-parameter Model
    if spec.kind in TREE_KINDS:
        return spec.tree_task
    if spec.kind == "mlp" and spec.task is not None:
        return spec.task    # regression: one identity output (spec resolves it on data.windows)
    return TASKS[spec.kind]


def preflight(spec: ModelSpec, sync_kind: str, d: int, classes: int | None) -> None:
    """Build a custom model once on the driver, so a class that breaks the contract exits 2 before a job dir exists."""
    if spec.kind != "custom":
        return      # built-in kinds fulfil the contract and have per-row factors
    from fleetmpi.models.custom import build
    model = build(spec, d, classes)
    if sync_kind == "exact" and not model.has_row_factors:
        raise BadInput(model.no_row_factors())


def build_model(spec: ModelSpec, d: int, classes: int | None) -> Model:
    """Return the model for ``spec`` on ``d`` features (and ``classes`` labels if classifying)."""
    if spec.kind == "custom":
        from fleetmpi.models.custom import build
        return build(spec, d, classes)
    from fleetmpi.models.linear import LinearRegression, LogisticRegression
    from fleetmpi.models.mlp import MLP
    from fleetmpi.models.softmax import SoftmaxRegression
    if spec.kind == "linear":
        return LinearRegression(d, spec.l2, spec.compute)
    if spec.kind == "ar":
        from fleetmpi.models.ar import AutoRegression
        return AutoRegression(int(spec.lags or d), spec.trend, spec.l2)
    if spec.kind == "logistic":
        return LogisticRegression(d, spec.l2, spec.compute)
    if spec.kind == "mlp" and spec.task == "regression":
        return MLP((d, *spec.hidden, 1), spec.l2, "regression", spec.compute)
    k = spec.classes or classes
    if k is None:
        raise ValueError("a multiclass model needs the number of classes")
    if spec.kind == "softmax":
        return SoftmaxRegression(d, k, spec.l2)
    return MLP((d, *spec.hidden, k), spec.l2, dtype=spec.compute)


__all__ = ["TASKS", "TREE_KINDS", "Model", "build_model", "preflight", "task_of"]
