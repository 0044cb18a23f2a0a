"""CSR data files: their structure checks and the rank reader for them (``CsrReader``).

A CSR file holds ``indptr`` (int64, n + 1), ``indices`` (int32, nnz), ``data`` (float32,
nnz) and ``y`` (n), with attributes ``format = "csr"`` and ``n_features``. Rows, their
order and the batch fingerprint follow ``fleetmpi.engine.data`` (SampleOrder, RankReader).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import h5py
import numpy as np

from fleetmpi.engine.h5rows import (
    CHECK_BLOCK_BYTES,
    Ranges,
    as_bounds,
    as_int,
    check_extent,
    check_ranges,
    copy_kernel_y,
    map_dataset,
    open_h5,
    range_list,
    ranges_fingerprint,
)
from fleetmpi.errors import BadInput, quote

if TYPE_CHECKING:
    from kernels.sparse import CsrBatch


def csr_datasets(f: h5py.File, path: Path) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset, h5py.Dataset, int]:
    """Return (indptr, indices, data, y, n_features) of a CSR file; BadInput naming what is wrong."""
    want = {"indptr": np.int64, "indices": np.int32, "data": np.float32}
    for name in (*want, "y"):
        if name not in f or not isinstance(f[name], h5py.Dataset) or f[name].ndim != 1:
            raise BadInput(f"{path}: format csr needs 1-D dataset {name!r}; a CSR file holds indptr (int64, n+1), "
                           "indices (int32, nnz), data (float32, nnz) and y (n)")
    for name, dtype in want.items():
        if f[name].dtype != dtype:
            raise BadInput(f"{path}: CSR dataset {name} must be {np.dtype(dtype).name}, got {f[name].dtype}")
    indptr, indices, data, y = f["indptr"], f["indices"], f["data"], f["y"]
    d = as_int(f.attrs.get("n_features", -1))
    if d < 1 or d > 2**31 - 1:
        raise BadInput(f"{path}: attribute n_features={quote(f.attrs.get('n_features'), 60)}; format csr needs "
                       "the column count as a whole number in [1, 2**31 - 1]")
    n = indptr.shape[0] - 1
    if n < 0:
        raise BadInput(f"{path}: CSR dataset indptr is empty; it holds n + 1 offsets")
    if indices.shape != data.shape:
        raise BadInput(f"{path}: CSR datasets indices {indices.shape} and data {data.shape} must have one length (nnz)")
    if y.shape != (n,):
        raise BadInput(f"{path}: y must have shape ({n},) to match indptr's {n + 1} offsets, got {y.shape}")
    if y.dtype.kind not in "fiu":
        raise BadInput(f"{path}: y must be numeric, got {y.dtype}")
    size = os.stat(path).st_size
    for dset, name in ((indptr, "indptr"), (indices, "indices"), (data, "data"), (y, "y")):
        check_extent(path, dset, name, size)
    return indptr, indices, data, y, d


def check_csr(path: Path, indptr: h5py.Dataset, indices: h5py.Dataset, data: h5py.Dataset, d: int,
              finite: bool = True) -> None:
    """Read a CSR file once in blocks of rows; BadInput at the first bad offset, column id or (``finite``) value.

    indptr must start at 0, never decrease and end at nnz; each row's column ids must lie
    in [0, d) and increase strictly; data must be finite.
    """
    n, nnz = indptr.shape[0] - 1, indices.shape[0]
    ends = indptr[[0, n]] if n else indptr[[0, 0]]
    if ends[0] != 0 or ends[1] != nnz:
        raise BadInput(f"{path}: CSR indptr runs from {ends[0]} to {ends[1]}; it must run from 0 to nnz={nnz}")
    rows_per = max(1, CHECK_BLOCK_BYTES // 64)
    for r0 in range(0, n, rows_per):
        ip = np.asarray(indptr[r0:min(n, r0 + rows_per) + 1], np.int64)
        lens = np.diff(ip)
        if (lens < 0).any():
            r = r0 + int(np.flatnonzero(lens < 0)[0])
            raise BadInput(f"{path}: CSR indptr decreases at row {r} ({ip[r - r0]} -> {ip[r - r0 + 1]}); "
                           "offsets must never decrease")
        a, b = int(ip[0]), int(ip[-1])
        for p0 in range(a, b, CHECK_BLOCK_BYTES // 4):
            p1 = min(b, p0 + CHECK_BLOCK_BYTES // 4)
            ix = np.asarray(indices[p0:p1], np.int64)
            bad = (ix < 0) | (ix >= d)
            # a row's ids increase strictly: a step that is not positive must be a row start
            starts = np.zeros(ix.size, bool)
            first = ip[:-1][(ip[:-1] >= p0) & (ip[:-1] < p1)] - p0
            starts[first] = True
            step_bad = np.zeros(ix.size, bool)
            step_bad[1:] = (np.diff(ix) <= 0) & ~starts[1:]
            if p0 > a and ix.size and not starts[0] and ix[0] <= int(indices[p0 - 1]):
                step_bad[0] = True
            if bad.any():
                q = int(np.flatnonzero(bad)[0])
                raise BadInput(f"{path}: CSR row {_row_of(ip, r0, p0 + q)} (entry {p0 + q}) has column id {ix[q]} "
                               f"outside [0, {d}); ids must be below the n_features attribute")
            if step_bad.any():
                q = int(np.flatnonzero(step_bad)[0])
                raise BadInput(f"{path}: CSR row {_row_of(ip, r0, p0 + q)} (entry {p0 + q}): column ids must increase "
                               f"strictly within a row (sorted, no duplicates), found {ix[q]} after a larger or equal id")
            if finite:
                ok = np.isfinite(np.asarray(data[p0:p1]))
                if not ok.all():
                    q = int(np.flatnonzero(~ok)[0])
                    raise BadInput(f"{path}: dataset data holds NaN or inf at row {_row_of(ip, r0, p0 + q)}, column "
                                   f"{ix[q]}; data must be finite (fix or drop those rows; data.check: false skips "
                                   "this check)")


def _row_of(ip: np.ndarray, r0: int, entry: int) -> int:
    """Return the row holding ``entry`` among a block of offsets ``ip`` that starts at row r0."""
    return r0 + int(np.searchsorted(ip, entry, side="right")) - 1


class CsrReader:
    """Read one rank's CSR rows of a step: its slice of indptr per row range, then one range of indices/data.

    Has RankReader's interface; X comes back as a ``kernels.sparse.CsrBatch``. Contiguous
    unfiltered datasets are read through memory maps, others through HDF5.
    """

    def __init__(self, path: Path, direct: bool = True) -> None:
        self.path = path
        self._f = open_h5(path)
        self._ds = csr_datasets(self._f, path)
        self.n, self.d = self._ds[0].shape[0] - 1, self._ds[4]
        self._arrays: tuple[object, ...] = self._ds[:4]
        self._bufs: list[np.ndarray] = [np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0, np.float32),
                                        np.empty(0, np.float32)]
        self._direct = False
        if direct:
            maps = [map_dataset(path, self._f, ds) for ds in self._ds[:4]]
            if all(m is not None for m in maps) and copy_kernel_y(self._ds[3].dtype):
                self._arrays, self._direct = tuple(maps), True

    @property
    def direct(self) -> bool:
        """Whether rows are read through memory maps of the file (else through HDF5)."""
        return self._direct

    def read(self, ranges: Ranges) -> tuple[CsrBatch, np.ndarray, float]:
        """Return (CSR rows, y rows, fingerprint) of the row ranges, sorted (ranges that overlap
        give their rows twice). Through the maps, one copy kernel (``kernels.gather.gather_csr``)
        into reused buffers (the batch is a view the next read overwrites, as RankReader's);
        else HDF5 reads of each range."""
        if self._direct:
            return self._read_mapped(ranges)
        ranges = sorted(range_list(ranges))
        bounds = np.array(ranges, np.int64).reshape(-1, 2)
        lo_a, hi_a = bounds[:, 0].copy(), bounds[:, 1].copy()
        check_ranges(self.path, self.n, lo_a, hi_a)
        indptr, indices, data, y = self._arrays
        ips, ixs, dvs, ys = [np.zeros(1, np.int64)], [], [], []
        off = 0
        for lo, hi in ranges:
            ip = np.asarray(indptr[lo:hi + 1], np.int64)   # type: ignore[index]
            a, b = int(ip[0]), int(ip[-1])
            ips.append(ip[1:] - a + off)
            ixs.append(np.asarray(indices[a:b], np.int32))   # type: ignore[index]
            dvs.append(np.asarray(data[a:b], np.float32))    # type: ignore[index]
            ys.append(np.asarray(y[lo:hi], np.float32))      # type: ignore[index]
            off += b - a
        X = self._batch(np.concatenate(ips), ixs, dvs)
        yy = np.concatenate(ys) if ys else np.empty(0, np.float32)
        return X, yy, float(ranges_fingerprint(lo_a, hi_a))

    def _read_mapped(self, ranges: Ranges, fresh: bool = False) -> tuple[CsrBatch, np.ndarray, float]:
        """Copy the rows out of the maps: into the reused buffers, or (fresh) new arrays."""
        from kernels.gather import csr_sizes, gather_csr, sort_ranges
        from kernels.sparse import CsrBatch
        lo, hi = sort_ranges(as_bounds(ranges))
        check_ranges(self.path, self.n, lo, hi)
        maps = cast("tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]", self._arrays)
        rows, nnz, ok = csr_sizes(maps[0], maps[1].shape[0], lo, hi)
        if not ok:
            raise self._damaged()
        if fresh:
            ip, ix = np.empty(rows + 1, np.int64), np.empty(nnz, np.int32)
            dv, yy = np.empty(nnz, np.float32), np.empty(rows, np.float32)
        else:
            # Reused buffers, grown with room to spare: fresh arrays of a batch's size came
            # from new pages each read, and their first touch doubled the copy's time.
            if self._bufs[0].size < rows + 1:
                self._bufs[0] = np.empty(rows + 1 + rows // 4, np.int64)
                self._bufs[3] = np.empty(rows + rows // 4, np.float32)
            if self._bufs[1].size < nnz:
                self._bufs[1], self._bufs[2] = np.empty(nnz + nnz // 4, np.int32), np.empty(nnz + nnz // 4, np.float32)
            ip, ix, dv, yy = self._bufs[0][:rows + 1], self._bufs[1][:nnz], self._bufs[2][:nnz], self._bufs[3][:rows]
        if not gather_csr(*maps, lo, hi, self.d, ip, ix, dv, yy):
            raise self._damaged()
        return CsrBatch(ip, ix, dv, self.d), yy, float(ranges_fingerprint(lo, hi))

    def _batch(self, ip: np.ndarray, ixs: list[np.ndarray], dvs: list[np.ndarray]) -> CsrBatch:
        """Return the batch, refusing offsets or column ids that would index outside the model."""
        ix = np.concatenate(ixs) if ixs else np.empty(0, np.int32)
        dv = np.concatenate(dvs) if dvs else np.empty(0, np.float32)
        # O(nnz) and cheap next to the kernels: a file changed after describe() must not
        # send a kernel outside the parameters.
        if (np.diff(ip) < 0).any() or ip[-1] != ix.size or (ix.size and (ix.min() < 0 or ix.max() >= self.d)):
            raise self._damaged()
        from kernels.sparse import CsrBatch  # numba's: the CLI's describe() runs without it
        return CsrBatch(np.ascontiguousarray(ip), np.ascontiguousarray(ix), np.ascontiguousarray(dv), self.d)

    def _damaged(self) -> BadInput:
        return BadInput(f"{self.path}: CSR rows hold offsets or column ids outside [0, {self.d}); "
                        "the file is damaged or changed while the job ran")

    def read_contiguous(self, lo: int, hi: int) -> tuple[CsrBatch, np.ndarray]:
        """Return copies of rows [lo, hi) (a rank's fixed shard, e.g. validation data): arrays
        of their own (not the reused buffers, which would keep a second shard's worth)."""
        X, y, _ = self._read_mapped([(lo, hi)], fresh=True) if self._direct else self.read([(lo, hi)])
        return X, y

    def close(self) -> None:
        self._arrays = ()
        self._f.close()
