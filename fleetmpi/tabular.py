"""Read a user's table (CSV, Parquet, NumPy, LIBSVM) in chunks of bounded memory.

Every reader yields ``Chunk``s: the data row number of the chunk's first row (0-based, the
header not counted) and one array per column, float64 where the column parsed as numbers
(NaN marks a missing value) and ``object`` (str, None where missing) where it did not or
where the caller asked to keep it as text. Nothing here decides what a column means: that
is fleetmpi.preprocess's job.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetmpi.errors import BadInput

FORMATS = ("csv", "parquet", "npy", "libsvm")
# Strings a CSV cell may hold for "no value"; NaN written as text counts as missing too.
MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?")
# Cells per chunk, whatever the width, so memory stays bounded: a CSV cell is a Python str
# (~60 B) before it becomes a float64, so 2**20 cells hold ~100 MB (2**23 measured 1.6 GB).
CHUNK_CELLS = 1 << 20
# A LIBSVM file densifies to n x d float32; refuse a width whose single row is absurd.
MAX_LIBSVM_FEATURES = 1 << 20


@dataclass(frozen=True)
class Chunk:
    start: int                       # data row number of the first row (0-based)
    cols: dict[str, np.ndarray]      # column name -> float64 (NaN missing) or object (str / None)
    index: np.ndarray | None = None  # each row's data row number (0-based) where rows were taken out

    @property
    def rows(self) -> int:
        return len(next(iter(self.cols.values()))) if self.cols else 0

    def row(self, i: int) -> int:
        """Return the data row number (1-based, as messages give it) of the chunk's row ``i``."""
        return int(self.index[i]) + 1 if self.index is not None else self.start + i + 1

    def take(self, mask: np.ndarray) -> Chunk:
        """Return the rows where ``mask`` is True, keeping their data row numbers."""
        index = self.index if self.index is not None else np.arange(self.start, self.start + self.rows)
        return Chunk(self.start, {c: v[mask] for c, v in self.cols.items()}, index[mask])


def format_of(path: Path, given: str | None = None) -> str:
    """Return the table format named by ``given`` or by the file's suffix; BadInput when neither says."""
    if given:
        return given
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"csv": "csv", "txt": "csv", "parquet": "parquet", "pq": "parquet", "npy": "npy",
           "svm": "libsvm", "libsvm": "libsvm"}.get(suffix)
    if fmt is None:
        raise BadInput(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                       "use .csv, .parquet, .npy or .libsvm/.svm")
    return fmt


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BadInput(f"{path}: file not found")
    if not path.is_file():
        raise BadInput(f"{path}: not a regular file (a folder, FIFO or device); give a data file")


def chunk_rows(width: int) -> int:
    """Return the rows per chunk for ``width`` columns (at least 1)."""
    return max(1, CHUNK_CELLS // max(width, 1))


def to_numbers(values: list[str] | np.ndarray) -> np.ndarray | None:
    """Return text cells as float64 with NaN for missing ones, or None when a cell is not a number."""
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        pass
    arr = np.asarray(values, dtype=object)
    arr[np.isin(arr, MISSING)] = "nan"
    try:
        return arr.astype(np.float64)
    except (ValueError, TypeError):
        return None


def _as_text(values: list[str] | list[str | None]) -> np.ndarray:
    arr = np.asarray(values, dtype=object)
    arr[np.isin(arr, MISSING)] = None
    return arr


def read_chunks(path: Path, fmt: str, text: frozenset[str] = frozenset(), labels: Path | None = None,
                libsvm_d: int | None = None, progress: object = None) -> Iterator[Chunk]:
    """Yield ``path``'s rows in chunks; columns named in ``text`` stay strings.

    ``labels`` is the .npy of labels beside an .npy of features (column "label");
    ``libsvm_d`` the feature count a LIBSVM file densifies to (from ``libsvm_scan``);
    ``progress`` a tqdm bar advanced by bytes read, or None.
    """
    _check_file(path)
    if fmt == "csv":
        yield from _csv(path, text, progress)
    elif fmt == "parquet":
        yield from _parquet(path, text, progress)
    elif fmt == "npy":
        yield from _npy(path, labels, progress)
    elif fmt == "libsvm":
        yield from _libsvm(path, libsvm_d if libsvm_d is not None else libsvm_scan(path), progress)
    else:
        raise BadInput(f"--from {fmt}: not a table format; valid: {', '.join(FORMATS)}")


def csv_header(path: Path) -> list[str]:
    """Return the CSV file's column names; BadInput on an empty file or duplicate names."""
    _check_file(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        try:
            header = next(csv.reader(fh))
        except StopIteration:
            raise BadInput(f"{path}: the file is empty; expected a header line of column names") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise BadInput(f"{path}: not readable as UTF-8 CSV ({e})") from None
    names = [h.strip() for h in header]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None or "" in names:
        raise BadInput(f"{path}: header has {'a duplicate column ' + repr(dup) if dup is not None else 'an empty column name'}; "
                       "every column needs a distinct name")
    return names


def _csv(path: Path, text: frozenset[str], progress: object) -> Iterator[Chunk]:
    names = csv_header(path)
    step = chunk_rows(len(names))
    raw = open(path, "rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
        # strict: a quote left open (or text after a closing quote) is an error, where the
        # lenient reader would read the rest of the file into one cell.
        reader = csv.reader(fh, strict=True)
        next(reader)
        start, seen = 0, 0
        while True:
            rows: list[list[str]] = []
            try:
                for r in itertools.islice(reader, step):
                    if r:   # blank lines carry no row
                        rows.append(r)
            except (csv.Error, UnicodeDecodeError) as e:
                raise BadInput(f"{path}: data row {start + len(rows) + 1} (line {reader.line_num}) is not readable "
                               f"as CSV ({e}); a quoted field must end with a quote followed by a comma or the "
                               "end of the line") from None
            if not rows:
                break
            bad = next((i for i, r in enumerate(rows) if len(r) != len(names)), None)
            if bad is not None:
                raise BadInput(f"{path}: data row {start + bad + 1} has {len(rows[bad])} fields but the header has "
                               f"{len(names)}; every row needs one field per column")
            cols: dict[str, np.ndarray] = {}
            for name, values in zip(names, zip(*rows), strict=True):
                num = None if name in text else to_numbers(list(values))
                cols[name] = num if num is not None else _as_text(list(values))
            if rows:
                yield Chunk(start, cols)
            start += len(rows)
            if progress is not None:
                pos = raw.tell()
                progress.update(pos - seen)  # type: ignore[attr-defined]
                seen = pos


def _parquet(path: Path, text: frozenset[str], progress: object) -> Iterator[Chunk]:
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pat
    except ImportError:
        raise BadInput(f"{path}: reading Parquet needs pyarrow (pip install 'fleetmpi[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise BadInput(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = list(pf.schema_arrow.names)
    start = 0
    for batch in pf.iter_batches(batch_size=chunk_rows(len(names))):
        cols: dict[str, np.ndarray] = {}
        for name, col in zip(names, batch.columns, strict=True):
            numeric = pat.is_integer(col.type) or pat.is_floating(col.type) or pat.is_boolean(col.type)
            if numeric and name not in text:
                cols[name] = col.cast("float64").to_numpy(zero_copy_only=False)
            else:
                vals = [None if v is None else _level(v) for v in col.to_pylist()]
                # Numbers stored as strings read as numbers, as the same cells of a CSV do.
                num = None if name in text else to_numbers(["nan" if v is None else v for v in vals])
                cols[name] = num if num is not None else _as_text(vals)
        yield Chunk(start, cols)
        start += batch.num_rows
        if progress is not None:
            progress.update(batch.nbytes)  # type: ignore[attr-defined]


def _level(v: object) -> str:
    """Return a cell as the text a CSV would hold (3.0 -> '3', True -> 'True')."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _load_npy(path: Path, what: str) -> np.ndarray:
    _check_file(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BadInput(f"{path}: not a NumPy .npy file without pickled objects ({e}); {what}") from None
    if not isinstance(arr, np.ndarray):
        raise BadInput(f"{path}: holds several arrays (.npz); give one .npy, {what}")
    return arr


def _npy(path: Path, labels: Path | None, progress: object) -> Iterator[Chunk]:
    X = _load_npy(path, "expected a 2-D numeric array (rows x features)")
    if X.ndim != 2 or X.dtype.kind not in "biuf" or X.shape[1] == 0:
        raise BadInput(f"{path}: array has shape {X.shape} and dtype {X.dtype}; expected 2-D numbers (rows x features)")
    y = None
    if labels is not None:
        y = _load_npy(labels, "expected a 1-D array of labels")
        if y.ndim != 1 or y.shape[0] != X.shape[0] or y.dtype.kind not in "biufUS":
            raise BadInput(f"--labels {labels}: shape {y.shape}, dtype {y.dtype}; expected {X.shape[0]} labels "
                           "(1-D numbers or strings), one per row of " + str(path))
    names = [f"x{j}" for j in range(X.shape[1])]
    step = chunk_rows(X.shape[1])
    for start in range(0, X.shape[0], step):
        block = np.asarray(X[start:start + step], dtype=np.float64)
        cols = {name: block[:, j] for j, name in enumerate(names)}
        if y is not None:
            part = np.asarray(y[start:start + step])
            cols["label"] = part.astype(np.float64) if part.dtype.kind in "biuf" else part.astype(str).astype(object)
        yield Chunk(start, cols)
        if progress is not None:
            progress.update(block.shape[0] * X.shape[1] * X.dtype.itemsize)  # type: ignore[attr-defined]


def libsvm_scan(path: Path) -> int:
    """Return the feature count a LIBSVM file densifies to (its highest index + 1)."""
    _check_file(path)
    hi = -1
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            toks = line.split(b"#", 1)[0].split()
            if toks:
                _check_label_field(path, line_no, toks[0])
            for tok in toks[1:]:
                idx, sep, _ = tok.partition(b":")
                if idx == b"qid":
                    continue
                try:
                    j = int(idx)
                except ValueError:
                    j = -1
                if not sep or j < 0:
                    raise BadInput(f"{path}: line {line_no}: {tok.decode(errors='replace')!r} is not index:value; "
                                   "LIBSVM rows are 'LABEL INDEX:VALUE ...'")
                hi = max(hi, j)
    if hi >= MAX_LIBSVM_FEATURES:
        raise BadInput(f"{path}: feature index {hi} would densify to {hi + 1} columns; at most "
                       f"{MAX_LIBSVM_FEATURES} are supported (sparse input has not landed)")
    if hi < 0:
        raise BadInput(f"{path}: no rows with features; LIBSVM rows are 'LABEL INDEX:VALUE ...'")
    return hi + 1


def _check_label_field(path: Path, line_no: int, tok: bytes) -> None:
    """Refuse a row whose first field is INDEX:VALUE: a row without its label."""
    if b":" in tok:
        raise BadInput(f"{path}: line {line_no} starts with {tok.decode(errors='replace')!r}, not a label; LIBSVM "
                       "rows are 'LABEL INDEX:VALUE ...' (give any label, such as 0, where it is unknown)")


def _libsvm(path: Path, d: int, progress: object) -> Iterator[Chunk]:
    """Read a LIBSVM file densified to d columns f0..f{d-1}; an index outside them is refused."""
    names = [f"f{j}" for j in range(d)]
    step = chunk_rows(d)
    with open(path, "rb") as fh:
        start, line_no = 0, 0
        while True:
            lines = list(itertools.islice(fh, step))
            if not lines:
                break
            X = np.zeros((len(lines), d))
            y: list[str] = []
            r = 0
            for line in lines:
                line_no += 1
                toks = line.split(b"#", 1)[0].split()
                if not toks:
                    continue
                _check_label_field(path, line_no, toks[0])
                y.append(toks[0].decode(errors="replace"))
                for tok in toks[1:]:
                    idx, _, val = tok.partition(b":")
                    if idx == b"qid":
                        continue
                    try:
                        j, v = int(idx), float(val)
                    except ValueError:
                        raise BadInput(f"{path}: line {line_no}: {tok.decode(errors='replace')!r} is not "
                                       "index:value with a number value") from None
                    if not 0 <= j < d:
                        raise BadInput(f"{path}: line {line_no}: feature index {j} is outside the {d} features "
                                       f"f0..f{d - 1} (of the training data); indices must be 0..{d - 1}")
                    X[r, j] = v
                r += 1
            if r:
                cols = {name: X[:r, j] for j, name in enumerate(names)}
                num = to_numbers(y)
                cols["label"] = num if num is not None else np.asarray(y, dtype=object)
                yield Chunk(start, cols)
            start += r
            if progress is not None:
                progress.update(sum(len(b) for b in lines))  # type: ignore[attr-defined]
