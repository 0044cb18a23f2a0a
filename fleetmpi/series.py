"""Series data from CSV: chosen numeric columns written as HDF5 ``series`` float32 (T, m)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import h5py
import numpy as np

from fleetmpi.errors import BadInput, quote


def read_csv_series(path: Path, columns: list[str]) -> np.ndarray:
    """Return float32 (T, len(columns)) from a CSV file with a header row; BadInput naming a bad column or cell."""
    if not columns or any(not c for c in columns):
        raise BadInput(f"--series-columns {quote(','.join(columns))}: expected column names separated by commas, e.g. a,b")
    if len(set(columns)) != len(columns):
        raise BadInput(f"--series-columns {quote(','.join(columns))}: a column is named twice")
    try:
        fh = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"--from csv {path}: file not found") from None
    except OSError as e:
        raise BadInput(f"--from csv {path}: cannot read ({e.__class__.__name__}: {e.strerror})") from None
    with fh:
        try:
            rows = csv.reader(fh)
            header = next(rows, None)
            if header is None:
                raise BadInput(f"{path}: empty CSV; expected a header row naming the columns")
            header = [h.strip() for h in header]
            missing = [c for c in columns if c not in header]
            if missing:
                raise BadInput(f"{path}: no column {quote(missing[0])}; the header has {', '.join(map(quote, header))}")
            idx = [header.index(c) for c in columns]
            out: list[list[float]] = []
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                vals = []
                for c, i in zip(columns, idx):
                    cell = row[i].strip() if i < len(row) else ""
                    try:
                        v = float(cell)
                    except ValueError:
                        raise BadInput(f"{path}: column {quote(c)} holds {quote(cell, 40)} at line {line}, not a number; "
                                       "series columns must be numeric (choose others with --series-columns)") from None
                    if not math.isfinite(v):
                        raise BadInput(f"{path}: column {quote(c)} holds {cell} at line {line}; series must be finite")
                    vals.append(v)
                out.append(vals)
        except UnicodeDecodeError:
            raise BadInput(f"{path}: not UTF-8 text; expected a CSV file") from None
        except csv.Error as e:
            raise BadInput(f"{path}: not a readable CSV file ({e})") from None
    if len(out) < 2:
        raise BadInput(f"{path}: {len(out)} data row(s); a series needs at least 2 points")
    return np.asarray(out, dtype=np.float32)


def write_series(path: Path, series: np.ndarray, columns: list[str], provenance: str) -> None:
    """Write ``series`` (T, m) float32 with its column names to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("series", data=np.ascontiguousarray(series, dtype=np.float32))
            f.attrs["columns"] = ",".join(columns)
            f.attrs["provenance"] = provenance
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_series(csv_path: Path, columns: list[str], out: Path) -> dict[str, int]:
    """Write ``out/series.h5`` from the CSV's columns; return {path: points}."""
    series = read_csv_series(csv_path, columns)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "series.h5"
    write_series(target, series, columns, f"csv {csv_path}: columns {','.join(columns)}")
    return {str(target): int(series.shape[0])}
