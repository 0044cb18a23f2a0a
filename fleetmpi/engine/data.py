"""HDF5 datasets, the global sample order, and each rank's hyperslab reads.

The sample stream is the concatenation of epochs; epoch ``e`` visits the file's row blocks
(``block_rows`` consecutive rows each) in the order ``default_rng([seed, e]).permutation``.
Step ``s`` owns stream positions ``[s*B, (s+1)*B)``; rank ``r`` of ``P`` takes positions
``[s*B + r*B//P, s*B + (r+1)*B//P)``. So the samples of a step depend on the seed, the
file and ``B``, never on ``P``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from h5py import h5s, h5t

from fleetmpi.engine.h5rows import (
    FP_MASK,
    FP_MULT,
    Ranges,
    as_bounds,
    as_int,
    check_extent,
    check_finite,
    check_ranges,
    copy_kernel_y,
    is_csr,
    map_dataset,
    open_h5,
    outside_file,
    ranges_fingerprint,
)
from fleetmpi.errors import BadInput, quote
from fleetmpi.spec import MAX_CLASSES
from kernels import lazy_function, num_threads
from kernels.memory import aligned_empty

if TYPE_CHECKING:
    from fleetmpi.engine.csr_data import CsrReader

# Batches of at least this many rows are copied out of a memory map on all of a rank's numba
# threads (threads_per_rank > 1; kernels.gather); below it the copy is too short for the
# threads' start to pay (the gradient kernels split from the same size).
GATHER_THREADS_MIN_ROWS = 1024

# kernels.gather's, imported at their first call: the CLI's data checks import this module
# and run without numba.
_visit_blocks = lazy_function("kernels.gather", "visit_blocks")
_gather_batch = lazy_function("kernels.gather", "gather_batch")


@dataclass(frozen=True)
class DataInfo:
    path: Path
    n: int
    d: int
    classes: int | None   # label count for classification, None for regression


def describe(path: Path, task: str, classes: int | None = None, check: bool = True,
             kind: str | None = None) -> DataInfo:
    """Check a dataset file's layout for ``task`` and return its shape; BadInput on problems.

    ``task`` is 'regression', 'binary' or 'multiclass'. A file with attribute
    ``format = "csr"`` holds CSR rows (``indptr``, ``indices``, ``data``, ``y``; d is its
    ``n_features``): its structure is always checked (one pass, in blocks of rows), its
    values for NaN/inf with ``check``. Labels are scanned in chunks to
    check that they are valid class ids. With ``check`` (the spec's ``data.check``), X and
    y are also read once, in blocks of bounded memory, and NaN or inf is refused naming the
    first bad row and column. ``kind``: a model kind whose task ``model.task`` sets (tree
    kinds, mlp): a label refusal then says to set it, not to change the kind.
    """
    with open_h5(path) as f:
        if is_csr(f):
            from fleetmpi.engine.csr_data import check_csr, csr_datasets
            indptr, indices, data, y, d = csr_datasets(f, path)
            n = indptr.shape[0] - 1
            if n == 0 or d == 0:
                raise BadInput(f"{path}: CSR data is empty ({n} rows, n_features={d}); need at least one row and column")
            check_csr(path, indptr, indices, data, d, finite=check)
        else:
            X, y = _datasets(f, path)
            n, d = X.shape
            if n == 0 or d == 0:
                raise BadInput(f"{path}: dataset X is empty (shape {X.shape}); need at least one row and one column")
            if check:
                check_finite(path, X, "X")
        if check and task == "regression":
            check_finite(path, y, "y")
        if task == "regression":
            return DataInfo(path, n, d, None)
        lo, hi, integral = np.inf, -np.inf, True
        for start in range(0, n, 1 << 20):
            chunk = np.asarray(y[start:start + (1 << 20)], dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(chunk))
            if bad.size:
                raise BadInput(f"{path}: dataset y holds NaN or inf at row {start + int(bad[0])}; "
                               "labels must be finite class ids")
            lo, hi = min(lo, chunk.min()), max(hi, chunk.max())
            integral &= bool(np.all(chunk == np.round(chunk)))
        if not integral or lo < 0:
            raise BadInput(f"{path}: y must hold class ids 0, 1, ... for a {task} model; found values in [{lo:g}, {hi:g}]"
                           f"{'' if integral else ' that are not whole numbers'}"
                           + (f"; for kind {kind} set model.task: regression to fit real values" if kind else ""))
        if task == "binary":
            if hi > 1 and kind:
                raise BadInput(f"{path}: y holds labels up to {hi:g}, but kind {kind} trains binary (labels 0/1) "
                               "unless told: set model.task: multiclass")
            if hi > 1:
                raise BadInput(f"{path}: logistic needs labels 0/1 in y, found labels up to {hi:g}; "
                               "use kind softmax for more classes")
            return DataInfo(path, n, d, 2)
        attr = f.attrs.get("classes")
        if classes is None and hi >= MAX_CLASSES:
            raise BadInput(f"{path}: y holds label {hi:.0f}, which would make {hi + 1:.0f} classes; labels must be "
                           f"class ids below {MAX_CLASSES}")
        if classes is None and attr is not None and not 2 <= as_int(attr) <= MAX_CLASSES:
            raise BadInput(f"{path}: attribute classes={quote(attr, 60)}; expected a whole number in "
                           f"[2, {MAX_CLASSES}] (or set model.classes)")
        k = classes or (as_int(attr) if attr is not None else int(hi) + 1)
        if hi >= k:
            raise BadInput(f"{path}: y holds label {hi:g} but the model has {k} classes (labels must be 0..{k - 1})")
        return DataInfo(path, n, d, max(k, 2))


def _datasets(f: h5py.File, path: Path) -> tuple[h5py.Dataset, h5py.Dataset]:
    for name in ("X", "y"):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise BadInput(f"{path}: missing dataset {name!r}; a data file holds X (float32, n x d) and y (n)")
    X, y = f["X"], f["y"]
    if X.ndim != 2:
        raise BadInput(f"{path}: X must be 2-D (n x d), got shape {X.shape}")
    if X.dtype != np.float32:
        raise BadInput(f"{path}: X must be float32, got {X.dtype}; write it with X.astype('float32') "
                       "(or `fleetmpi make-data`)")
    if y.shape != (X.shape[0],):
        raise BadInput(f"{path}: y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    if y.dtype.kind not in "fiu":
        raise BadInput(f"{path}: y must be numeric, got {y.dtype}")
    size = os.stat(path).st_size
    check_extent(path, X, "X", size)
    check_extent(path, y, "y", size)
    return X, y


def open_reader(path: Path, direct: bool = True) -> RankReader | CsrReader:
    """Return the reader for a data file: CsrReader for format csr, else RankReader."""
    with open_h5(path) as f:
        csr = is_csr(f)
    if csr:
        from fleetmpi.engine.csr_data import CsrReader
        return CsrReader(path, direct)
    return RankReader(path, direct)


class SampleOrder:
    """Map global stream positions to file row ranges (see the module docstring)."""

    def __init__(self, n: int, batch: int, seed: int, block_rows: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self.block_rows = min(block_rows, n)
        self.nblocks = -(-n // self.block_rows)
        self._epoch = -1
        self._starts = np.empty(0, np.int64)
        self._cum = np.empty(0, np.int64)

    def _load_epoch(self, e: int) -> None:
        if e == self._epoch:
            return
        perm = np.random.default_rng([self.seed, e]).permutation(self.nblocks)
        starts = perm.astype(np.int64) * self.block_rows
        lens = np.minimum(starts + self.block_rows, self.n) - starts
        self._starts = starts
        self._cum = np.concatenate(([0], np.cumsum(lens)))
        self._epoch = e

    def bounds(self, start: int, stop: int) -> np.ndarray:
        """Return the file row ranges that stream positions [start, stop) visit, in order, as an
        int64 array of (lo, hi) rows (what ``RankReader.read`` takes without converting).

        Adjacent blocks are coalesced into one range (one copy, one hyperslab).
        """
        parts: list[np.ndarray] = []
        pos = start
        while pos < stop:
            e, off = divmod(pos, self.n)
            self._load_epoch(e)
            end = min(self.n, off + stop - pos)            # this epoch's part: offsets [off, end)
            part = _visit_blocks(self._starts, self._cum, off, end)
            if parts and parts[-1][-1, 1] == part[0, 0]:   # continues across the epoch boundary
                parts[-1][-1, 1] = part[0, 1]
                part = part[1:]
            parts.append(part)
            pos += end - off
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty((0, 2), np.int64)

    def ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Return ``bounds(start, stop)`` as a list of (lo, hi) tuples."""
        return list(map(tuple, self.bounds(start, stop).tolist()))

    def share(self, step: int, rank: int, size: int) -> tuple[int, int]:
        """Return the stream positions [start, stop) of ``rank``'s share of global batch ``step``."""
        base = step * self.batch
        return base + rank * self.batch // size, base + (rank + 1) * self.batch // size


class RankReader:
    """Read one rank's rows of a dataset file into reused buffers.

    Contiguous unfiltered datasets (what ``fleetmpi make-data`` and h5py write by default)
    are read through a memory map of their bytes; any other layout by HDF5 hyperslab.
    Both give the same rows in the same order. ``direct=False`` forces HDF5.
    """

    def __init__(self, path: Path, direct: bool = True) -> None:
        self.path = path
        self._f = open_h5(path)
        self.X, self.y = _datasets(self._f, path)
        self.n, self.d = self.X.shape
        self._xbuf = aligned_empty((0, self.d), np.float32)
        self._ybuf = np.empty(0, np.float32)
        self._map: tuple[np.ndarray, np.ndarray] | None = None
        if direct:
            mx, my = map_dataset(path, self._f, self.X), map_dataset(path, self._f, self.y)
            if mx is not None and my is not None and copy_kernel_y(my.dtype):
                self._map = (mx, my)

    @property
    def direct(self) -> bool:
        """Whether rows are read through a memory map of the file (else through HDF5)."""
        return self._map is not None

    def read(self, ranges: Ranges, *, threads: bool | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """Return (X rows, y rows, fingerprint) of the row ranges; views into reused buffers.

        ``ranges``: (lo, hi) pairs, a list or an int64 (k, 2) array (``SampleOrder.bounds``).
        Through the memory map, one copy kernel (``kernels.gather``) on all of the rank's
        numba threads from GATHER_THREADS_MIN_ROWS rows (``threads`` True / False forces
        it; the bits are the same either way), below that one kernel call for the whole
        read (``gather_batch``); else ONE HDF5 read of a union of hyperslabs (one call per
        block costs ~40 us each, 10x the data movement at typical batch sizes). Rows come
        back in file order (``kernels.gather.file_order``): deterministic, and a gradient
        sum does not depend on order.
        """
        bounds = as_bounds(ranges)
        if self._map is not None and not threads and (
                threads is False or num_threads() == 1
                or int((bounds[:, 1] - bounds[:, 0]).sum()) < GATHER_THREADS_MIN_ROWS):
            return self._read_one_call(self._map, bounds)
        # Imported here: it imports numba, which stays off the CLI's data checks (as kernels.lazy_function).
        from kernels import gather
        lo, hi, cuts = gather.file_order(bounds)
        total = check_ranges(self.path, self.n, lo, hi)
        self._buffers(total)
        X, y = self._xbuf[:total], self._ybuf[:total]
        if self._map is not None:   # threads asked for, or a big batch on a rank with threads
            gather.gather_rows_threads(self._map[0], self._map[1], lo, hi, X, y, num_threads())
        else:
            pairs, off = list(zip(lo.tolist(), hi.tolist())), 0
            for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
                layer = pairs[a:b]
                m = sum(b1 - a1 for a1, b1 in layer)
                self._read_union(self.X, layer, X[off:off + m], (self.d,))
                self._read_union(self.y, layer, y[off:off + m], ())
                off += m
        return X, y, float(ranges_fingerprint(lo, hi))

    def _buffers(self, rows: int) -> None:
        """Make the reused buffers hold at least ``rows`` rows."""
        if self._xbuf.shape[0] < rows:
            # On a cache line: the kernels' vector loads then touch one line each
            # (kernels.memory: 1.2x on the float32 GLM gradients of an in-cache batch, d = 128).
            self._xbuf = aligned_empty((rows, self.d), np.float32)
            self._ybuf = np.empty(rows, np.float32)

    def _read_one_call(self, mapped: tuple[np.ndarray, np.ndarray], b: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """``read`` through the memory maps ``mapped`` (X, y) on one thread: the ranges b put in
        order, checked, copied and fingerprinted by one kernel call (``kernels.gather.gather_batch``)."""
        mx, my = mapped
        while True:
            status, rows, lo, hi, fp = _gather_batch(mx, my, b, self._xbuf, self._ybuf, FP_MULT, FP_MASK)
            if status == 0:
                return self._xbuf[:rows], self._ybuf[:rows], float(fp)
            if status == 1:
                raise outside_file(self.path, self.n, lo, hi)
            self._buffers(rows)   # the first read, or a bigger batch than any before

    @staticmethod
    def _read_union(dset: h5py.Dataset, ranges: list[tuple[int, int]], out: np.ndarray,
                    tail: tuple[int, ...]) -> None:
        space = dset.id.get_space()
        space.select_none()
        for lo, hi in ranges:
            space.select_hyperslab((lo, *(0 for _ in tail)), (hi - lo, *tail), op=h5s.SELECT_OR)
        mem = h5s.create_simple(out.shape)
        if out.dtype == dset.dtype:
            dset.id.read(mem, space, out)
        else:  # y stored as int or float64: HDF5 converts to float32 while reading
            dset.id.read(mem, space, out, mtype=h5t.py_create(out.dtype))

    def read_contiguous(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Return copies of rows [lo, hi) (a rank's fixed shard, e.g. validation data)."""
        X = aligned_empty((hi - lo, self.d), np.float32)
        if hi > lo:
            self.X.read_direct(X, np.s_[lo:hi], np.s_[0:hi - lo])
        return X, np.asarray(self.y[lo:hi], dtype=np.float32)

    def close(self) -> None:
        self._map = None
        self._f.close()


