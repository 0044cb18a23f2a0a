"""Convert a user's table to fleetmpi HDF5 (train.h5, valid.h5) in two streaming passes.

Pass 1 reads the training rows once for the schema, the label set, categorical levels,
and mean and std; pass 2 reads everything again and writes X (float32) and y into
preallocated contiguous datasets of temp files in ``out``, which are fsynced and renamed
only when both are complete. Memory is bounded by one chunk (tabular.CHUNK_CELLS).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fleetmpi.errors import BadInput
from fleetmpi.preprocess import ATTR, Record, Scan
from fleetmpi.tabular import Chunk, format_of, libsvm_scan, read_chunks


@dataclass(frozen=True)
class Source:
    """Where the rows come from and how they are split; ``valid_fraction`` applies when ``valid`` is None."""

    path: Path
    fmt: str
    label: str | None = None
    labels: Path | None = None            # .npy labels beside an .npy of features
    valid: Path | None = None
    valid_labels: Path | None = None
    valid_fraction: float = 0.0
    seed: int = 0


def _progress(path: Path, desc: str) -> Any:
    """Return a tqdm bar over ``path``'s bytes on a terminal, else None."""
    if not sys.stderr.isatty() or os.environ.get("FLEETMPI_PROGRESS") == "none":
        return None
    from tqdm import tqdm
    return tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


class Reader:
    """Read a source's rows (both passes alike) and split them into (train, valid) chunks."""

    def __init__(self, src: Source, text: frozenset[str]) -> None:
        self.src, self.text = src, text
        self.d_svm = libsvm_scan(src.path) if src.fmt == "libsvm" else None
        vfmt = format_of(src.valid, None if src.valid.suffix else src.fmt) if src.valid else None
        if src.valid is not None and vfmt != src.fmt:
            raise BadInput(f"--valid {src.valid}: is {vfmt} but the training file is {src.fmt}; give the same format")
        if src.valid is not None and self.d_svm is not None:
            self.d_svm = max(self.d_svm, libsvm_scan(src.valid))

    def _chunks(self, path: Path, labels: Path | None, desc: str) -> Iterator[Chunk]:
        bar = _progress(path, desc)
        try:
            yield from read_chunks(path, self.src.fmt, self.text, labels, self.d_svm, bar)
        finally:
            if bar is not None:
                bar.close()

    def train(self, desc: str) -> Iterator[tuple[Chunk, Chunk | None]]:
        """Yield (training rows, validation rows or None) of the main file, split by the seeded fraction."""
        rng = np.random.default_rng([self.src.seed, 12])
        for chunk in self._chunks(self.src.path, self.src.labels, desc):
            if self.src.valid is not None or self.src.valid_fraction <= 0:
                yield chunk, None
                continue
            # One draw per row in file order: the split does not depend on the chunk size.
            is_valid = rng.random(chunk.rows) < self.src.valid_fraction
            yield chunk.take(~is_valid), chunk.take(is_valid)

    def valid(self, desc: str) -> Iterator[Chunk]:
        """Yield the rows of the separate --valid file (none when there is none)."""
        if self.src.valid is not None:
            yield from self._chunks(self.src.valid, self.src.valid_labels, desc)


def _scan(reader: Reader, src: Source, categorical: set[str]) -> tuple[Scan, int]:
    """Pass 1: return the training statistics and the validation row count."""
    where = str(src.path)
    scan = Scan(src.label, categorical)
    n_valid = 0
    for train, valid in reader.train("scan"):
        if train.rows:
            scan.add(train, where)
        elif scan.columns is None:
            scan.columns = list(train.cols)
        if valid is not None and valid.rows:
            n_valid += valid.rows
            # One dataset split at random: its classes are those of every row, so a rare class that
            # fell only into the validation part still gets a class id.
            if src.label is not None and src.label in valid.cols:
                scan._add_label(valid.cols[src.label])
    if src.label is not None and scan.columns is not None and src.label not in scan.columns:
        raise BadInput(f"--label {src.label}: no such column in {where}; columns: {', '.join(scan.columns)}")
    for chunk in reader.valid("count"):
        n_valid += chunk.rows
    return scan, n_valid


def _check_room(out: Path, n: int, d: int) -> None:
    need = n * (d + 1) * 4 + (1 << 20)
    free = shutil.disk_usage(out).free
    if need > free:
        raise BadInput(f"--out {out}: the converted data needs about {need / 2**30:.3g} GiB but {out} has "
                       f"{free / 2**30:.3g} GiB free; choose another --out")


def _open_out(stack: ExitStack, path: Path, n: int, rec: Record, attrs: dict[str, Any]) -> tuple[h5py.File, Path]:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        f = stack.enter_context(h5py.File(tmp, "w"))
    except OSError as e:
        raise BadInput(f"--out {path.parent}: cannot write there ({e.strerror or e}); choose a writable folder") from None
    f.create_dataset("X", shape=(n, len(rec.features)), dtype=np.float32)   # contiguous: read by memory map
    f.create_dataset("y", shape=(n,), dtype=np.float32)
    for k, v in {**attrs, ATTR: rec.to_json()}.items():
        f.attrs[k] = v
    if rec.classes is not None:
        f.attrs["classes"] = len(rec.classes)
    return f, tmp


def convert(src: Source, out: Path, task: str = "auto", standardize: bool = False,
            categorical: tuple[str, ...] = (), fill: bool = False) -> dict[str, int]:
    """Write ``out/train.h5`` (and ``out/valid.h5`` when there are validation rows); return {path: rows}.

    Without validation rows an ``out/valid.h5`` of an earlier conversion is removed, so that
    the folder never holds a pair from two conversions.
    """
    if not 0.0 <= src.valid_fraction < 1.0:
        raise BadInput(f"--valid-fraction {src.valid_fraction}: expected a number in [0, 1)")
    if src.fmt in ("csv", "parquet") and src.label is None:
        raise BadInput(f"--from {src.fmt}: name the label column with --label COLUMN")
    if src.fmt == "npy" and src.labels is None:
        raise BadInput("--from npy: give the labels with --labels FILE.npy (one per row)")
    if src.fmt in ("npy", "libsvm") and categorical:
        raise BadInput(f"--categorical: only for csv and parquet columns; --from {src.fmt} has numbers only")
    text = frozenset(categorical)
    reader = Reader(src, text)
    scan, n_valid = _scan(reader, src, set(categorical))
    if src.valid is not None and n_valid == 0:
        raise BadInput(f"--valid {src.valid}: no data rows (a header only?); give validation rows or leave --valid out")
    rec = scan.record(task, standardize, fill, str(src.path), f"{src.fmt}:{src.path.name}")
    n_train = scan.rows
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out {out}: cannot create the folder ({e.strerror or e}); choose a writable folder") from None
    _check_room(out, n_train + n_valid, len(rec.features))
    attrs: dict[str, Any] = {"provenance": f"fleetmpi make-data --from {src.fmt} {src.path}", "seed": src.seed}
    paths = {"train.h5": n_train, **({"valid.h5": n_valid} if n_valid else {})}
    tmps: list[Path] = []
    try:
        with ExitStack() as stack:
            files = {}
            for name, n in paths.items():
                f, tmp = _open_out(stack, out / name, n, rec, attrs)
                tmps.append(tmp)
                files[name] = f
            _write_all(reader, rec, files, src)
            for f in files.values():
                f.flush()
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        for name, tmp in zip(paths, tmps, strict=True):
            os.replace(tmp, out / name)
        if "valid.h5" not in paths:   # an earlier conversion's: it would pass for this data's validation part
            (out / "valid.h5").unlink(missing_ok=True)
        from fleetmpi.jobdir import fsync_dir
        fsync_dir(out)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return {str(out / name): n for name, n in paths.items()}


def _write_all(reader: Reader, rec: Record, files: dict[str, h5py.File], src: Source) -> None:
    """Pass 2: transform every chunk and write it at its place in train.h5 / valid.h5."""
    at = dict.fromkeys(files, 0)

    def put(name: str, chunk: Chunk, where: str) -> None:
        if not chunk.rows:
            return
        X, y = rec.features_of(chunk, where), rec.labels_of(chunk, where)
        f, i = files[name], at[name]
        f["X"][i:i + len(y)] = X
        f["y"][i:i + len(y)] = y
        at[name] = i + len(y)

    for train, valid in reader.train("write"):
        put("train.h5", train, str(src.path))
        if valid is not None:
            put("valid.h5", valid, f"{src.path} (validation part)")
    for chunk in reader.valid("write valid"):
        if rec.label is not None and rec.label not in chunk.cols:
            raise BadInput(f"--valid {src.valid}: no label column {rec.label!r}; columns: {', '.join(chunk.cols)}")
        put("valid.h5", chunk, str(src.valid))
    for name, f in files.items():
        if at[name] != f["y"].shape[0]:   # pass 2 saw other rows than pass 1
            raise BadInput(f"{src.path}: changed while it was converted ({name} got {at[name]} rows, expected "
                           f"{f['y'].shape[0]}); convert a file nothing writes to")
