"""Checks a job must pass before its job dir is made, shared by the CLI and the Python API."""

from __future__ import annotations

from typing import Any

from fleetmpi.errors import BadInput


def check_inputs(spec: Any) -> None:
    """Check the data files of ``spec`` (a fleetmpi.spec.Spec) so bad data leaves nothing behind."""
    from fleetmpi.engine.data import describe
    from fleetmpi.models import preflight, task_of
    if spec.lags is not None:   # series data: lag windows of one file, its tail held out
        from fleetmpi.engine.windows import describe_series
        series = describe_series(spec.data_path(spec.data.train), spec.lags, spec.data.valid_tail, check=spec.data.check)
        if spec.optimizer.kind != "closed_form" and spec.optimizer.batch > series.n_train:
            raise BadInput(f"{spec.data.train}: optimizer.batch {spec.optimizer.batch} exceeds the {series.n_train} "
                           "training windows")
        return
    task = task_of(spec.model)
    settable = spec.model.kind if spec.model.is_tree or spec.model.kind == "mlp" else None   # model.task chooses
    info = describe(spec.data_path(spec.data.train), task, spec.model.classes, check=spec.data.check, kind=settable)
    preflight(spec.model, spec.sync.kind, info.d, info.classes)   # a user's model class, before a job dir exists
    if spec.data.valid:
        v = describe(spec.data_path(spec.data.valid), task, spec.model.classes or info.classes, check=spec.data.check)
        if v.d != info.d:
            raise BadInput(f"{v.path}: validation X has {v.d} columns but training X has {info.d}")
        _check_same_preparation(info.path, v.path)
    _check_bfgs_size(spec, info.d, info.classes)
    # Only SGD and AdaGrad read optimizer.batch (as the run's optimizer or one a rule switches to):
    # tree kinds and gp take no optimizer section, L-BFGS and BFGS read lbfgs.batch.
    minibatch = ("sgd", "adagrad")
    uses_batch = (not spec.model.is_tree and spec.model.kind != "gp"
                  and (spec.optimizer.kind in minibatch or any(r.then.optimizer in minibatch for r in spec.fleet.rules)))
    if uses_batch and spec.optimizer.batch > info.n:
        raise BadInput(f"{spec.data.train}: optimizer.batch {spec.optimizer.batch} exceeds the {info.n} training rows")


def _check_bfgs_size(spec: Any, d: int, classes: int | None) -> None:
    """Refuse a spec that runs BFGS (as its optimizer or by a rule) on a model too large for its matrix."""
    uses = [("optimizer.kind", spec.optimizer.kind)] + [
        (f"fleet.rules[{i}].then.optimizer", r.then.optimizer) for i, r in enumerate(spec.fleet.rules)]
    where = next((key for key, kind in uses if kind == "bfgs"), None)
    if where is None:
        return
    from fleetmpi.models import build_model
    from fleetmpi.optim.bfgs import size_refusal
    model = build_model(spec.model, d, spec.model.classes or classes)
    refusal = size_refusal(model.n_params)
    if refusal:
        raise BadInput(f"{where}: {refusal}")


def _check_same_preparation(train: Any, valid: Any) -> None:
    """Refuse a validation file that make-data prepared apart from the training file.

    Two records that differ in anything but their source hold other columns, scales or
    class ids under the same positions.
    """
    from dataclasses import asdict

    from fleetmpi.preprocess import read_record
    a, b = read_record(train), read_record(valid)
    if a is None or b is None:   # a file not from make-data's tables: nothing to compare
        return
    ra, rb = asdict(a), asdict(b)
    differ = [k for k in ra if k != "source" and ra[k] != rb[k]]
    if differ:
        raise BadInput(f"{valid}: was prepared apart from {train} (its {', '.join(differ)} differ), so its columns "
                       "or class ids need not mean the same; make both in one make-data run (--valid FILE or "
                       "--valid-fraction)")
