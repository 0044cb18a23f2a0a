"""The spec's checks across sections and per model kind, and the kinds' constants.

``fleetmpi.spec`` builds the typed spec; the checks that look at more than one key (a
tree model with an optimizer section, a gp with a sync section, a series spec's tail,
a fleet's rules and phases) and the constants of each model family live here, so the
spec module stays the schema. Every check returns (key path, problem) or None.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fleetmpi.errors import quote
from fleetmpi.schema import (
    SchemaError,
)

if TYPE_CHECKING:
    from fleetmpi.spec import ModelSpec, Spec


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


def _check_series(spec: Spec) -> tuple[str, str] | None:
    """Return (key, problem) where the model, optimizer and series sections disagree."""
    m, w = spec.model, spec.data.windows
    if m.kind == "ar" and w is not None and w.lags != m.lags:
        return "data.windows.lags", f"is {w.lags} but model.lags is {m.lags}; kind ar needs one lag count (drop data.windows)"
    if w is not None and (m.kind not in ("linear", "ar", "mlp") or m.task == "multiclass"):
        what = "task multiclass" if m.kind == "mlp" else f"model kind {m.kind!r}"
        return "data.windows", (f"lag windows have real-valued targets; {what} classifies "
                                "(use kind ar, linear or mlp (regression) on data.windows)")
    if spec.optimizer.kind == "closed_form" and m.kind != "ar":
        return "optimizer.kind", f"closed_form solves kind ar exactly; model kind {m.kind!r} needs sgd or lbfgs"
    for i, rule in enumerate(spec.fleet.rules):
        # A switch to closed_form solves the same objective exactly and ends the phase (reason solved);
        # only ar provides the sufficient statistics it sums.
        if rule.then.optimizer == "closed_form" and m.kind != "ar":
            return f"fleet.rules[{i}].then.optimizer", (f"closed_form solves kind ar exactly; model kind {m.kind!r} "
                                                        "can switch to sgd, lbfgs or bfgs")
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
    if spec.sync.kind == "exact" and spec.model.kind == "ar" and spec.model.trend == "none":
        # exact sums per-row factors that always carry a bias row, which would move the held-at-0 intercept
        return "sync.kind", ("exact has no per-row factors for kind ar with trend none; use sync dense, "
                             "or trend const")
    return None


def _check_compute(spec: Spec) -> tuple[str, str] | None:
    """Return (key, problem) where a model computes in float32 under exact sync (its row factors are float64)."""
    if spec.model.compute == "float32" and spec.sync.kind == "exact":
        return "model.compute", ("sync exact sums float64 per-row factors to stay bitwise across rank counts; "
                                 "use compute: float64 with it, or sync dense or threshold with float32")
    return None


def _check_gp_spec(spec: Spec) -> tuple[str, str] | None:
    """Return (key, problem) where a gp spec sets what a gp does not use: its fit is its own technique."""
    if spec.model.kind != "gp":
        return None
    # The gp's step is an L-BFGS iteration over its hyperparameters with exact statistics
    # sums: SGD settings, another technique or a gradient sync would be silently ignored.
    if spec.optimizer != type(spec.optimizer)():   # anything but the defaults was asked for
        return "optimizer", "model kind gp fits by its own L-BFGS over hyperparameters; leave the optimizer section out"
    if spec.sync != type(spec.sync)():
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
