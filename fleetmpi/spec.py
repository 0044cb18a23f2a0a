"""Job spec: YAML -> validated, frozen dataclasses; every error names file, key path, valid values.

Precedence: ``--set key.path=value`` overrides > spec file > defaults in the dataclasses.

The sections of what a job trains (data, model, optimizer, sync, goal, checkpoint, monitor)
live here; those of where and how it runs (fleet phases and rules, scheduler, retry,
notify) in ``fleetmpi.spec_fleet``, re-exported here with the kinds' constants of
``fleetmpi.spec_checks``, so every public name imports from ``fleetmpi.spec``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from fleetmpi.errors import BadInput, quote
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
from fleetmpi.spec_checks import (  # the kinds' constants are part of the spec's public names
    GP_DEFAULTS,
    GP_KEYS,
    MAX_CLASSES,
    MAX_TREE_DEPTH,
    MAX_TREES,
    TREE_DEFAULTS,
    TREE_KEYS,
    TREE_KINDS,
    _check_compute,
    _check_custom,
    _check_fleet,
    _check_goal,
    _check_gp,
    _check_gp_spec,
    _check_series,
    _check_sparse_sync,
    _check_tree,
    _check_tree_spec,
    fold_model_options,
    module_source_sha256,
    tree_defaults,
)
from fleetmpi.spec_fleet import (  # the run side's sections and helpers are part of the spec's public names
    MAX_GPUS_PER_NODE,
    MAX_MEM_GB,
    MAX_NODES,
    MAX_RANKS,
    MAX_RANKS_PER_NODE,
    MAX_TIME_MIN,
    SLURM_TIME_FORMATS,
    ActionSpec,
    FleetSpec,
    NotifySpec,
    PhaseSpec,
    RetrySpec,
    RuleSpec,
    SchedulerSpec,
    check_local_fit,
    machine_cores,
    slurm_minutes,
)
from fleetmpi.spec_yaml import apply_overrides, read_yaml

__all__ = ["GP_DEFAULTS", "GP_KEYS", "MAX_CLASSES", "MAX_GPUS_PER_NODE", "MAX_MEM_GB", "MAX_NODES", "MAX_RANKS",
           "MAX_RANKS_PER_NODE", "MAX_TIME_MIN", "SLURM_TIME_FORMATS", "TREE_DEFAULTS", "TREE_KEYS", "TREE_KINDS",
           "ActionSpec", "FleetSpec", "ModelSpec", "NotifySpec", "PhaseSpec", "RetrySpec", "RuleSpec", "SchedulerSpec",
           "Spec", "apply_overrides", "check_local_fit", "dump", "from_raw", "load", "machine_cores",
           "module_source_sha256", "slurm_minutes"]


# Bounds on a goal: beyond them a value is a typo, not a budget.
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
    # mlp, linear, logistic: the precision of their products. float32 runs them in single
    # precision (mlp: BLAS, like PyTorch's default dtype; linear/logistic: kernels.cpu_glm);
    # parameters, loss and gradient sums stay float64.
    compute: Literal["float64", "float32"] = "float64"
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
            if key == "task" and self.kind == "mlp":
                continue    # mlp: multiclass (softmax) or regression (one identity output)
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
            if self.task == "binary":
                return "task", ("kind mlp takes task multiclass (softmax, the default) or regression; "
                                "for 0/1 labels use multiclass")
            if self.task == "regression" and self.classes is not None:
                return "classes", "task regression forecasts values and takes no classes"
            if not 1 <= len(self.hidden) <= 2:
                return "hidden", f"mlp needs 1 or 2 hidden layer sizes, e.g. [64] or [128, 64]; got {list(self.hidden)}"
            if any(h < 1 for h in self.hidden):
                return "hidden", f"hidden layer sizes must be >= 1, got {list(self.hidden)}"
        elif self.hidden:
            return "hidden", f"only kind mlp takes hidden layers; kind is {self.kind!r}"
        elif self.compute != "float64" and self.kind not in ("linear", "logistic"):
            return "compute", f"only kinds mlp, linear and logistic take compute: float32; kind is {self.kind!r}"
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
            value = d.pop(key)   # absent for other kinds: their model hashes stay as they were
            if key == "task" and self.kind == "mlp" and value == "regression":
                d[key] = value   # a regression mlp has another output layer: another model hash
        if d["compute"] == "float64":
            d.pop("compute")   # the default: model hashes of specs written before the key stay as they were
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
        d.pop("compute", None)   # the products' precision: the same parameters mean the same model
        if self.kind == "custom" and self.class_path is not None:
            d.pop("path")
            d["source_sha256"] = module_source_sha256(self.class_path, self.path)
        return d


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
    # exact sufficient statistics and a Cholesky solve (kind ar). adagrad: per-parameter steps
    # lr / sqrt(sum of squared gradients), minibatches as sgd (fleetmpi.optim.adagrad).
    kind: Literal["sgd", "adagrad", "lbfgs", "bfgs", "closed_form", "boost"] = "sgd"
    lr: float = check(positive, 0.1)
    momentum: float = check(in_range(0.0, 0.999), 0.0)
    batch: int = check(positive, 256)
    schedule: ScheduleSpec = ScheduleSpec()
    lbfgs: LbfgsSpec = LbfgsSpec()
    bfgs: BfgsSpec = BfgsSpec()

    def validate(self) -> tuple[str, str] | None:
        if self.kind == "adagrad" and self.momentum:
            return "momentum", ("optimizer kind adagrad takes no momentum (its steps adapt per parameter); "
                                "drop momentum or use kind sgd")
        return None


@dataclass(frozen=True)
class SyncSpec:
    """How ranks combine gradient sums: dense allreduce, threshold-compressed, exact or sparse (touched features)."""

    kind: Literal["dense", "threshold", "exact", "sparse"] = "dense"
    # threshold: the quantum sent per entry, in units of one rank's gradient *sum* over its
    # rows (the start value when adaptive).
    tau: float | None = check(positive, None)
    adaptive: bool = False                     # threshold: steer tau towards target_density
    target_density: float | None = check(in_range(1e-9, 1.0), None)  # fraction sent; default 0.01
    # threshold: SGD's loss, rows and fingerprint go out summed every N steps (default 1:
    # every step); between, a step with no entry to send costs one byte a rank.
    extras_every: int | None = check(positive, None)

    def validate(self) -> tuple[str, str] | None:
        if self.kind == "threshold" and self.tau is None:
            return "tau", ("threshold sync needs tau > 0, the amount sent per entry in units of a rank's "
                           "gradient sum, e.g. {kind: threshold, tau: 0.5} (with adaptive: true, its start value)")
        if self.kind != "threshold":
            for key, given in (("tau", self.tau is not None), ("adaptive", self.adaptive),
                               ("target_density", self.target_density is not None),
                               ("extras_every", self.extras_every is not None)):
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
    # Frozen dataclasses of fleetmpi.spec_fleet: one shared default is safe (ruff sees only this module's).
    scheduler: SchedulerSpec = SchedulerSpec()  # noqa: RUF009
    retry: RetrySpec = RetrySpec()  # noqa: RUF009
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


def from_raw(raw: dict[str, Any], source: str, base_dir: Path) -> Spec:
    """Validate a raw mapping into a Spec; ``source`` names the file in errors."""
    raw = {k: v for k, v in raw.items() if k != "_base_dir"}
    try:
        spec = build(Spec, tree_defaults(fold_model_options(raw)))
    except SchemaError as e:
        raise BadInput(f"{source}: {e}") from None
    err = (_check_fleet(spec) or _check_gp_spec(spec) or _check_compute(spec) or _check_sparse_sync(spec)
           or _check_tree_spec(raw, spec) or _check_series(spec) or _check_goal(spec))
    if err:
        raise BadInput(f"{source}: {err[0]}: {err[1]}")
    object.__setattr__(spec, "_base_dir", str(base_dir))
    if spec.model.kind == "mlp" and spec.data.windows is not None and spec.model.task is None:
        # Lag windows have real targets: the mlp forecasts with its regression head.
        object.__setattr__(spec.model, "task", "regression")
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


def dump(spec: Spec) -> str:
    """Return the spec as YAML (data paths absolute)."""
    return yaml.safe_dump(spec.plain(), sort_keys=False)
