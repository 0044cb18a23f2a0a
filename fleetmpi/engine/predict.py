"""Serve predictions from a finished job's model.h5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fleetmpi.errors import BadInput, CheckpointError
from fleetmpi.h5store import read_h5_verified, write_h5_atomic
from fleetmpi.models import TASKS, Model, build_model
from fleetmpi.spec import ModelSpec

CHUNK_ROWS = 65536


def load_model(path: Path) -> tuple[Model, np.ndarray, dict[str, Any]]:
    """Return (model, params, meta) from a verified model file."""
    arrays, meta = read_h5_verified(path, kind="model")
    if meta.get("kind") not in (*TASKS, "custom"):
        raise CheckpointError(f"{path}: model kind {meta.get('kind')!r} is not one of {', '.join(TASKS)}, custom; "
                              "expected a model.h5 written by this fleetmpi")
    try:
        if meta["kind"] == "custom":
            model = _custom_model(path, meta)
        else:
            hidden = tuple(meta.get("sizes", [])[1:-1]) if meta["kind"] == "mlp" else ()
            mspec = ModelSpec(kind=meta["kind"], l2=float(meta.get("l2", 0.0)), hidden=hidden,
                              classes=meta.get("classes") if meta["kind"] in ("softmax", "mlp") else None)
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
    model, params, meta = load_model(model_path)
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
        if X.ndim != 2 or X.shape[1] != model_d(model):
            raise BadInput(f"{data_path}: X has shape {X.shape} but the model takes {model_d(model)} features")
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
            parts.append(model.predict(rows, params))
    raw = np.concatenate(parts) if parts else np.empty(0)
    if out.suffix.lower() == ".csv":
        return _csv_out(out, model, meta, raw)
    arrays: dict[str, np.ndarray] = {}
    if model.task == "regression":
        arrays["pred"] = raw
    elif model.task == "binary":
        arrays["proba"] = raw
        arrays["pred"] = (raw >= 0.5).astype(np.int64)
    else:
        arrays["proba"] = raw
        arrays["pred"] = raw.argmax(axis=1).astype(np.int64)
    write_h5_atomic(out, arrays, {"model": str(model_path), "data": str(data_path), "model_meta": meta},
                    kind="predictions")
    return {"out": str(out), "rows": int(raw.shape[0]), "task": model.task}


def model_d(model: Model) -> int:
    return int(model.meta()["d"])


# ---------------------------------------------------------------- tables in, CSV out
TABLE_SUFFIXES = (".csv", ".txt", ".parquet", ".pq", ".npy", ".svm", ".libsvm")


def check_out(out: Path, *inputs: Path) -> None:
    """Refuse an --out that would overwrite an input, is a folder, or whose folder is missing or unwritable."""
    import os
    if out.resolve() in tuple(p.resolve() for p in inputs):
        raise BadInput(f"--out {out}: would overwrite an input file; choose another path")
    if out.suffix.lower() not in (".csv", ".h5", ".hdf5"):
        raise BadInput(f"--out {out}: give a .csv or .h5 file name")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise BadInput(f"--out {out}: is a folder; give a file name, e.g. {out / 'predictions.csv'}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: folder {out.parent} is not writable; choose another --out")


def class_names(model: Model, meta: dict[str, Any]) -> list[str]:
    """Return the class names of a classifier: make-data's, else the class ids as text."""
    from fleetmpi.preprocess import Record
    rec = Record.from_meta(meta.get("preprocess"))
    if rec is not None and rec.classes:
        return list(rec.classes)
    k = 2 if model.task == "binary" else int(meta.get("classes") or 0)
    return [str(i) for i in range(k)]


def _proba_matrix(task: str, raw: np.ndarray) -> np.ndarray:
    return np.column_stack([1.0 - raw, raw]) if task == "binary" else raw


class CsvOut:
    """Stream predictions to a CSV written atomically (temp in the same folder, fsync, rename)."""

    def __init__(self, out: Path, task: str, classes: list[str]) -> None:
        import csv
        import os

        from fleetmpi.jobdir import open_new
        self.out, self.task, self.classes = out, task, classes
        self.tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
        try:
            self.fh = os.fdopen(open_new(self.tmp), "w", newline="", encoding="utf-8")
        except OSError as e:
            raise BadInput(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable folder") from None
        self.w = csv.writer(self.fh)
        self.w.writerow(["pred"] if task == "regression" else ["class", *(f"p_{c}" for c in classes)])

    def add(self, raw: np.ndarray) -> None:
        """Write the rows of one chunk's raw model output."""
        if self.task == "regression":
            self.w.writerows([repr(float(v))] for v in raw)
            return
        P = _proba_matrix(self.task, raw)
        names = np.asarray(self.classes, dtype=object)[P.argmax(axis=1)]
        self.w.writerows([n, *(f"{p:.9g}" for p in row)] for n, row in zip(names, P.tolist(), strict=True))

    def close(self, ok: bool) -> None:
        """Publish the file when ``ok``, else remove the temp."""
        import os

        from fleetmpi.jobdir import fsync_dir
        try:
            if ok:
                self.fh.flush()
                os.fsync(self.fh.fileno())
            self.fh.close()
            if ok:
                os.replace(self.tmp, self.out)
                fsync_dir(self.out.parent)
        finally:
            self.tmp.unlink(missing_ok=True)


class Scores:
    """Sum accuracy and log-loss (classifiers) or squared error (regression) over labelled chunks."""

    def __init__(self, task: str) -> None:
        self.task, self.n, self.correct, self.loss = task, 0, 0, 0.0

    def add(self, raw: np.ndarray, y: np.ndarray) -> None:
        self.n += len(y)
        if self.task == "regression":
            self.loss += float(((raw - y) ** 2).sum())
            return
        P = _proba_matrix(self.task, raw)
        ids = y.astype(np.int64)
        self.correct += int((P.argmax(axis=1) == ids).sum())
        self.loss -= float(np.log(np.clip(P[np.arange(len(ids)), ids], 1e-15, 1.0)).sum())

    def report(self) -> dict[str, float]:
        if not self.n:
            return {}
        if self.task == "regression":
            return {"mse": self.loss / self.n, "labelled_rows": self.n}
        return {"accuracy": self.correct / self.n, "log_loss": self.loss / self.n, "labelled_rows": self.n}


def predict_table(model_path: Path, data_path: Path, out: Path) -> dict[str, Any]:
    """Predict a CSV, Parquet, NPY or LIBSVM file in chunks through the model's preprocessing; write ``out``."""
    from fleetmpi.preprocess import Record
    from fleetmpi.tabular import format_of, read_chunks
    model, params, meta = load_model(model_path)
    check_out(out, model_path, data_path)
    fmt = format_of(data_path)
    rec = Record.from_meta(meta.get("preprocess"))
    d = model_d(model)
    classes = class_names(model, meta) if model.task != "regression" else []
    sink = CsvOut(out, model.task, classes) if out.suffix.lower() == ".csv" else None
    parts: list[np.ndarray] = []
    scores = Scores(model.task)
    rows, ok = 0, False
    try:
        text = frozenset(rec.categorical) if rec is not None else frozenset()
        for chunk in read_chunks(data_path, fmt, text, libsvm_d=d if fmt == "libsvm" else None):
            if rec is None:   # no make-data record: every column, in file order, is a feature
                rec = Record(columns=[c for c in chunk.cols if c != "label"], features=[], label=None,
                             task=model.task)
            X = rec.features_of(chunk, str(data_path))
            if X.shape[1] != d:
                raise BadInput(f"{data_path}: gives {X.shape[1]} features but the model takes {d} "
                               f"({', '.join(rec.features or rec.columns)[:200]})")
            raw = model.predict(X, params)
            if rec.label is not None and rec.label in chunk.cols:
                scores.add(raw, rec.labels_of(chunk, str(data_path)))
            if sink is not None:
                sink.add(raw)
            else:
                parts.append(raw)
            rows += X.shape[0]
        if rows == 0:
            raise BadInput(f"{data_path}: no rows to predict")
        if sink is None:
            raw = np.concatenate(parts)
            arrays = {"pred": raw} if model.task == "regression" else {
                "proba": raw, "pred": (raw >= 0.5 if model.task == "binary" else raw.argmax(axis=1)).astype(np.int64)}
            write_h5_atomic(out, arrays, {"model": str(model_path), "data": str(data_path), "model_meta": meta,
                                          "classes": classes}, kind="predictions")
        ok = True
    finally:
        if sink is not None:
            sink.close(ok)
    return {"out": str(out), "rows": rows, "task": model.task, **({"classes": classes} if classes else {}),
            **scores.report()}


def _csv_out(out: Path, model: Model, meta: dict[str, Any], raw: np.ndarray) -> dict[str, Any]:
    """Write an HDF5 input's predictions as CSV (class names from the model's record)."""
    classes = class_names(model, meta) if model.task != "regression" else []
    sink = CsvOut(out, model.task, classes)
    ok = False
    try:
        sink.add(raw)
        ok = True
    finally:
        sink.close(ok)
    return {"out": str(out), "rows": int(raw.shape[0]), "task": model.task}
