"""Serve predictions from a finished job's model.h5."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np

from fleetmpi.errors import BadInput, CheckpointError
from fleetmpi.h5store import read_h5_verified, write_h5_atomic
from fleetmpi.models import TASKS, TREE_KINDS, Model, build_model
from fleetmpi.models.trees import TreeModel
from fleetmpi.spec import ModelSpec
from kernels.sparse import CsrBatch

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


def is_text_input(data_path: Path, meta: dict[str, Any]) -> bool:
    """Return whether ``data_path`` is raw text for a model trained on hashed text (a folder, .jsonl or .csv)."""
    suffix = data_path.suffix.lower()
    return data_path.is_dir() or suffix == ".jsonl" or (suffix == ".csv" and "hashing" in meta)


def predict_file(model_path: Path, data_path: Path, out: Path) -> dict[str, Any]:
    """Predict every row of ``data_path``'s X in chunks and write ``out`` atomically."""
    from fleetmpi.engine.h5rows import open_h5
    arrays_in, meta = read_h5_verified(model_path, kind="model")
    if is_text_input(data_path, meta):
        return predict_text_file(model_path, data_path, out)
    if _is_csr_file(data_path):
        return predict_csr_file(model_path, data_path, out)
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
    if out.suffix.lower() == ".csv":
        if meta.get("kind") == "gp":
            raise BadInput(f"--out {out}: a gp's predictions (mean, std) are written as HDF5; give a .h5 file")
        return _csv_out(out, model, meta, np.concatenate(parts) if parts else np.empty(0))
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


TEXT_CHUNK_DOCS = 4096   # documents hashed and predicted per step: bounds memory by the documents, not by d
CSR_CHUNK_ROWS = 65536   # CSR rows predicted per step


def _is_csr_file(path: Path) -> bool:
    """Return whether ``path`` is an HDF5 file of CSR rows (format csr); False for anything else."""
    from fleetmpi.engine.h5rows import is_csr
    try:
        with h5py.File(path, "r", locking=False) as f:
            return is_csr(f)
    except OSError:   # not HDF5 or unreadable: the dense path reports it with its usual message
        return False


def _check_out(out: Path, *inputs: Path) -> None:
    """Refuse an ``--out`` that would overwrite an input, lies in a missing folder or is a folder."""
    if any(out.resolve() == p.resolve() for p in inputs):
        raise BadInput(f"--out {out}: would overwrite an input; choose another path")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise BadInput(f"--out {out}: is a folder; give a file name, e.g. {out / 'predictions.h5'}")


def _sparse_model(model_path: Path) -> tuple[Model, np.ndarray, dict[str, Any]]:
    """Return (model, params, meta) of a classifier that predicts on CSR rows; BadInput for other kinds."""
    from fleetmpi.engine.trainer import SPARSE_MODEL_KINDS
    model, params, meta = load_model(model_path)
    if isinstance(model, TreeModel) or model.kind not in SPARSE_MODEL_KINDS:
        raise BadInput(f"{model_path}: a {meta.get('kind')!r} model; CSR rows and raw text are predicted by kinds "
                       f"{', '.join(SPARSE_MODEL_KINDS)}")
    return model, params, meta


def _predict_csr(model: Model, params: np.ndarray, X: CsrBatch) -> np.ndarray:
    """Return the model's predictions of CSR rows (the sparse kinds dispatch on CsrBatch)."""
    return model.predict(cast(np.ndarray, X), params)   # Model.predict is typed for dense X only


def _proba(model: Model, params: np.ndarray, X: CsrBatch) -> np.ndarray:
    """Return (rows, classes) float64 probabilities of CSR rows (a binary model gives [1 - p, p])."""
    p = np.asarray(_predict_csr(model, params, X), dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1) if p.ndim == 1 else p


def predict_csr_file(model_path: Path, data_path: Path, out: Path) -> dict[str, Any]:
    """Predict every CSR row of ``data_path`` with the sparse kernels (time ~ nnz) and write ``out`` atomically.

    ``out`` holds ``pred`` (and ``proba`` for classifiers) as ``predict_file`` writes them;
    where the file was hashed from text its ``class_names`` are kept in the attributes.
    """
    from fleetmpi.engine.csr_data import CsrReader
    from fleetmpi.engine.data import describe
    model, params, meta = _sparse_model(model_path)
    _check_out(out, model_path, data_path)
    info = describe(data_path, "regression", check=True)   # structure and finite values; labels are not needed
    d = model_d(model)
    if info.d != d:
        raise BadInput(f"{data_path}: CSR rows have n_features={info.d} but the model takes {d} features")
    reader = CsrReader(data_path)
    try:
        parts = [reader.read_contiguous(lo, min(lo + CSR_CHUNK_ROWS, reader.n))[0]
                 for lo in range(0, reader.n, CSR_CHUNK_ROWS)]
        if model.task == "regression":
            raw = np.concatenate([np.asarray(_predict_csr(model, params, X), np.float64) for X in parts])
            arrays = {"pred": raw}
        else:
            proba = np.concatenate([_proba(model, params, X) for X in parts])
            if model.task == "binary":   # as predict_file: proba is P(y = 1), pred thresholds it at 0.5
                arrays = {"proba": proba[:, 1], "pred": (proba[:, 1] >= 0.5).astype(np.int64)}
            else:
                arrays = {"proba": proba, "pred": proba.argmax(axis=1).astype(np.int64)}
    finally:
        reader.close()
    if out.suffix.lower() == ".csv":
        return _csv_out(out, model, meta, arrays["pred"] if model.task == "regression" else arrays["proba"])
    attrs: dict[str, Any] = {"model": str(model_path), "data": str(data_path), "model_meta": meta}
    if "class_names" in meta:
        attrs["class_names"] = [str(c) for c in meta["class_names"]]
    write_h5_atomic(out, arrays, attrs, kind="predictions")
    return {"out": str(out), "rows": int(arrays["pred"].shape[0]), "task": model.task}


def predict_text_file(model_path: Path, data_path: Path, out: Path, text_field: str | None = None) -> dict[str, Any]:
    """Hash the raw documents of ``data_path`` with the model's stored settings and write class probabilities to ``out``.

    ``out`` holds ``proba`` float64 (n, classes) in the order of meta ``class_names`` and
    ``pred`` int64 indexing it; documents follow the source's order (empty ones included:
    they get the model's prediction for an all-zero row).
    """
    from fleetmpi.text import Hashing, hash_docs, read_texts
    model, params, meta = _sparse_model(model_path)
    if "hashing" not in meta or "class_names" not in meta:
        raise BadInput(f"{model_path}: was not trained on hashed text (no hashing settings in its meta); "
                       f"{data_path} is raw text: predict takes an HDF5 file with dataset X for this model")
    hashing = Hashing.from_json(meta["hashing"], f"{model_path} meta.hashing")
    names = [str(c) for c in meta["class_names"]]
    d = model_d(model)
    if d != hashing.n_features:
        raise CheckpointError(f"{model_path}: model takes {d} features but its hashing settings give "
                              f"{hashing.n_features}; the file is inconsistent")
    if model.task == "regression":
        raise BadInput(f"{model_path}: a regression model; text predictions need a classifier")
    _check_out(out, model_path, data_path)
    field = text_field or str(meta.get("text_field", "text"))
    parts: list[np.ndarray] = []
    empty = replaced = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal empty
        indptr, indices, data = hash_docs(batch, hashing)
        empty += int(np.count_nonzero(np.diff(indptr) == 0))
        # CSR straight into the sparse kernels: densifying costs d values per document (2^18+)
        parts.append(_proba(model, params, CsrBatch(indptr, indices, data, d)))
        batch.clear()

    for doc in read_texts(data_path, field):
        replaced += doc.replaced
        batch.append(doc.text)
        if len(batch) >= TEXT_CHUNK_DOCS:
            flush()
    if batch:
        flush()
    if not parts:
        raise BadInput(f"{data_path}: no documents to predict")
    proba = np.concatenate(parts)
    if proba.shape[1] != len(names):
        raise CheckpointError(f"{model_path}: model gives {proba.shape[1]} classes but meta class_names has "
                              f"{len(names)}; the file is inconsistent")
    if out.suffix.lower() == ".csv":   # class and p_<class> columns, as for tables
        _csv_out(out, model, meta, proba[:, 1] if model.task == "binary" else proba)
    else:
        write_h5_atomic(out, {"proba": proba, "pred": proba.argmax(axis=1).astype(np.int64)},
                        {"model": str(model_path), "data": str(data_path), "class_names": names, "model_meta": meta,
                         "empty_documents": empty, "replaced_utf8": replaced}, kind="predictions")
    return {"out": str(out), "rows": int(proba.shape[0]), "task": model.task, "class_names": names,
            "empty_documents": empty, "replaced_utf8": replaced}


def model_d(model: Model | TreeModel) -> int:
    return int(model.meta()["d"])


MAX_HORIZON = 10_000_000   # forecasts per series; beyond it the output alone is gigabytes


def forecast_file(model_path: Path, data_path: Path, out: Path, horizon: int) -> dict[str, Any]:
    """Write recursive ``horizon``-step forecasts after the end of every series of ``data_path`` to ``out``.

    Each step predicts y_{T+h} from the p values before it, forecasts standing in for values
    not yet seen; ``out`` holds ``forecast`` float64 (horizon, m). Computed in float64 from
    the linear parameters (kind ar, or linear trained on data.windows, whose d is the lags).
    """
    from fleetmpi.engine.h5rows import open_h5
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


def class_names(model: Model | TreeModel, meta: dict[str, Any]) -> list[str]:
    """Return the class names of a classifier: make-data's (a table's record, or text's label names), else the ids."""
    from fleetmpi.preprocess import Record
    if meta.get("class_names"):
        return [str(c) for c in meta["class_names"]]
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


class _GpRows:
    """A gp model as predict_table calls a model: ``predict`` gives the mean and keeps the std."""

    task = "regression"

    def __init__(self, gp: Any) -> None:
        self.gp = gp
        self.std: list[np.ndarray] = []

    def meta(self) -> dict[str, Any]:
        return dict(self.gp.meta())

    def predict(self, X: np.ndarray, params: np.ndarray) -> np.ndarray:
        mean, std = self.gp.predict(np.ascontiguousarray(X, dtype=np.float32))
        self.std.append(std)
        return np.asarray(mean)


def _check_npy_width(data_path: Path, chunk: Any, rec: Any) -> None:
    """Refuse an .npy whose column count is not the model's (its columns have no names to match)."""
    given = [c for c in chunk.cols if c != "label"]
    if rec is not None and rec.columns and len(given) != len(rec.columns):
        raise BadInput(f"{data_path}: has {len(given)} columns but the model takes {len(rec.columns)} "
                       f"({', '.join(rec.columns)[:200]}); an .npy's columns are matched by position")


def predict_table(model_path: Path, data_path: Path, out: Path) -> dict[str, Any]:
    """Predict a CSV, Parquet, NPY or LIBSVM file in chunks through the model's preprocessing; write ``out``."""
    from fleetmpi.preprocess import Record
    from fleetmpi.tabular import format_of, read_chunks
    arrays_in, meta = read_h5_verified(model_path, kind="model")
    if is_text_input(data_path, meta):
        return predict_text_file(model_path, data_path, out)   # a .csv of raw text for a hashed-text model
    gp = _gp_model(model_path, arrays_in, meta) if meta.get("kind") == "gp" else None
    model: Any
    if gp is not None:
        if out.suffix.lower() == ".csv":
            raise BadInput(f"--out {out}: a gp's predictions (mean, std) are written as HDF5; give a .h5 file")
        model, params = _GpRows(gp), np.empty(0)
    else:
        model, params, meta = _flat_model(model_path, arrays_in, meta)
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
            if fmt == "npy":   # columns by position: one more or fewer is another layout
                _check_npy_width(data_path, chunk, rec)
            X = rec.features_of(chunk, str(data_path), predicting=True)
            if X.shape[1] != d:
                raise BadInput(f"{data_path}: gives {X.shape[1]} features but the model takes {d} "
                               f"({', '.join(rec.features or rec.columns)[:200]})")
            raw = model.predict(X, params)
            if rec.label is not None and rec.label in chunk.cols:
                y = rec.labels_of(chunk, str(data_path), missing_ok=True)
                known = ~np.isnan(y)   # rows without a label are predicted, not scored
                scores.add(raw[known], y[known])
            if sink is not None:
                sink.add(raw)
            else:
                parts.append(raw)
            rows += X.shape[0]
        if rows == 0:
            raise BadInput(f"{data_path}: no rows to predict")
        if sink is None:
            raw = np.concatenate(parts)
            arrays = {"mean": raw, "std": np.concatenate(model.std), "pred": raw} if gp is not None else {
                "pred": raw} if model.task == "regression" else {
                "proba": raw, "pred": (raw >= 0.5 if model.task == "binary" else raw.argmax(axis=1)).astype(np.int64)}
            write_h5_atomic(out, arrays, {"model": str(model_path), "data": str(data_path), "model_meta": meta,
                                          "classes": classes}, kind="predictions")
        ok = True
    finally:
        if sink is not None:
            sink.close(ok)
    return {"out": str(out), "rows": rows, "task": model.task, **({"classes": classes} if classes else {}),
            **scores.report()}


def _csv_out(out: Path, model: Model | TreeModel, meta: dict[str, Any], raw: np.ndarray) -> dict[str, Any]:
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
