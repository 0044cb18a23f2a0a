"""Job spec: YAML -> validated, frozen dataclasses; every error names file, key path, valid values.

Precedence: ``--set key.path=value`` overrides > spec file > defaults in the dataclasses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml

from fleetmpi.errors import BadInput, one_line, quote
from fleetmpi.schema import (
    SchemaError,
    build,
    check,
    identifier,
    in_range,
    non_negative,
    positive,
    positive_at_most,
    to_plain,
)

# Limits on a spec as read (file or --set value), checked while the YAML is composed, so an
# alias bomb or a deep nesting is refused in milliseconds instead of hanging or recursing.
MAX_SPEC_BYTES = 1 << 20     # a real spec is a few KB; 1 MiB leaves room for long rule lists
MAX_SPEC_NODES = 10_000      # scalars + lists + mappings, every alias counted as what it expands to
MAX_SPEC_DEPTH = 32          # the schema nests 5 deep; 32 leaves room and stays far from Python's recursion limit

# Bounds on a phase, checked for every phase at load, not when the phase is reached.
MAX_NODES = 10_000           # the largest clusters have ~10k nodes; more is a typo
MAX_RANKS_PER_NODE = 1024    # the largest nodes have 192-384 cores (768 threads); more is a typo
MAX_RANKS = 1 << 20          # nodes x ranks_per_node: more ranks than any machine has run
MAX_GPUS_PER_NODE = 64       # nodes carry 4-16 GPUs
MAX_MEM_GB = 65536.0         # 64 TiB: the largest shared-memory nodes
MAX_TIME_MIN = 525_600       # one year; Slurm partitions allow days to weeks
MAX_STEPS = 10**12
MAX_EPOCHS = 1e6


@dataclass(frozen=True)
class WindowsSpec:
    """Train on lag windows of a series file: row t is [y_{t-1} .. y_{t-lags}], its target y_t."""

    lags: int = check(positive, 1)


def _tail(v: float | int | None) -> str | None:
    # A float is a fraction of every series, an int a count of points (0: no validation).
    if v is None:
        return None
    if isinstance(v, float):
        return None if 0.0 <= v < 1.0 else f"expected a fraction in [0, 1) or a count of points >= 0, got {v!r}"
    return None if v >= 0 else f"expected a count of points >= 0 or a fraction in [0, 1), got {v!r}"


@dataclass(frozen=True)
class DataSpec:
    train: str
    valid: str | None = None
    block_rows: int = check(positive, 32)
    # Series data (fleetmpi.engine.windows): the held-out end of every series, and the lag
    # windows a non-ar model trains on (kind ar takes its lags from model.lags). Before
    # ``check``, whose field name hides schema.check below it.
    valid_tail: int | float | None = check(_tail, None)
    windows: WindowsSpec | None = None
    # One pass over X and y of train and valid at start-up refuses NaN / inf; false skips it
    # for huge files already checked (a NaN then fails training instead).
    check: bool = True

    def validate(self) -> tuple[str, str] | None:
        if self.valid_tail is not None and self.valid:
            return "valid_tail", "series data hold out their tail for validation; give valid_tail or valid, not both"
        return None


# Keys a custom model's section keeps for itself; every other key is an option for its class.
# Class ids a classifier may have (labels 0..MAX_CLASSES-1): beyond it a stray label would
# size a model of terabytes; the data check refuses such labels too.
MAX_CLASSES = 100_000
CUSTOM_KEYS = ("kind", "class", "path", "l2", "classes", "init_scale", "options")
# Keyword arguments the framework passes a custom class itself (so no option may take them).
CUSTOM_RESERVED = ("d", "classes", "l2")
# Tree ensembles (fleetmpi.engine.trees): their keys, their defaults, and bounds.
TREE_KINDS = ("gbdt", "forest", "tree")
TREE_DEFAULTS: dict[str, Any] = {"trees": 100, "depth": 6, "learning_rate": 0.1, "bins": 255, "l2": 1.0,
                                 "min_child_weight": 1.0, "row_sample": 1.0, "col_sample": 1.0}
TREE_KEYS = ("task", *(k for k in TREE_DEFAULTS if k != "l2"))   # l2 is every kind's
MAX_TREES = 1_000_000         # a million rounds is far beyond any ensemble; more is a typo
MAX_TREE_DEPTH = 16           # 2^16 leaves per tree: node arrays stay small, codes stay int32


def _fraction(v: Any) -> str | None:
    return None if 0.0 < v <= 1.0 else f"expected a fraction in (0, 1], got {quote(v)}"


@dataclass(frozen=True)
class ModelSpec:
    """The model section: a built-in kind, or ``custom`` with ``class: "module:Class"``.

    A custom class is imported with ``path`` (default: the spec file's folder, made
    absolute at load) appended to ``sys.path`` on the driver and on every rank; other
    keys of a custom section are keyword arguments for the class (``options``).
    """

    _aliases: ClassVar[dict[str, str]] = {"class": "class_path"}
    kind: Literal["linear", "logistic", "softmax", "mlp", "ar", "gp", "custom", "gbdt", "forest", "tree"]
    l2: float = check(non_negative, 0.0)           # tree kinds: 1.0 unless given (tree_defaults)
    lags: int | None = check(lambda v: None if v >= 1 else f"expected lags >= 1 (points before each target), got {v}",
                             None)                # ar: the autoregression's order p
    trend: Literal["const", "none"] = "const"     # ar: an intercept, or none
    hidden: tuple[int, ...] = ()
    classes: int | None = check(lambda v: None if 2 <= v <= MAX_CLASSES else
                                f"expected 2..{MAX_CLASSES} classes, got {v}", None)
    init_scale: float = check(positive, 0.01)
    class_path: str | None = None                 # custom: "package.module:ClassName"
    path: str | None = None                       # custom: folder appended to sys.path to import it
    options: Mapping[str, Any] | None = None      # custom: keyword arguments for the class
    # gp (random Fourier features; fleetmpi.models.gp): None means the kind's default.
    features: int | None = None                   # D, the number of random features (default 1024)
    kernel: Literal["rbf", "matern32", "matern52"] | None = None   # default rbf
    lengthscale: float | Literal["auto"] | None = None   # auto (default): fitted by maximising the LML
    ard: bool | None = None                       # auto lengthscale: one per input column (default false: shared)
    signal: float | Literal["auto"] | None = None  # signal variance on standardised y; default auto
    noise: float | Literal["auto"] | None = None  # noise variance on standardised y; default auto

    # Tree kinds (gbdt | forest | tree) only; None means the TREE_DEFAULTS value.
    task: Literal["regression", "binary", "multiclass"] | None = None
    trees: int | None = check(lambda v: None if 1 <= v <= MAX_TREES else
                              f"expected 1..{MAX_TREES} trees (boosting rounds), got {v}", None)
    depth: int | None = check(lambda v: None if 1 <= v <= MAX_TREE_DEPTH else
                              f"expected a tree depth in 1..{MAX_TREE_DEPTH}, got {v}", None)
    learning_rate: float | None = check(positive_at_most(1.0), None)
    bins: int | None = check(lambda v: None if 2 <= v <= 256 else f"expected 2..256 bins per feature, got {v}", None)
    min_child_weight: float | None = check(non_negative, None)
    row_sample: float | None = check(_fraction, None)
    col_sample: float | None = check(_fraction, None)

    @property
    def is_tree(self) -> bool:
        """Return whether the kind is a tree ensemble (trained by boosting rounds, no optimizer)."""
        return self.kind in TREE_KINDS

    def tree_value(self, key: str) -> Any:
        """Return tree key ``key`` as given, or its TREE_DEFAULTS value."""
        v = getattr(self, key)
        if key == "trees" and self.kind == "tree":
            return 1
        return TREE_DEFAULTS[key] if v is None else v

    @property
    def tree_task(self) -> str:
        """Return a tree kind's task: ``task`` if given, else multiclass with classes > 2, else binary."""
        if self.task is not None:
            return self.task
        return "multiclass" if (self.classes or 2) > 2 else "binary"

    def validate(self) -> tuple[str, str] | None:
        gp = _check_gp(self)
        if gp is not None:
            return gp
        if self.is_tree:
            return _check_tree(self)
        for key in TREE_KEYS:
            if getattr(self, key) is not None:
                return key, f"only kinds {', '.join(TREE_KINDS)} take {key}; kind is {self.kind!r}"
        if self.kind == "gp":
            return None
        if self.kind == "custom":
            return _check_custom(self)
        for key, given in (("class", self.class_path), ("path", self.path), ("options", self.options)):
            if given is not None:
                return key, f"only kind custom takes {key}; kind is {self.kind!r}"
        if self.kind == "ar":
            if self.lags is None:
                return "lags", "kind ar needs lags: p >= 1, the points before each target it regresses on, e.g. lags: 3"
            if self.classes is not None:
                return "classes", "kind ar forecasts values and takes no classes"
        else:
            for key, bad in (("lags", self.lags is not None), ("trend", self.trend != "const")):
                if bad:
                    return key, f"only kind ar takes {key}; kind is {self.kind!r} (other kinds use data.windows.lags)"
        if self.kind == "mlp":
            if not 1 <= len(self.hidden) <= 2:
                return "hidden", f"mlp needs 1 or 2 hidden layer sizes, e.g. [64] or [128, 64]; got {list(self.hidden)}"
            if any(h < 1 for h in self.hidden):
                return "hidden", f"hidden layer sizes must be >= 1, got {list(self.hidden)}"
        elif self.hidden:
            return "hidden", f"only kind mlp takes hidden layers; kind is {self.kind!r}"
        if self.classes is not None and self.kind in ("linear", "logistic"):
            return "classes", f"kind {self.kind!r} takes no classes (logistic is binary: labels 0/1)"
        return None

    @property
    def kwargs(self) -> dict[str, Any]:
        """Return the custom class's options as keyword arguments (empty for built-in kinds)."""
        return dict(self.options or {})

    def plain(self) -> dict[str, Any]:
        """Return the section as the user writes it: custom options flattened, unused custom keys left out."""
        d = to_plain(self)
        cls = d.pop("class_path")
        if self.is_tree:
            # Resolved, so a key left at its default and one written out hash alike.
            return {"kind": self.kind, "task": self.tree_task, "classes": self.classes, "l2": self.l2,
                    **{k: self.tree_value(k) for k in TREE_DEFAULTS
                       if k != "l2" and not (k == "learning_rate" and self.kind in ("forest", "tree"))}}
        for key in TREE_KEYS:
            d.pop(key)   # absent for other kinds: their model hashes stay as they were
        for key in GP_KEYS:
            # Other kinds leave them out, so adding gp kept their model hashes (and checkpoints) valid.
            value = d.pop(key)
            if self.kind == "gp":
                d[key] = GP_DEFAULTS[key] if value is None else value
        if self.kind != "custom":
            for key in ("path", "options"):
                d.pop(key)
            if self.kind != "ar":   # older specs' hashes stay as they were
                for key in ("lags", "trend"):
                    d.pop(key)
            return d
        d.pop("hidden")
        d.pop("lags")
        d.pop("trend")
        options = d.pop("options") or {}
        return {"kind": d.pop("kind"), "class": cls, **d, **options}

    def identity(self) -> dict[str, Any]:
        """Return what decides the parameter layout and meaning: the section, and a custom class's source hash.

        ``path`` is left out (moving the module's folder changes nothing); the module's
        source hash is in (editing the class makes old checkpoints incompatible).
        """
        d = self.plain()
        if self.kind == "custom" and self.class_path is not None:
            d.pop("path")
            d["source_sha256"] = module_source_sha256(self.class_path, self.path)
        return d


# gp's keys with their defaults, and the largest feature count (a D x D Gram of 8 * D**2 bytes).
GP_DEFAULTS: dict[str, Any] = {"features": 1024, "kernel": "rbf", "lengthscale": "auto", "ard": False,
                               "signal": "auto", "noise": "auto"}
GP_KEYS = tuple(GP_DEFAULTS)
MAX_GP_FEATURES = 16384


def _check_gp(m: ModelSpec) -> tuple[str, str] | None:
    """Return (key, problem) for the gp keys: only kind gp takes them, each within its bounds."""
    if m.kind != "gp":
        for key in GP_KEYS:
            if getattr(m, key) is not None:
                return key, f"only kind gp takes {key}; kind is {m.kind!r}"
        return None
    if m.features is not None and not 1 <= m.features <= MAX_GP_FEATURES:
        return "features", f"expected a number of random features in 1..{MAX_GP_FEATURES}, e.g. 1024; got {m.features}"
    for key, lo, hi in (("lengthscale", 1e-6, 1e6), ("signal", 1e-6, 1e6), ("noise", 1e-9, 1e6)):
        v = getattr(m, key)
        if isinstance(v, float) and not lo <= v <= hi:
            return key, f"expected auto or a number in [{lo:g}, {hi:g}] (y is standardised), got {v!r}"
    if m.ard and isinstance(m.lengthscale, float):
        return "ard", "ard: true fits one lengthscale per column; it needs lengthscale: auto"
    for key, given in (("hidden", bool(m.hidden)), ("classes", m.classes is not None), ("l2", m.l2 != 0.0)):
        if given:
            return key, "kind gp takes features, kernel, lengthscale, ard, signal, noise; not " + key
    return None


def _check_tree(m: ModelSpec) -> tuple[str, str] | None:
    """Return (key, problem) for a tree section: keys of other kinds, a forest's learning rate, the task."""
    for key, given in (("class", m.class_path), ("path", m.path), ("options", m.options)):
        if given is not None:
            return key, f"only kind custom takes {key}; kind is {m.kind!r}"
    if m.hidden:
        return "hidden", f"only kind mlp takes hidden layers; kind is {m.kind!r}"
    if m.kind == "forest" and m.learning_rate is not None:
        return "learning_rate", ("a forest averages its trees and takes no learning_rate; "
                                 "remove it, or use kind gbdt to boost")
    if m.kind == "tree" and (m.learning_rate is not None or m.trees not in (None, 1)):
        return ("trees" if m.learning_rate is None else "learning_rate"), (
            "kind tree grows one tree at full step (no trees, no learning_rate); use kind gbdt for more")
    if m.task == "multiclass" and m.classes == 2:
        return "classes", "task multiclass needs classes >= 3 (two classes: task binary)"
    if m.task in ("regression", "binary") and m.classes is not None:
        return "classes", f"task {m.task} takes no classes (binary labels are 0/1); use task: multiclass"
    return None


def tree_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Return ``raw`` with a tree model's l2 defaulted to 1.0 (the other kinds' default is 0)."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("kind") not in TREE_KINDS or "l2" in model:
        return raw
    return {**raw, "model": {**model, "l2": TREE_DEFAULTS["l2"]}}


def _check_tree_spec(raw: dict[str, Any], spec: Spec) -> tuple[str, str] | None:
    """Return (key, problem) where a tree model meets a gradient optimizer, a switch rule or too small a budget."""
    m = spec.model
    if not m.is_tree:
        if spec.optimizer.kind == "boost":
            return "optimizer.kind", f"boost trains tree kinds ({', '.join(TREE_KINDS)}); kind {m.kind!r} takes sgd or lbfgs"
        return None
    given = raw.get("optimizer")
    if given is not None and not (isinstance(given, dict) and given.get("kind") == "boost"):
        asked = given.get("kind", "sgd") if isinstance(given, dict) else given
        return "optimizer", (f"model kind {m.kind} is trained by boosting rounds and takes no optimizer section "
                             f"(asked for {quote(asked, 40)}); remove it and tune model.trees, depth, learning_rate")
    for i, rule in enumerate(spec.fleet.rules):
        if rule.then.optimizer is not None:
            return f"fleet.rules[{i}].then.optimizer", (f"model kind {m.kind} has no optimizer to switch to "
                                                        f"({rule.then.optimizer}); use goto or stop")
    trees = m.tree_value("trees")
    for key, bound in (("max_steps", spec.goal.max_steps), ("max_epochs", spec.goal.max_epochs)):
        if bound is not None and bound > trees:
            return f"goal.{key}", (f"{bound:g} rounds but model.trees is {trees} (one step and one epoch are one "
                                   f"round); lower goal.{key} or raise model.trees")
    return None


def module_source_sha256(class_path: str, folder: str | None) -> str:
    """Return the SHA-256 of the source file of ``class_path``'s module ("" if it has none).

    Found with importlib's finder (the spec's folder appended to sys.path as the ranks do),
    so the spec layer hashes a user's model without depending on fleetmpi.models.
    """
    import hashlib
    import importlib.util
    import sys
    if folder and folder not in sys.path:
        sys.path.append(folder)
    mod_name = class_path.partition(":")[0]
    try:
        found = importlib.util.find_spec(mod_name)
    except (ImportError, ValueError):
        return ""
    if found is None or not found.origin or not found.origin.endswith(".py"):
        return ""
    try:
        with open(found.origin, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def _check_custom(m: ModelSpec) -> tuple[str, str] | None:
    """Return (key, problem) for a custom section's own keys; the class is imported later, at start-up."""
    cls = m.class_path
    if cls is None:
        return "class", 'kind custom needs class: "module:ClassName", e.g. class: "poisson:PoissonRegression"'
    mod, sep, name = cls.partition(":")
    if not sep or not all(p.isidentifier() for p in mod.split(".")) or not all(
            p.isidentifier() for p in name.split(".")):
        return "class", f'expected "package.module:ClassName" (dotted module, a colon, the class), got {cls!r}'
    for key, value in (m.options or {}).items():
        if not key.isidentifier():
            return key, "a custom model's option must be a Python identifier (it becomes a keyword argument)"
        if key in CUSTOM_RESERVED:
            return key, f"{key} is passed by fleetmpi itself; options may not be named {', '.join(CUSTOM_RESERVED)}"
        err = _plain_value(value)
        if err:
            return key, err
    return None


def _plain_value(v: Any) -> str | None:
    """Return why ``v`` cannot be a JSON option value (it goes into hashes and model files), or None."""
    if v is None or isinstance(v, (bool, int, str)):
        return None
    if isinstance(v, float):
        return None if v == v and abs(v) != float("inf") else f"expected a finite number, got {v!r}"
    if isinstance(v, (list, tuple)):
        return next((e for e in map(_plain_value, v) if e), None)
    if isinstance(v, Mapping):
        if not all(isinstance(k, str) for k in v):
            return "option mappings need string keys"
        return next((e for e in map(_plain_value, v.values()) if e), None)
    return f"expected a string, number, true/false, null, a list or a mapping, got {type(v).__name__} {v!r}"


def fold_model_options(raw: dict[str, Any]) -> dict[str, Any]:
    """Return ``raw`` with a custom model section's extra keys moved under ``options`` (kwargs for the class)."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("kind") != "custom":
        return raw
    extra = {k: v for k, v in model.items() if k not in CUSTOM_KEYS}
    if not extra:
        return raw
    given = model.get("options")
    if given is not None and not isinstance(given, dict):
        return raw   # the schema reports options' type
    both = sorted(set(extra) & set(given or {}))
    if both:
        raise SchemaError(f"model.{both[0]}", "given both as a key and under model.options; give it once")
    folded = {k: v for k, v in model.items() if k in CUSTOM_KEYS}
    folded["options"] = {**(given or {}), **extra}
    return {**raw, "model": folded}


@dataclass(frozen=True)
class ScheduleSpec:
    kind: Literal["constant", "step", "cosine", "exp"] = "constant"
    every_steps: int = check(positive, 1000)      # step: multiply by gamma every N steps
    gamma: float = check(in_range(0.0, 1.0), 0.5)  # step / exp decay factor
    total_steps: int = check(positive, 10000)     # cosine: steps to reach min_lr
    min_lr: float = check(non_negative, 0.0)
    warmup_steps: int = check(non_negative, 0)


@dataclass(frozen=True)
class LbfgsSpec:
    history: int = check(positive, 10)
    batch: int | Literal["full"] = "full"
    max_ls: int = check(positive, 20)
    c1: float = check(in_range(1e-8, 0.5), 1e-4)
    tol_grad: float = check(non_negative, 1e-7)

    def validate(self) -> tuple[str, str] | None:
        if isinstance(self.batch, int) and self.batch < 1:
            return "batch", f"expected 'full' or a batch size >= 1, got {self.batch}"
        return None


@dataclass(frozen=True)
class BfgsSpec:
    """Full BFGS's line search and stop; its rows are L-BFGS's (``optimizer.lbfgs.batch``)."""

    max_ls: int = check(positive, 20)
    c1: float = check(in_range(1e-8, 0.5), 1e-4)
    tol_grad: float = check(non_negative, 1e-7)


@dataclass(frozen=True)
class OptimizerSpec:
    # boost: set for tree kinds, which take no optimizer section; closed_form: one pass of
    # exact sufficient statistics and a Cholesky solve (kind ar).
    kind: Literal["sgd", "lbfgs", "bfgs", "closed_form", "boost"] = "sgd"
    lr: float = check(positive, 0.1)
    momentum: float = check(in_range(0.0, 0.999), 0.0)
    batch: int = check(positive, 256)
    schedule: ScheduleSpec = ScheduleSpec()
    lbfgs: LbfgsSpec = LbfgsSpec()
    bfgs: BfgsSpec = BfgsSpec()


@dataclass(frozen=True)
class SyncSpec:
    """How ranks combine gradient sums: dense allreduce, threshold-compressed, exact or sparse (touched features)."""

    kind: Literal["dense", "threshold", "exact", "sparse"] = "dense"
    # threshold: the quantum sent per entry, in units of one rank's gradient *sum* over its
    # rows (the start value when adaptive).
    tau: float | None = check(positive, None)
    adaptive: bool = False                     # threshold: steer tau towards target_density
    target_density: float | None = check(in_range(1e-9, 1.0), None)  # fraction sent; default 0.01

    def validate(self) -> tuple[str, str] | None:
        if self.kind == "threshold" and self.tau is None:
            return "tau", ("threshold sync needs tau > 0, the amount sent per entry in units of a rank's "
                           "gradient sum, e.g. {kind: threshold, tau: 0.5} (with adaptive: true, its start value)")
        if self.kind != "threshold":
            for key, given in (("tau", self.tau is not None), ("adaptive", self.adaptive),
                               ("target_density", self.target_density is not None)):
                if given:
                    return key, f"only kind threshold takes {key}; kind is {self.kind!r}"
        if self.target_density is not None and not self.adaptive:
            return "target_density", "target_density steers an adaptive tau: add adaptive: true or drop it"
        return None


def _loss_target(v: float) -> str | None:
    # Every loss (log-loss, squared error, with l2) is >= 0 and a goal is met when loss < target.
    return None if v > 0 else f"expected a loss target > 0 (a loss is never below 0), got {quote(v)}"


def _accuracy_target(v: float) -> str | None:
    # The goal is met when accuracy > target, and accuracy is at most 1.
    return None if 0 <= v < 1 else f"expected an accuracy in [0, 1) (met when accuracy > it), got {quote(v)}"


@dataclass(frozen=True)
class GoalSpec:
    loss_below: float | None = check(_loss_target, None)
    valid_loss_below: float | None = check(_loss_target, None)
    valid_accuracy_above: float | None = check(_accuracy_target, None)
    max_epochs: float | None = check(positive_at_most(MAX_EPOCHS), None)
    max_steps: int | None = check(positive_at_most(MAX_STEPS), None)
    patience: int | None = check(positive_at_most(MAX_STEPS), None)   # evaluations without a better valid_loss
    min_delta: float = check(in_range(0.0, 1e6), 0.0)                  # "better": below best - min_delta
    require_target: bool = False                                       # unmet target: exit 5 (TARGET_MISSED)

    def validate(self) -> tuple[str, str] | None:
        if self.max_epochs is None and self.max_steps is None:
            return "max_epochs", "a goal needs a bound: set max_epochs or max_steps (or both)"
        if self.require_target and not self.has_target:
            return "require_target", ("require_target needs a target: set loss_below, valid_loss_below "
                                      "or valid_accuracy_above")
        return None

    @property
    def has_target(self) -> bool:
        """Return whether the goal names a metric target (not only a budget)."""
        return any(v is not None for v in (self.loss_below, self.valid_loss_below, self.valid_accuracy_above))


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int = check(positive, 200)
    keep: int = check(positive, 3)
    keep_best: bool | None = None   # keep the best-valid_loss parameters as model.h5 (None: when data.valid is set)


@dataclass(frozen=True)
class MlflowSpec:
    """Log a job to MLflow (fleetmpi.engine.trackers): one run per job, params from the spec."""

    tracking_uri: str | None = None   # default: file:JOB_DIR/mlruns (a file store; mlflow-skinny is enough)
    experiment: str | None = None     # default: the spec's name


@dataclass(frozen=True)
class MonitorSpec:
    log_every_steps: int = check(positive, 10)
    eval_every_steps: int = check(positive, 50)
    plateau_rel_tol: float = check(in_range(0.0, 1.0), 1e-3)
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    line_every_s: float = check(positive, 10.0)
    # Experiment trackers, written by rank 0 (optional extras; a missing package is one warning line).
    tensorboard: bool = False          # event files under JOB_DIR/tensorboard/NAME (tensorboard --logdir)
    mlflow: MlflowSpec | None = None   # {tracking_uri, experiment}; {} for the defaults


# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (seconds round up to a minute, as sbatch does).
_SLURM_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
SLURM_TIME_FORMATS = "minutes (90), 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS'"


def slurm_minutes(v: int | str) -> int:
    """Return a Slurm time limit (minutes as an int, or a string in Slurm's --time formats) in whole minutes.

    Raises ValueError naming the formats for anything else.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = _SLURM_TIME_RE.match(v.strip()) if isinstance(v, str) else None
    if m is None:
        raise ValueError(f"expected a time limit as {SLURM_TIME_FORMATS}, got {quote(v)}")
    d, dh, dm, ds, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if d is not None:
        seconds = ((d * 24 + (dh or 0)) * 60 + (dm or 0)) * 60 + (ds or 0)
    elif c is not None:           # H:M:S
        seconds = ((a or 0) * 60 + (b or 0)) * 60 + c
    elif b is not None:           # M:S
        seconds = (a or 0) * 60 + b
    else:                         # M
        seconds = (a or 0) * 60
    return math.ceil(seconds / 60)


def _time_limit(v: Any) -> str | None:
    try:
        minutes = slurm_minutes(v)
    except ValueError as e:
        return str(e)
    return positive_at_most(MAX_TIME_MIN)(minutes)


@dataclass(frozen=True)
class PhaseSpec:
    nodes: int = check(positive_at_most(MAX_NODES), 1)
    ranks_per_node: int = check(positive_at_most(MAX_RANKS_PER_NODE), 1)
    partition: str | None = check(identifier, None)
    gpus_per_node: int = check(in_range(0, MAX_GPUS_PER_NODE), 0)
    cpus_per_rank: int = check(positive_at_most(MAX_RANKS_PER_NODE), 1)
    # numba threads of each rank's gradient kernels (NUMBA_NUM_THREADS); None: cpus_per_rank.
    threads_per_rank: int | None = check(positive_at_most(MAX_RANKS_PER_NODE), None)
    device: Literal["cpu", "gpu", "auto"] = "cpu"
    if TYPE_CHECKING:
        time_min: int | None = None
    else:
        # The schema reads Slurm's own spellings too ('01:00:00', '1-00:00'); __post_init__
        # turns them into minutes, so everything after the load sees an int.
        time_min: int | str | None = check(_time_limit, None)
    mem_gb: float | None = check(positive_at_most(MAX_MEM_GB), None)

    def __post_init__(self) -> None:
        if self.time_min is not None:
            object.__setattr__(self, "time_min", slurm_minutes(self.time_min))

    def validate(self) -> tuple[str, str] | None:
        if self.nodes * self.ranks_per_node > MAX_RANKS:
            return "ranks_per_node", (f"nodes x ranks_per_node = {self.nodes * self.ranks_per_node} ranks; "
                                      f"at most {MAX_RANKS} are supported")
        return None

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def threads(self) -> int:
        """Return the kernel threads per rank: threads_per_rank, else cpus_per_rank."""
        return self.threads_per_rank or self.cpus_per_rank

    def shape(self) -> str:
        """Return the phase shape as 'NxR@partition' for logs."""
        part = f"@{self.partition}" if self.partition else ""
        gpu = f"+{self.gpus_per_node}gpu" if self.gpus_per_node else ""
        return f"{self.nodes}x{self.ranks_per_node}{part}{gpu}"


@dataclass(frozen=True)
class ActionSpec:
    goto: str | None = None
    optimizer: Literal["sgd", "lbfgs", "bfgs"] | None = None
    stop: bool = False

    def validate(self) -> tuple[str, str] | None:
        n = (self.goto is not None) + (self.optimizer is not None) + bool(self.stop)
        if n != 1:
            return "goto", "an action is exactly one of {goto: PHASE}, {optimizer: sgd|lbfgs|bfgs}, {stop: true}"
        return None

    def describe(self) -> str:
        if self.goto:
            return f"goto {self.goto}"
        if self.optimizer:
            return f"optimizer {self.optimizer}"
        return "stop"


@dataclass(frozen=True)
class RuleSpec:
    _aliases: ClassVar[dict[str, str]] = {"in": "in_phases"}
    when: str
    then: ActionSpec
    in_phases: tuple[str, ...] | str | None = None

    @property
    def phases(self) -> tuple[str, ...] | None:
        if self.in_phases is None:
            return None
        return (self.in_phases,) if isinstance(self.in_phases, str) else self.in_phases


@dataclass(frozen=True)
class FleetSpec:
    start: str
    phases: Mapping[str, PhaseSpec]
    rules: tuple[RuleSpec, ...] = ()
    approval: Literal["auto", "manual"] = "auto"


def _sbatch_option(v: Any) -> str | None:
    from fleetmpi.schema import sbatch_extra_option
    return sbatch_extra_option(v)


@dataclass(frozen=True)
class SchedulerSpec:
    backend: Literal["local", "slurm"] = "local"
    mpiexec: str | None = None
    launcher_args: tuple[str, ...] = ()             # extra arguments to mpiexec (local) or srun/mpiexec (slurm)
    account: str | None = check(identifier, None)
    qos: str | None = check(identifier, None)
    extra_sbatch: tuple[str, ...] = ()              # more '#SBATCH --key=value' lines, e.g. --constraint=ib
    # Slurm only: what starts the ranks inside the allocation.
    launcher: Literal["srun", "mpiexec"] = "srun"
    # Slurm sends USR2 to the batch shell this long before the time limit; the ranks checkpoint.
    signal_grace_s: int = check(in_range(10, 65535), 120)
    # Resubmissions after a stop by a signal: near the time limit, and otherwise (preemption).
    max_timeouts: int = check(non_negative, 3)
    max_preemptions: int = check(non_negative, 10)
    requeue: bool = False                           # after a stop: `scontrol requeue` instead of a new job
    # Local backend: allow a phase more ranks than this machine has cores (FLEETMPI_OVERSUBSCRIBE wins).
    oversubscribe: bool = False
    submit_attempts: int = check(positive, 6)       # sbatch tries on transient errors
    submit_backoff_s: float = check(non_negative, 2.0)  # first retry delay, doubled per try (at most 60 s)

    def validate(self) -> tuple[str, str] | None:
        for i, opt in enumerate(self.extra_sbatch):
            err = _sbatch_option(opt)
            if err:
                return f"extra_sbatch[{i}]", err
        return None


@dataclass(frozen=True)
class RetrySpec:
    max_attempts: int = check(positive, 3)
    backoff_s: float = check(non_negative, 30.0)


@dataclass(frozen=True)
class NotifySpec:
    command: str | None = None
    webhook: str | None = None
    email: str | None = None
    # approval: a rescale waits for `fleetmpi approve` (fleet.approval: manual)
    on: tuple[Literal["terminal", "rescale", "approval"], ...] = ("terminal", "approval")


@dataclass(frozen=True)
class Spec:
    data: DataSpec
    model: ModelSpec
    goal: GoalSpec
    fleet: FleetSpec
    name: str = check(identifier)   # required: check() without a default
    seed: int = check(non_negative, 0)   # numpy's generators take only seeds >= 0
    optimizer: OptimizerSpec = OptimizerSpec()
    sync: SyncSpec = SyncSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    monitor: MonitorSpec = MonitorSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    retry: RetrySpec = RetrySpec()
    notify: tuple[NotifySpec, ...] = ()
    # Directory that relative data paths are resolved against (set by load, not by YAML).
    _base_dir: str = "."

    @property
    def lags(self) -> int | None:
        """Return the lag window length when the data are series windows (model ar or data.windows), else None."""
        if self.model.kind == "ar":
            return self.model.lags
        return self.data.windows.lags if self.data.windows is not None else None

    def data_path(self, rel: str) -> Path:
        """Return a data path resolved against the spec file's folder."""
        p = Path(rel).expanduser()
        return p if p.is_absolute() else Path(self._base_dir) / p

    def phase(self, name: str) -> PhaseSpec:
        return self.fleet.phases[name]

    def plain(self) -> dict[str, Any]:
        """Return the spec as plain data, data paths absolute, so a job dir stands on its own."""
        d = to_plain(self)
        d.pop("_base_dir", None)
        d["model"] = self.model.plain()
        for key in ("valid_tail", "windows"):   # absent unless given: older specs' hashes stay as they were
            if d["data"][key] is None:
                d["data"].pop(key)
        for r in d["fleet"]["rules"]:
            r["in"] = r.pop("in_phases")
        d["data"]["train"] = str(self.data_path(self.data.train).resolve())
        if self.data.valid:
            d["data"]["valid"] = str(self.data_path(self.data.valid).resolve())
        return d

    def spec_hash(self) -> str:
        return _hash(self.plain())

    @property
    def keep_best(self) -> bool:
        """Return whether the best-valid_loss parameters are kept (checkpoint.keep_best, default: with data.valid)."""
        return self.has_valid if self.checkpoint.keep_best is None else self.checkpoint.keep_best

    @property
    def has_valid(self) -> bool:
        """Return whether the job has validation rows (a valid file, or a series' held-out tail)."""
        return bool(self.data.valid) or self.data.valid_tail is not None

    def model_hash(self) -> str:
        """Hash of the model section, which decides the parameter layout and its meaning."""
        return _hash({"model": self.model.identity()})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _check_series(spec: Spec) -> tuple[str, str] | None:
    """Return (key, problem) where the model, optimizer and series sections disagree."""
    m, w = spec.model, spec.data.windows
    if m.kind == "ar" and w is not None and w.lags != m.lags:
        return "data.windows.lags", f"is {w.lags} but model.lags is {m.lags}; kind ar needs one lag count (drop data.windows)"
    if w is not None and m.kind not in ("linear", "ar"):
        return "data.windows", (f"lag windows have real-valued targets; model kind {m.kind!r} classifies "
                                "(use kind ar, or linear on data.windows)")
    if spec.optimizer.kind == "closed_form" and m.kind != "ar":
        return "optimizer.kind", f"closed_form solves kind ar exactly; model kind {m.kind!r} needs sgd or lbfgs"
    if spec.data.valid_tail is not None and spec.lags is None:
        return "data.valid_tail", "holds out the end of series data: set model.kind ar or data.windows.lags"
    if spec.lags is not None and spec.data.valid:
        return "data.valid", "series data validate on their own tail: use data.valid_tail instead"
    return None


def _check_fleet(spec: Spec) -> tuple[str, str] | None:
    from fleetmpi.rules import RuleSyntaxError, parse_condition

    phases = spec.fleet.phases
    names = ", ".join(sorted(phases))
    if not phases:
        return "fleet.phases", "expected at least one phase, e.g. {small: {nodes: 1, ranks_per_node: 2}}"
    if spec.fleet.start not in phases:
        return "fleet.start", f"unknown phase {spec.fleet.start!r}; phases: {names}"
    for name, ph in phases.items():
        if ph.device == "gpu" and ph.gpus_per_node == 0 and spec.scheduler.backend == "slurm":
            return f"fleet.phases.{name}.gpus_per_node", "device gpu on slurm needs gpus_per_node >= 1"
    reach = {spec.fleet.start}
    for i, rule in enumerate(spec.fleet.rules):
        key = f"fleet.rules[{i}]"
        for p in rule.phases or ():
            if p not in phases:
                return f"{key}.in", f"unknown phase {p!r}; phases: {names}"
        if rule.then.goto is not None and rule.then.goto not in phases:
            return f"{key}.then.goto", f"unknown phase {rule.then.goto!r}; phases: {names}"
        try:
            parse_condition(rule.when)
        except RuleSyntaxError as e:
            return f"{key}.when", str(e)
    # Reachability: follow goto edges from the start phase until nothing new appears.
    changed = True
    while changed:
        changed = False
        for rule in spec.fleet.rules:
            src = rule.phases
            if rule.then.goto and rule.then.goto not in reach and (src is None or reach & set(src)):
                reach.add(rule.then.goto)
                changed = True
    unreachable = sorted(set(phases) - reach)
    if unreachable:
        return "fleet.phases", (f"phase(s) {', '.join(unreachable)} can never run: no rule leads there "
                                f"from start {spec.fleet.start!r}; add a rule with then: {{goto: ...}} or remove them")
    return None


def _check_sparse_sync(spec: Spec) -> tuple[str, str] | None:
    """Return (key, problem) where sync kind sparse meets a model that is not one (features + 1) x k table."""
    if spec.sync.kind == "sparse" and spec.model.kind not in ("linear", "logistic", "softmax"):
        return "sync.kind", (f"sparse sends the gradient rows of the features a batch touched; model kind "
                             f"{spec.model.kind!r} has no such rows: use dense, threshold or exact")
    return None


def _check_gp_spec(spec: Spec) -> tuple[str, str] | None:
    """Return (key, problem) where a gp spec sets what a gp does not use: its fit is its own technique."""
    if spec.model.kind != "gp":
        return None
    # The gp's step is an L-BFGS iteration over its hyperparameters with exact statistics
    # sums: SGD settings, another technique or a gradient sync would be silently ignored.
    if spec.optimizer != OptimizerSpec():
        return "optimizer", "model kind gp fits by its own L-BFGS over hyperparameters; leave the optimizer section out"
    if spec.sync != SyncSpec():
        return "sync", "model kind gp sums its statistics exactly across ranks itself; leave the sync section out"
    for i, rule in enumerate(spec.fleet.rules):
        if rule.then.optimizer is not None:
            return f"fleet.rules[{i}].then.optimizer", "model kind gp has one technique (gp); a rule cannot switch it"
    return None


def _check_goal(spec: Spec) -> tuple[str, str] | None:
    """Refuse goal/checkpoint settings that judge valid_loss when there is no validation set."""
    if spec.has_valid:
        return None
    if spec.goal.patience is not None:
        return "goal.patience", "early stopping judges valid_loss: set data.valid, or remove goal.patience"
    if spec.checkpoint.keep_best:
        return "checkpoint.keep_best", "keeping the best model judges valid_loss: set data.valid, or set it false"
    return None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.path=value`` applied (value parsed as YAML, with the file's limits)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        shown = quote(item)
        if not sep or not key or any(not part for part in key.split(".")):
            raise BadInput(f"--set {shown}: expected key.path=value, e.g. --set optimizer.lr=0.05")
        if len(key.split(".")) > MAX_SPEC_DEPTH:
            raise BadInput(f"--set {shown}: key path deeper than {MAX_SPEC_DEPTH} levels; the spec nests 5 deep")
        try:
            value = parse_yaml(text.encode("utf-8", "surrogateescape")) if text else ""
        except SpecTooLarge as e:
            raise BadInput(f"--set {shown}: {e}") from None
        except yaml.YAMLError as e:
            raise BadInput(f"--set {shown}: value is not valid YAML ({_yaml_problem(e)})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise BadInput(f"--set {shown}: {quote(part, 64)} is not a mapping in the spec")
            node = nxt
        node[parts[-1]] = value
    return out


class SpecTooLarge(ValueError):
    """A YAML text over a size, node-count or depth limit (the message says which and where)."""


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' entries may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {quote(key, 64)} (a key may appear once per mapping)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _LimitedLoader(_UniqueKeySafeLoader):
    """Loader that counts nodes as composed, each alias as the size of what it repeats, and the depth.

    Aliases compose to shared nodes, so a bomb of 10 levels of 9 aliases is small as a graph
    but 9**10 nodes to every consumer that walks it (schema, repr, deepcopy); counting the
    expanded size while composing refuses it before anything walks it.
    """

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}   # id(node) -> its expanded size, once composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        mark = event.start_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        is_alias = isinstance(event, yaml.AliasEvent)
        self._depth += 1
        if self._depth > MAX_SPEC_DEPTH:
            raise SpecTooLarge(f"nested deeper than {MAX_SPEC_DEPTH} levels{where}; a spec nests about 5 deep")
        before = self._nodes
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if is_alias:
            self._aliases += 1
            size = self._sizes.get(id(node))
            if size is None:
                raise SpecTooLarge(f"alias *{quote(event.anchor, 64)}{where} refers to a node that contains it; "
                                   "a spec cannot be recursive")
            self._nodes += size
        else:
            self._nodes += 1
            self._sizes[id(node)] = self._nodes - before
        if self._nodes > MAX_SPEC_NODES:
            what = "aliases expand to" if self._aliases else "holds"
            raise SpecTooLarge(f"{what} more than {MAX_SPEC_NODES} values{where}; a spec holds a few hundred")
        return node

    def compose_document(self) -> yaml.Node | None:
        self._sizes.clear()
        return super().compose_document()  # type: ignore[no-any-return]


def parse_yaml(text: bytes) -> Any:
    """Return the YAML document in ``text`` (UTF-8), within the size, node and depth limits.

    Raises SpecTooLarge over a limit, yaml.YAMLError on bad YAML, UnicodeDecodeError on bad UTF-8.
    """
    if len(text) > MAX_SPEC_BYTES:
        raise SpecTooLarge(f"{len(text)} bytes; a spec may have at most {MAX_SPEC_BYTES} bytes (1 MiB)")
    try:
        return yaml.load(text.decode("utf-8"), Loader=_LimitedLoader)
    except ValueError as e:
        if isinstance(e, (SpecTooLarge, UnicodeDecodeError)):
            raise
        # Python refuses int() of more than 4300 digits; YAML reads such a number as an int.
        if "digits" in str(e):
            raise SpecTooLarge("a number has more than 4300 digits; numbers in a spec are small") from None
        raise SpecTooLarge(f"a value cannot be read ({quote(str(e), 120)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return one_line(f"{getattr(e, 'problem', None) or e}{where}")[:300]


def read_yaml(path: Path) -> dict[str, Any]:
    """Return the raw mapping in a YAML spec file; BadInput with file and line on any problem."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"Is a directory: {str(path)!r}")
        if not stat.S_ISREG(st.st_mode):
            # Reading a FIFO or a device blocks or never ends.
            raise BadInput(f"{path}: not a regular file (a FIFO, socket or device); a spec is a YAML file")
        if st.st_size > MAX_SPEC_BYTES:
            raise BadInput(f"{path}: spec is {st.st_size} bytes; a spec may have at most {MAX_SPEC_BYTES} bytes (1 MiB)")
        with path.open("rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise BadInput(f"{path}: spec file not found") from None
    except (IsADirectoryError, PermissionError, NotADirectoryError) as e:
        raise BadInput(f"{path}: cannot read spec ({e.__class__.__name__}: {e})") from None
    try:
        raw = parse_yaml(data)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: cannot read spec ({e.__class__.__name__}: {e})") from None
    except SpecTooLarge as e:
        raise BadInput(f"{path}: spec refused: {e}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a YAML mapping with keys name, data, model, goal, fleet; got {type(raw).__name__}")
    return raw


def from_raw(raw: dict[str, Any], source: str, base_dir: Path) -> Spec:
    """Validate a raw mapping into a Spec; ``source`` names the file in errors."""
    raw = {k: v for k, v in raw.items() if k != "_base_dir"}
    try:
        spec = build(Spec, tree_defaults(fold_model_options(raw)))
    except SchemaError as e:
        raise BadInput(f"{source}: {e}") from None
    err = (_check_fleet(spec) or _check_gp_spec(spec) or _check_sparse_sync(spec) or _check_tree_spec(raw, spec)
           or _check_series(spec) or _check_goal(spec))
    if err:
        raise BadInput(f"{source}: {err[0]}: {err[1]}")
    object.__setattr__(spec, "_base_dir", str(base_dir))
    if spec.model.is_tree and spec.optimizer.kind != "boost":
        object.__setattr__(spec, "optimizer", OptimizerSpec(kind="boost"))
    if spec.model.kind == "custom":
        # Absolute now, so the job dir's copy of the spec imports from the same folder.
        folder = Path(spec.model.path or ".").expanduser()
        folder = folder if folder.is_absolute() else base_dir / folder
        object.__setattr__(spec.model, "path", str(folder.resolve()))
    return spec


def load(path: Path | str, overrides: list[str] | None = None) -> Spec:
    """Load, override and validate a spec file; raise BadInput with one line on any problem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    return from_raw(raw, str(path), path.resolve().parent)


def machine_cores() -> int:
    """Return the number of cores this process may run on (its CPU affinity, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_local_fit(spec: Spec, cores: int | None = None, source: str = "spec",
                    environ: Mapping[str, str] | None = None) -> None:
    """Refuse a local-backend spec with a phase of more ranks than ``cores``, unless oversubscription is allowed.

    Precedence: FLEETMPI_OVERSUBSCRIBE=1 (allow) or =0 (refuse) > scheduler.oversubscribe > refuse.
    The local launcher calls this before it starts a job; every phase is checked, not only the first.
    """
    if spec.scheduler.backend != "local":
        return
    env = os.environ if environ is None else environ
    flag = env.get("FLEETMPI_OVERSUBSCRIBE", "").strip()
    if flag not in ("", "0", "1"):
        raise BadInput(f"FLEETMPI_OVERSUBSCRIBE={quote(flag, 40)}: expected 1 (allow more ranks than cores) or 0")
    allowed = flag == "1" if flag else spec.scheduler.oversubscribe
    if allowed:
        return
    cores = machine_cores() if cores is None else cores
    for name, ph in spec.fleet.phases.items():
        if ph.ranks > cores:
            raise BadInput(f"{source}: fleet.phases.{name}: {ph.ranks} ranks ({ph.nodes} x {ph.ranks_per_node}) "
                           f"but this machine has {cores} cores; lower ranks_per_node, or allow it with "
                           "scheduler.oversubscribe: true or FLEETMPI_OVERSUBSCRIBE=1")


def dump(spec: Spec) -> str:
    """Return the spec as YAML (data paths absolute)."""
    return yaml.safe_dump(spec.plain(), sort_keys=False)
