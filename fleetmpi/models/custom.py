"""A user's own model (``model: {kind: custom, class: "module:Class"}``): import, check, wrap.

The class is imported by ``resolve`` with the section's ``path`` (the spec file's folder
by default) appended to ``sys.path``, so ``PYTHONPATH`` and installed packages win over
a same-named file there. The driver resolves it before a job dir is made and every rank
resolves it again, so the module must be importable on every node. ``build`` calls it as
``Class(d=D, l2=L2, **options)``, plus ``classes=K`` for a multiclass task, checks what
``n_params``, ``init`` and ``weight_mask`` give, and wraps the instance in
``CustomModel``, whose ``meta()`` records the class path, options, folder and the
module's source hash so that ``fleetmpi predict`` can rebuild it from model.h5.
Every problem is a ``BadInput`` (exit 2) naming ``model.class`` and what would be valid.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetmpi.errors import BadInput
from fleetmpi.models.base import Model
from fleetmpi.spec import ModelSpec, module_source_sha256

TASK_NAMES = ("regression", "binary", "multiclass")


@dataclass(frozen=True)
class Resolved:
    """An imported custom class and the SHA-256 of its module's source file."""

    cls: type[Model]
    task: str
    source_sha256: str


_resolved: dict[tuple[str, str | None], Resolved] = {}


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()}".replace("\n", " ")[:300]


def resolve(spec: ModelSpec) -> Resolved:
    """Import and check ``spec.class_path`` once per process; BadInput naming what is missing."""
    if spec.class_path is None:
        raise ValueError(f"resolve() needs kind custom with a class, got kind {spec.kind!r}")
    key = (spec.class_path, spec.path)
    if key not in _resolved:
        _resolved[key] = _resolve(spec.class_path, spec.path)
    return _resolved[key]


def _resolve(class_path: str, folder: str | None) -> Resolved:
    where = f"model.class {class_path!r}"
    searched = f"searched {folder} (the spec's folder or model.path), PYTHONPATH and installed packages"
    if folder and folder not in sys.path:
        sys.path.append(folder)
    mod_name, _, attr = class_path.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise BadInput(f"{where}: module {mod_name!r} is not importable ({_one_line(e)}); {searched}") from None
        raise BadInput(f"{where}: importing {mod_name!r} failed ({_one_line(e)}); install what it needs") from None
    except Exception as e:   # the user's module may raise anything while it loads
        raise BadInput(f"{where}: importing {mod_name!r} failed ({_one_line(e)})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(n for n, v in vars(module).items()
                           if inspect.isclass(v) and issubclass(v, Model) and v is not Model)
            hint = f"Model subclasses there: {', '.join(found)}" if found else "it defines no Model subclass"
            raise BadInput(f"{where}: module {mod_name!r} has no attribute {attr!r}; {hint}")
        obj = getattr(obj, part)
    if not inspect.isclass(obj) or not issubclass(obj, Model):
        raise BadInput(f"{where}: {obj!r} is not a subclass of fleetmpi.models.base.Model; "
                       "write class MyModel(Model) with n_params, init, loss_grad_sum, predict, weight_mask")
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if missing:
        raise BadInput(f"{where}: class {obj.__name__} does not implement {', '.join(missing)} "
                       "(the Model contract: n_params, init, loss_grad_sum, predict, weight_mask)")
    task = getattr(obj, "task", None)
    if task not in TASK_NAMES:
        raise BadInput(f"{where}: class attribute task is {task!r}; expected one of {' | '.join(TASK_NAMES)}")
    digest = module_source_sha256(class_path, folder)
    if not digest:
        raise BadInput(f"{where}: cannot read the source of module {mod_name!r}; a custom model must be a .py file "
                       "(its hash goes into the model hash)")
    return Resolved(obj, task, digest)


def build(spec: ModelSpec, d: int, classes: int | None) -> CustomModel:
    """Return the wrapped custom model on ``d`` features; BadInput if the class breaks the contract."""
    r = resolve(spec)
    where = f"model.class {spec.class_path!r}"
    kwargs: dict[str, Any] = {"d": d, "l2": spec.l2, **spec.kwargs}
    if r.task == "multiclass":
        k = spec.classes or classes
        if k is None:
            raise BadInput(f"{where}: a multiclass model needs the number of classes (model.classes or the data's labels)")
        kwargs["classes"] = k
    elif spec.classes is not None:
        raise BadInput(f"model.classes: class {r.cls.__name__} has task {r.task!r}, which takes no classes")
    try:
        inner = r.cls(**kwargs)
    except Exception as e:   # a wrong option name reads as TypeError; the user's code may raise anything
        raise BadInput(f"{where}: {r.cls.__name__}({', '.join(f'{k}=...' for k in kwargs)}) failed ({_one_line(e)}); "
                       "extra keys under model: are its keyword arguments") from None
    return CustomModel(spec, inner, r, d, kwargs.get("classes"))


def _check_vector(where: str, what: str, v: Any, n: int) -> np.ndarray:
    a = np.asarray(v) if v is not None else None
    if a is None or a.shape != (n,) or not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
        got = f"shape {a.shape}, dtype {a.dtype}" if a is not None else "None"
        raise BadInput(f"{where}: {what} must return finite float64 of shape ({n},) (n_params), got {got}")
    return a.astype(np.float64, copy=False)


class CustomModel(Model):
    """A user's Model instance behind the framework's kind, task and meta."""

    kind = "custom"

    def __init__(self, spec: ModelSpec, inner: Model, resolved: Resolved, d: int, classes: int | None) -> None:
        super().__init__(spec.l2)
        self.inner, self.spec, self.d, self.k = inner, spec, d, classes
        self.task = resolved.task
        self.source_sha256 = resolved.source_sha256
        where = f"model.class {spec.class_path!r}"
        n = inner.n_params
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise BadInput(f"{where}: n_params must be an int >= 1, got {n!r}")
        self._n = int(n)
        self._mask = _check_vector(where, "weight_mask()", inner.weight_mask(), self._n)
        probe = inner.init(np.random.default_rng(0), spec.init_scale)
        _check_vector(where, "init(rng, scale)", probe, self._n)

    @property
    def n_params(self) -> int:
        return self._n

    def init(self, rng: np.random.Generator, scale: float) -> np.ndarray:
        return np.array(self.inner.init(rng, scale), dtype=np.float64)

    def loss_grad_sum(self, X: np.ndarray, y: np.ndarray, params: np.ndarray, g_out: np.ndarray) -> float:
        return float(self.inner.loss_grad_sum(X, y, params, g_out))

    @property
    def has_row_factors(self) -> bool:
        """Return whether the class overrides row_factors (``sync: exact`` needs it)."""
        return type(self.inner).row_factors is not Model.row_factors

    def no_row_factors(self) -> str:
        """Return the one-line error for ``sync: exact`` with a class that has no row_factors."""
        return (f"model.class {self.spec.class_path!r}: sync kind exact needs per-row factors, and "
                f"{type(self.inner).__name__} has no row_factors method; add one or use sync: {{kind: dense}}")

    def row_factors(self, X: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        if not self.has_row_factors:
            raise BadInput(self.no_row_factors())
        loss, factors = self.inner.row_factors(X, y, params)
        return float(loss), factors

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        return self.inner.predict(X, params)

    def weight_mask(self) -> np.ndarray:
        return self._mask.copy()

    def meta(self) -> dict[str, Any]:
        return {"kind": "custom", "class": self.spec.class_path, "path": self.spec.path,
                "options": self.spec.kwargs, "l2": self.l2, "d": self.d, "classes": self.k, "task": self.task,
                "init_scale": self.spec.init_scale, "source_sha256": self.source_sha256}
