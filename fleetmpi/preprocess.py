"""The preprocessing record: how a user's table becomes X (float32) and y, and back at predict time.

make-data builds it from one pass over the training rows (``Scan``), stores it as the JSON
root attribute ``preprocess`` of train.h5 and valid.h5, the trainer copies it into model.h5's
meta, and predict applies it (``Record.features`` / ``Record.labels``) to new tables.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetmpi.errors import BadInput
from fleetmpi.spec import MAX_CLASSES
from fleetmpi.tabular import Chunk

FORMAT = "fleetmpi-preprocess/1"
ATTR = "preprocess"
# --task auto: whole-number labels with at most this many distinct values are classes.
AUTO_MAX_CLASSES = 32
# --categorical: a column with more levels than this is refused (one-hot would be too wide).
MAX_LEVELS = 1000


def first_non_number(cells: np.ndarray) -> int | None:
    """Return the index of the first cell of a text column that is not a number; None where all are.

    A column of a chunk holds text where any of its cells is not a number; the part of it
    that a validation split leaves may then hold numbers only (``as_numbers`` reads them).
    """
    for i, t in enumerate(cells):
        if t is None:
            continue
        try:
            float(t)
        except (TypeError, ValueError):
            return i
    return None


def as_numbers(cells: np.ndarray) -> np.ndarray | None:
    """Return a text column's cells as float64 (NaN where missing), or None if one is not a number."""
    if first_non_number(cells) is not None:
        return None
    return np.asarray([np.nan if t is None else float(t) for t in cells], dtype=np.float64)


@dataclass
class Record:
    """Everything predict needs to turn a table into the model's X and to name its classes."""

    columns: list[str]                        # input feature columns, in the order used
    features: list[str]                       # output columns of X (one-hot expanded)
    label: str | None                         # label column name (None: no labels)
    task: str                                 # regression | binary | multiclass
    classes: list[str] | None = None          # class names by class id
    label_values: list[float] | None = None   # numeric labels by class id (None: string labels)
    categorical: dict[str, list[str]] = field(default_factory=dict)   # column -> levels (one-hot order)
    fill: dict[str, float] = field(default_factory=dict)              # column -> value for missing cells
    mean: list[float] | None = None           # standardisation per X column (None: off)
    std: list[float] | None = None
    source: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | str | None) -> Record | None:
        """Return the record stored in a file's meta (dict or JSON text), or None where there is none."""
        if meta is None:
            return None
        raw = json.loads(meta) if isinstance(meta, str) else dict(meta)
        if raw.get("format") != FORMAT:
            raise BadInput(f"preprocessing record has format {raw.get('format')!r}; expected {FORMAT!r}")
        return cls(**raw)

    def features_of(self, chunk: Chunk, where: str, predicting: bool = False) -> np.ndarray:
        """Return the chunk's X (float32, rows x len(features)) by column name; BadInput on bad cells.

        ``predicting``: the chunk is new data for a trained model, and a refusal's advice is
        predict's (make-data's options cannot change a trained model's record).
        """
        missing = [c for c in self.columns if c not in chunk.cols]
        if missing:
            raise BadInput(f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                           f"the model was trained on columns {', '.join(self.columns)}")
        parts = []
        for c in self.columns:
            v = chunk.cols[c]
            if c in self.categorical:
                levels = self.categorical[c]
                text = v if v.dtype == object else np.asarray([None if np.isnan(x) else _num_text(x) for x in v],
                                                             dtype=object)
                if c not in self.fill:
                    _refuse_missing(where, chunk, c, np.asarray([t is None for t in text]), _fill_hint(predicting))
                onehot = np.zeros((len(text), len(levels)))
                index = {lv: i for i, lv in enumerate(levels)}
                for r, t in enumerate(text):
                    i = index.get(t)   # an unseen level (or a filled missing cell) is all zeros
                    if i is not None:
                        onehot[r, i] = 1.0
                parts.append(onehot)
                continue
            if v.dtype == object:
                nums = as_numbers(v)
                v = v if nums is None else nums
            if v.dtype == object:
                bad = first_non_number(v)
                bad = 0 if bad is None else bad
                raise BadInput(f"{where}: column {c!r} is not numeric (data row {chunk.row(bad)} holds "
                               f"{str(v[bad])[:40]!r}); " + ("the model was trained on numbers there" if predicting
                                                              else f"give numbers, or one-hot encode it with --categorical {c}"))
            nan = np.isnan(v)
            if nan.any():
                if c not in self.fill:
                    _refuse_missing(where, chunk, c, nan, _fill_hint(predicting))
                v = np.where(nan, self.fill[c], v)
            inf = np.isinf(v)
            if inf.any():
                r = int(np.flatnonzero(inf)[0])
                raise BadInput(f"{where}: column {c!r} holds inf at data row {chunk.row(r)}; features must be finite")
            parts.append(v[:, None])
        X = np.hstack(parts) if parts else np.zeros((chunk.rows, 0))
        if self.mean is not None and self.std is not None:
            X = (X - np.asarray(self.mean)) / np.asarray(self.std)
        return X.astype(np.float32)

    def labels_of(self, chunk: Chunk, where: str, missing_ok: bool = False) -> np.ndarray:
        """Return the chunk's labels as float32 (class ids, or values for regression); BadInput on unknown classes.

        A missing label is refused, or NaN with ``missing_ok`` (predict scores the labelled rows).
        """
        assert self.label is not None, "labels_of needs a label column"   # caller checked: programming error
        v = chunk.cols[self.label]
        if self.task == "regression":
            if v.dtype == object:
                bad = next(i for i, t in enumerate(v) if t is not None and _float(t) is None)
                raise BadInput(f"{where}: label {self.label!r} at data row {chunk.row(bad)} is "
                               f"{str(v[bad])[:40]!r}; a regression needs numbers")
            _refuse_missing(where, chunk, self.label, np.isinf(v) if missing_ok else ~np.isfinite(v), _LABEL_HINT)
            return v.astype(np.float32)
        keys = _label_keys(v)
        if self.label_values is None:   # text classes: a chunk that parsed as numbers names them as text
            keys = [k if k is None or isinstance(k, str) else _num_text(k) for k in keys]
        else:                           # number classes: a text cell may still spell a number
            keys = [_float(k) if isinstance(k, str) else k for k in keys]
        if not missing_ok:
            _refuse_missing(where, chunk, self.label, np.asarray([k is None for k in keys]), _LABEL_HINT)
        index = {k: i for i, k in enumerate(self.label_values if self.label_values is not None else self.classes or [])}
        out = np.empty(len(keys), np.float32)
        for r, k in enumerate(keys):
            if k is None:   # missing_ok
                out[r] = np.nan
                continue
            i = index.get(k)
            if i is None:
                raise BadInput(f"{where}: label {self.label!r} at data row {chunk.row(r)} is {k!r}, a class the "
                               f"training data does not have; known classes: {', '.join(self.classes or [])[:200]}")
            out[r] = i
        return out


def _num_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _float(t: object) -> float | None:
    try:
        return float(str(t))
    except ValueError:
        return None


def _label_keys(v: np.ndarray) -> list[Any]:
    """Return labels as class keys: floats where every label is a number, else strings; None where missing."""
    if v.dtype != object:
        return [None if np.isnan(x) else float(x) for x in v]
    return [None if t is None else str(t) for t in v]


_LABEL_HINT = "labels are never filled: give a finite label or drop the row"


def _fill_hint(predicting: bool) -> str:
    """Return the advice for a missing feature cell, at make-data or at predict."""
    if predicting:
        return "the model has no fill value for this column (make-data --fill mean gives it one): fill or drop the row"
    return "fill or drop the row, or pass --fill mean"


def _refuse_missing(where: str, chunk: Chunk, col: str, mask: np.ndarray, hint: str) -> None:
    if mask.any():
        r = int(np.flatnonzero(mask)[0])
        value = "inf" if chunk.cols[col].dtype != object and np.isinf(chunk.cols[col][r]) else "missing value"
        raise BadInput(f"{where}: {value} at data row {chunk.row(r)}, column {col!r}; {hint}")


class Scan:
    """Pass 1 over the training rows: column kinds, categorical levels, label set, mean and std."""

    def __init__(self, label: str | None, categorical: set[str]) -> None:
        self.label, self.categorical = label, categorical
        self.columns: list[str] | None = None
        self.text: set[str] = set()                       # columns seen as non-numbers
        self.first_text: dict[str, tuple[int, str]] = {}  # column -> (data row, cell) of its first non-number
        self.levels: dict[str, set[str]] = {c: set() for c in categorical}
        self.count: dict[str, float] = {}
        self.mean: dict[str, float] = {}
        self.m2: dict[str, float] = {}
        self.label_keys: set[Any] = set()
        self.label_text = False
        self.label_whole = True
        self.label_many = False      # more distinct labels than any classification allows
        self.rows = 0

    def add(self, chunk: Chunk, where: str) -> None:
        """Fold one chunk of training rows into the statistics."""
        if self.columns is None:
            self.columns = list(chunk.cols)
            for c in self.categorical:
                if c not in chunk.cols:
                    raise BadInput(f"--categorical {c}: no such column in {where}; columns: {', '.join(self.columns)}")
        self.rows += chunk.rows
        for c, v in chunk.cols.items():
            if c == self.label:
                self._add_label(v)
            elif c in self.categorical:
                keys = v if v.dtype == object else [None if np.isnan(x) else _num_text(x) for x in v]
                self.levels[c].update(k for k in keys if k is not None)
                if len(self.levels[c]) > MAX_LEVELS:
                    raise BadInput(f"--categorical {c}: column has more than {MAX_LEVELS} distinct values in {where}; "
                                   "one-hot encoding it would be too wide")
            elif v.dtype == object:
                nums = as_numbers(v)   # numbers as text: a split put the chunk's text cells in the other part
                if nums is not None:
                    self._add_stats(c, nums)
                elif c not in self.first_text:
                    i = first_non_number(v)
                    assert i is not None
                    self.first_text[c] = (chunk.row(i), str(v[i])[:40])
                    self.text.add(c)
            else:
                self._add_stats(c, v)

    def _add_stats(self, c: str, v: np.ndarray) -> None:
        ok = v[np.isfinite(v)]
        n_b = float(ok.size)
        if not n_b:
            return
        mean_b, m2_b = float(ok.mean()), float(((ok - ok.mean()) ** 2).sum())
        n_a, mean_a, m2_a = self.count.get(c, 0.0), self.mean.get(c, 0.0), self.m2.get(c, 0.0)
        n = n_a + n_b
        delta = mean_b - mean_a
        # Chan et al.'s pairwise combination: stable over many chunks, unlike sum and sum of squares.
        self.count[c], self.mean[c] = n, mean_a + delta * n_b / n
        self.m2[c] = m2_a + m2_b + delta * delta * n_a * n_b / n

    def _add_label(self, v: np.ndarray) -> None:
        if v.dtype == object:
            self.label_text = True
        elif v.size:
            ok = v[np.isfinite(v)]
            self.label_whole &= bool(np.all(ok == np.round(ok)))
        if self.label_many:
            return
        self.label_keys.update(k for k in _label_keys(v) if k is not None)
        if len(self.label_keys) > MAX_CLASSES:
            self.label_many = True
            self.label_keys = set()

    def record(self, task: str, standardize: bool, fill: bool, where: str, source: str) -> Record:
        """Return the record for ``task`` ('auto' resolved here); BadInput where the data cannot have it."""
        if self.rows == 0 or self.columns is None:
            raise BadInput(f"{where}: no data rows (a header only?); need at least one row")
        columns = [c for c in self.columns if c != self.label]
        bad = [c for c in columns if c in self.text and c not in self.categorical]
        if bad:
            row, cell = self.first_text[bad[0]]
            raise BadInput(f"{where}: column{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} "
                           f"{'are' if len(bad) > 1 else 'is'} not numeric (data row {row} of {bad[0]!r} holds "
                           f"{cell!r}); drop {'them' if len(bad) > 1 else 'it'} or one-hot encode with "
                           f"--categorical {','.join(bad)}")
        if not columns:
            raise BadInput(f"{where}: no feature columns beside the label {self.label!r}")
        task = self._task(task, where)
        classes = label_values = None
        if task != "regression":
            keys = sorted(self.label_keys, key=lambda k: (isinstance(k, str), k))
            if self.label_text:
                keys = sorted({str(k) if not isinstance(k, float) else _num_text(k) for k in keys})
                classes = keys
            else:
                label_values = [float(k) for k in keys]
                classes = [_num_text(k) for k in keys]
            if len(keys) < 2 or (task == "binary" and len(keys) != 2):
                raise BadInput(f"{where}: label {self.label!r} has {len(keys)} distinct value(s) "
                               f"({', '.join(map(str, classes[:5]))}); --task {task} needs "
                               f"{'exactly 2' if task == 'binary' else 'at least 2'}")
        features: list[str] = []
        for c in columns:
            levels = sorted(self.levels[c]) if c in self.categorical else None
            features += [f"{c}={lv}" for lv in levels] if levels is not None else [c]
        fills = {}
        if fill:
            fills = {c: self.mean.get(c, 0.0) for c in columns if c not in self.categorical}
            fills.update({c: 0.0 for c in columns if c in self.categorical})
        mean: list[float] | None = None
        std: list[float] | None = None
        if standardize:
            mean, std = [], []
            for c in columns:
                if c in self.categorical:
                    k = len(self.levels[c])
                    mean += [0.0] * k   # one-hot columns stay 0/1
                    std += [1.0] * k
                else:
                    n = self.count.get(c, 0.0)
                    s = float(np.sqrt(self.m2.get(c, 0.0) / n)) if n else 0.0
                    mean.append(self.mean.get(c, 0.0))
                    std.append(s if s > 0 else 1.0)   # a constant column: centre it, do not divide by 0
        return Record(columns=columns, features=features, label=self.label, task=task, classes=classes,
                      label_values=label_values, categorical={c: sorted(self.levels[c]) for c in self.categorical},
                      fill=fills, mean=mean, std=std, source=source)

    def _task(self, task: str, where: str) -> str:
        if self.label is None:
            raise BadInput(f"{where}: no label column; name it with --label COLUMN (csv/parquet) or --labels FILE.npy")
        if task == "auto":
            if self.label_text or (self.label_whole and not self.label_many and len(self.label_keys) <= AUTO_MAX_CLASSES):
                return "binary" if len(self.label_keys) == 2 else "multiclass"
            return "regression"
        if task == "regression" and self.label_text:
            raise BadInput(f"{where}: label {self.label!r} holds text; --task regression needs numbers "
                           "(use --task multiclass or binary)")
        if task != "regression" and self.label_many:
            raise BadInput(f"{where}: label {self.label!r} has more than {MAX_CLASSES} distinct values; "
                           f"--task {task} needs fewer classes (use --task regression)")
        return task


def read_record(path: Path) -> Record | None:
    """Return the preprocessing record stored in a make-data HDF5 file, or None (rank 0, small read)."""
    import h5py
    with h5py.File(path, "r") as f:
        raw = f.attrs.get(ATTR)
    if raw is None:
        return None
    return Record.from_meta(raw.decode() if isinstance(raw, bytes) else str(raw))


def preprocess_meta(path: Path) -> dict[str, Any]:
    """Return {"preprocess": record} for a model file's meta when ``path`` (the training data) has one, else {}."""
    rec = read_record(path)
    return {"preprocess": json.loads(rec.to_json())} if rec is not None else {}
