"""Serve predictions from a finished job's model.h5."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fleetmpi.errors import BadInput, CheckpointError
from fleetmpi.h5store import read_h5_verified, write_h5_atomic
from fleetmpi.models import TASKS, TREE_KINDS, Model, build_model
from fleetmpi.models.trees import TreeModel
from fleetmpi.spec import ModelSpec

CHUNK_ROWS = 65536


def load_model(path: Path) -> tuple[Model | TreeModel, np.ndarray, dict[str, Any]]:
    """Return (model, params, meta) from a verified model file (a tree ensemble has empty params)."""
    return _flat_model(path, *read_h5_verified(path, kind="model"))


def _gp_model(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
    """Return the GpModel of a verified gp model file."""
    from fleetmpi.models.gp import GpModel
    try:
        return GpModel.from_file(arrays, meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: gp model is incomplete ({e}); expected a model.h5 written by fleetmpi") from None


def _flat_model(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]
                ) -> tuple[Model | TreeModel, np.ndarray, dict[str, Any]]:
    """Return (model, params, meta) of a model file's contents (a tree ensemble has empty params)."""
    if meta.get("kind") not in (*TASKS, "custom", *TREE_KINDS):
        raise CheckpointError(f"{path}: model kind {meta.get('kind')!r} is not one of "
                              f"{', '.join((*TASKS, 'gp', 'custom', *TREE_KINDS))}; expected a model.h5 written by "
                              "this fleetmpi")
    if meta["kind"] in TREE_KINDS:
        try:
            return TreeModel(arrays, meta), np.empty(0), meta
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: tree model arrays or metadata are incomplete ({e}); expected a model.h5 "
                                  "written by fleetmpi") from None
    try:
        if meta["kind"] == "custom":
            model = _custom_model(path, meta)
        else:
            hidden = tuple(meta.get("sizes", [])[1:-1]) if meta["kind"] == "mlp" else ()
            ar = meta["kind"] == "ar"
            reg_mlp = meta["kind"] == "mlp" and meta.get("task") == "regression"
            mspec = ModelSpec(kind=meta["kind"], l2=float(meta.get("l2", 0.0)), hidden=hidden,
                              task="regression" if reg_mlp else None,
                              classes=meta.get("classes") if meta["kind"] in ("softmax", "mlp") else None,
                              lags=int(meta["lags"]) if ar else None, trend="none" if ar and meta["trend"] == "none" else "const")
            model = build_model(mspec, int(meta["d"]), meta.get("classes"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model metadata is incomplete ({e}); expected a model.h5 written by fleetmpi") from None
    params = arrays.get("params")
    if params is None or params.shape != (model.n_params,):
        raise CheckpointError(f"{path}: params missing or of the wrong shape for a {meta['kind']} model")
    return model, params.astype(np.float64), meta


def _custom_model(path: Path, meta: dict[str, Any]) -> Model:
    """Rebuild a custom model from its meta; refuse a class whose module source changed since training."""
    mspec = ModelSpec(kind="custom", class_path=str(meta["class"]), path=meta.get("path"),
                      options=dict(meta.get("options") or {}), l2=float(meta.get("l2", 0.0)),
                      init_scale=float(meta.get("init_scale", 0.01)),
                      classes=meta.get("classes") if meta.get("task") == "multiclass" else None)
    model = build_model(mspec, int(meta["d"]), meta.get("classes"))
    now, then = getattr(model, "source_sha256", None), meta.get("source_sha256")
    if now != then:
        raise BadInput(f"{path}: trained with {meta['class']} whose module source had sha256 {str(then)[:12]}, "
                       f"but it now has {str(now)[:12]}; restore the module the model was trained with")
    return model


def predict_file(model_path: Path, data_path: Path, out: Path) -> dict[str, Any]:
    """Predict every row of ``data_path``'s X in chunks and write ``out`` atomically."""
    from fleetmpi.engine.data import open_h5
    arrays_in, meta = read_h5_verified(model_path, kind="model")
    if meta.get("kind") == "gp":
        gp = _gp_model(model_path, arrays_in, meta)
        d, task = gp.d, gp.task
        # mean and std of the predictive distribution (noise included); pred repeats the mean.
        predict_rows: Callable[[np.ndarray], Any] = gp.predict
    else:
        model, params, meta = _flat_model(model_path, arrays_in, meta)
        d, task = model_d(model), model.task

        def predict_rows(rows: np.ndarray) -> Any:
            return model.predict(rows, params)
    if out.resolve() in (model_path.resolve(), data_path.resolve()):
        raise BadInput(f"--out {out}: would overwrite an input file; choose another path")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise BadInput(f"--out {out}: is a folder; give a file name, e.g. {out / 'predictions.h5'}")
    with open_h5(data_path) as f:
        if not isinstance(f.get("X"), h5py.Dataset):
            raise BadInput(f"{data_path}: missing dataset 'X' (float32, n x d)")
        X = f["X"]
        if X.ndim != 2 or X.shape[1] != d:
            raise BadInput(f"{data_path}: X has shape {X.shape} but the model takes {d} features")
        if X.shape[0] == 0:
            raise BadInput(f"{data_path}: X has no rows to predict")
        if X.dtype != np.float32:
            raise BadInput(f"{data_path}: X must be float32, got {X.dtype}")
        parts = []
        for i in range(0, X.shape[0], CHUNK_ROWS):
            rows = np.ascontiguousarray(X[i:i + CHUNK_ROWS])
            finite = np.isfinite(rows)
            if not finite.all():   # a prediction from NaN or inf is NaN or arbitrary: refuse, never guess
                r = int(np.flatnonzero(~finite.all(axis=1))[0])
                c = int(np.flatnonzero(~finite[r])[0])
                raise BadInput(f"{data_path}: dataset X holds {'NaN' if np.isnan(rows[r, c]) else 'inf'} at row "
                               f"{i + r}, column {c}; predict needs finite features (drop or impute those rows)")
            parts.append(predict_rows(rows))
    arrays: dict[str, np.ndarray] = {}
    if meta.get("kind") == "gp":
        raw = arrays["mean"] = np.concatenate([p[0] for p in parts])
        arrays["std"] = np.concatenate([p[1] for p in parts])
        arrays["pred"] = raw
    elif task == "regression":
        raw = arrays["pred"] = np.concatenate(parts)
    elif task == "binary":
        raw = np.concatenate(parts)
        arrays["proba"] = raw
        arrays["pred"] = (raw >= 0.5).astype(np.int64)
    else:
        raw = np.concatenate(parts)
        arrays["proba"] = raw
        arrays["pred"] = raw.argmax(axis=1).astype(np.int64)
    write_h5_atomic(out, arrays, {"model": str(model_path), "data": str(data_path), "model_meta": meta},
                    kind="predictions")
    return {"out": str(out), "rows": int(raw.shape[0]), "task": task}


def model_d(model: Model | TreeModel) -> int:
    return int(model.meta()["d"])


MAX_HORIZON = 10_000_000   # forecasts per series; beyond it the output alone is gigabytes


def forecast_file(model_path: Path, data_path: Path, out: Path, horizon: int) -> dict[str, Any]:
    """Write recursive ``horizon``-step forecasts after the end of every series of ``data_path`` to ``out``.

    Each step predicts y_{T+h} from the p values before it, forecasts standing in for values
    not yet seen; ``out`` holds ``forecast`` float64 (horizon, m). Computed in float64 from
    the linear parameters (kind ar, or linear trained on data.windows, whose d is the lags).
    """
    from fleetmpi.engine.data import open_h5
    from fleetmpi.engine.windows import series_dataset
    model, params, meta = load_model(model_path)
    if model.kind not in ("ar", "linear") and not (model.kind == "mlp" and model.task == "regression"):
        raise BadInput(f"{model_path}: --horizon forecasts with a lag model (kind ar, or linear or mlp on data.windows); "
                       f"this model is kind {model.kind!r}")
    if not 1 <= horizon <= MAX_HORIZON:
        raise BadInput(f"--horizon {horizon}: expected a number of steps in [1, {MAX_HORIZON}]")
    if out.resolve() in (model_path.resolve(), data_path.resolve()):
        raise BadInput(f"--out {out}: would overwrite an input file; choose another path")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise BadInput(f"--out {out}: is a folder; give a file name, e.g. {out / 'forecast.h5'}")
    p = model_d(model)
    with open_h5(data_path) as f:
        s = series_dataset(f, data_path)
        T = s.shape[0]
        if T < p:
            raise BadInput(f"{data_path}: series has {T} points but the model needs the last {p} (its lags)")
        last = np.asarray(s[T - p:], dtype=np.float64).reshape(p, -1)
    if not np.isfinite(last).all():
        raise BadInput(f"{data_path}: the last {p} points of a series hold NaN or inf; forecasts need finite values")
    w, b = params[:p], params[p]
    m = last.shape[1]
    hist = np.empty((p + horizon, m))
    hist[:p] = last
    for h in range(horizon):
        # lag 1 is the newest value: rows p+h-1 down to h
        if model.kind == "mlp":   # one window per series, all series in one batch
            hist[p + h] = model.predict(np.ascontiguousarray(hist[h:p + h][::-1].T), params)
        else:
            hist[p + h] = w @ hist[h:p + h][::-1] + b
    forecast = hist[p:]
    write_h5_atomic(out, {"forecast": forecast}, {"model": str(model_path), "data": str(data_path),
                                                  "model_meta": meta, "horizon": horizon}, kind="predictions")
    return {"out": str(out), "horizon": horizon, "series": m}
