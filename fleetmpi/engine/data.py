"""HDF5 datasets, the global sample order, and each rank's hyperslab reads.

The sample stream is the concatenation of epochs; epoch ``e`` visits the file's row blocks
(``block_rows`` consecutive rows each) in the order ``default_rng([seed, e]).permutation``.
Step ``s`` owns stream positions ``[s*B, (s+1)*B)``; rank ``r`` of ``P`` takes positions
``[s*B + r*B//P, s*B + (r+1)*B//P)``. So the samples of a step depend on the seed, the
file and ``B``, never on ``P``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, cast

import h5py
import numpy as np
from h5py import h5s, h5t

from fleetmpi.errors import BadInput, quote
from fleetmpi.spec import MAX_CLASSES
from kernels import lazy_njit, num_threads
from kernels.memory import aligned_empty

if TYPE_CHECKING:
    from kernels.sparse import CsrBatch

# Row ranges as readers take them: (lo, hi) pairs, a list or an int64 (k, 2) array
# (``SampleOrder.bounds``, which RankReader takes without converting).
Ranges: TypeAlias = "list[tuple[int, int]] | np.ndarray"

# Multiplicative hash of a row index, summed per step into a fingerprint of the batch.
# Each term is < 2**31, so the sum of up to 2**22 rows stays exact in float64.
_FP_MULT = np.uint64(2654435761)
_FP_MASK = np.uint64(2**31 - 1)

# Labels derived from the data may not ask for more classes than spec.MAX_CLASSES (a label of
# 2**40 would otherwise size the model at 2**40 columns).
# The finite check reads this many bytes of X per block, so its memory stays bounded.
CHECK_BLOCK_BYTES = 16 << 20

# Batches of at least this many rows are copied out of a memory map on all of a rank's numba
# threads (threads_per_rank > 1; kernels.gather); below it the copy is too short for the
# threads' start to pay (the gradient kernels split from the same size).
GATHER_THREADS_MIN_ROWS = 1024


def row_fingerprint(lo: int, hi: int) -> float:
    """Return the sum of hash(i) over rows lo..hi-1 (exact in float64)."""
    return float(_fingerprint(np.array([lo], np.int64), np.array([hi], np.int64)))


@lazy_njit(cache=True, nogil=True)
def _fingerprint(lo: np.ndarray, hi: np.ndarray) -> np.uint64:
    """Return the sum of hash(i) over the rows of every range [lo[k], hi[k]) (integer, exact)."""
    total = np.uint64(0)
    for k in range(lo.size):
        for i in range(lo[k], hi[k]):
            total += (np.uint64(i) * _FP_MULT) & _FP_MASK
    return total


def _mapped(path: Path, f: h5py.File, dset: h5py.Dataset) -> np.ndarray | None:
    """Return a read-only memory map of a dataset's bytes in the file, or None where there is none.

    A contiguous dataset without filters is stored as one run of bytes in native layout
    at H5Dget_offset (the user block included); reading rows from the page cache through
    a map skips HDF5's per-call selection work, which costs more than the copy at batch
    sizes. Chunked, compressed, external, virtual and not yet written datasets, other file
    drivers and non-native byte orders return None and are read through HDF5. The file
    must not be truncated while a phase reads it: a mapped read past the end kills the
    rank (SIGBUS) where HDF5 would raise; either way the run stops and its checkpoints stay.
    """
    if dset.chunks is not None or dset.is_virtual or dset.external or f.driver != "sec2" or not dset.dtype.isnative:
        return None
    offset = dset.id.get_offset()
    if offset is None or dset.size == 0:
        return None
    try:
        view = np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)
    except (OSError, ValueError):   # shorter than the header says: HDF5's read reports it
        return None
    return view.view(np.ndarray)


@dataclass(frozen=True)
class DataInfo:
    path: Path
    n: int
    d: int
    classes: int | None   # label count for classification, None for regression


def describe(path: Path, task: str, classes: int | None = None, check: bool = True) -> DataInfo:
    """Check a dataset file's layout for ``task`` and return its shape; BadInput on problems.

    ``task`` is 'regression', 'binary' or 'multiclass'. A file with attribute
    ``format = "csr"`` holds CSR rows (``indptr``, ``indices``, ``data``, ``y``; d is its
    ``n_features``): its structure is always checked (one pass, in blocks of rows), its
    values for NaN/inf with ``check``. Labels are scanned in chunks to
    check that they are valid class ids. With ``check`` (the spec's ``data.check``), X and
    y are also read once, in blocks of bounded memory, and NaN or inf is refused naming the
    first bad row and column.
    """
    with open_h5(path) as f:
        if is_csr(f):
            indptr, indices, data, y, d = _csr_datasets(f, path)
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
                           f"{'' if integral else ' that are not whole numbers'}")
        if task == "binary":
            if hi > 1:
                raise BadInput(f"{path}: logistic needs labels 0/1 in y, found labels up to {hi:g}; "
                               "use kind softmax for more classes")
            return DataInfo(path, n, d, 2)
        attr = f.attrs.get("classes")
        if classes is None and hi >= MAX_CLASSES:
            raise BadInput(f"{path}: y holds label {hi:.0f}, which would make {hi + 1:.0f} classes; labels must be "
                           f"class ids below {MAX_CLASSES}")
        if classes is None and attr is not None and not 2 <= _as_int(attr) <= MAX_CLASSES:
            raise BadInput(f"{path}: attribute classes={quote(attr, 60)}; expected a whole number in "
                           f"[2, {MAX_CLASSES}] (or set model.classes)")
        k = classes or (_as_int(attr) if attr is not None else int(hi) + 1)
        if hi >= k:
            raise BadInput(f"{path}: y holds label {hi:g} but the model has {k} classes (labels must be 0..{k - 1})")
        return DataInfo(path, n, d, max(k, 2))


def _as_int(v: object) -> int:
    """Return an HDF5 attribute as an int, or -1 when it is not one whole number."""
    try:
        f = float(np.asarray(v).item())
    except (TypeError, ValueError):
        return -1
    return int(f) if np.isfinite(f) and f == int(f) else -1


def check_finite(path: Path, dset: h5py.Dataset, name: str) -> None:
    """Read ``dset`` once in blocks of about CHECK_BLOCK_BYTES; BadInput naming the first NaN/inf row and column."""
    n = dset.shape[0]
    row_bytes = max(1, int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize)
    step = max(1, CHECK_BLOCK_BYTES // row_bytes)
    if dset.chunks:   # whole chunks per block: HDF5 decompresses each chunk once
        step = max(dset.chunks[0], step // dset.chunks[0] * dset.chunks[0])
    for start in range(0, n, step):
        block = dset[start:start + step]
        if block.dtype.kind != "f":
            return    # integers cannot hold NaN or inf
        ok = np.isfinite(block)
        if ok.all():
            continue
        bad_rows = ok if ok.ndim == 1 else ok.all(axis=1)
        r = int(np.flatnonzero(~bad_rows)[0])
        value = block[r] if block.ndim == 1 else block[r][~ok[r]][0]
        col = "" if block.ndim == 1 else f", column {int(np.flatnonzero(~ok[r])[0])}"
        what = "NaN" if np.isnan(value) else "inf"
        raise BadInput(f"{path}: dataset {name} holds {what} at row {start + r}{col}; data must be finite "
                       "(fix or drop those rows; data.check: false skips this check)")


def _check_extent(path: Path, dset: h5py.Dataset, name: str, file_size: int) -> None:
    """Refuse a dataset whose declared shape is not backed by stored bytes (a 2**40-row header, a truncated file)."""
    if dset.size == 0 or dset.is_virtual or dset.external:
        return
    declared = f"declares shape {dset.shape} ({dset.size * dset.dtype.itemsize} bytes)"
    if dset.chunks is None:
        layout = dset.id.get_create_plist().get_layout()
        if layout == h5py.h5d.COMPACT:
            return
        stored, offset = dset.id.get_storage_size(), dset.id.get_offset()
        need = dset.size * dset.dtype.itemsize
        if stored < need or offset is None or offset + need > file_size:
            raise BadInput(f"{path}: dataset {name} {declared} but the file holds {file_size} bytes "
                           f"({stored} stored for it); the file is truncated or was never fully written")
        return
    needed = 1
    for extent, chunk in zip(dset.shape, dset.chunks):
        needed *= -(-extent // chunk)
    try:
        have = dset.id.get_num_chunks()
    except (AttributeError, RuntimeError):   # HDF5 < 1.10.5 cannot count chunks
        return
    if have < needed:
        raise BadInput(f"{path}: dataset {name} {declared} but only {have} of its {needed} chunks are written; "
                       "rows never written read as fill values, so the file is incomplete")


def open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only; BadInput naming the file when it cannot be."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: data file not found") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read data file ({e.__class__.__name__}: {e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):  # h5py's message for a folder is a read failure with a timestamp
        raise BadInput(f"{path}: is a folder, not an HDF5 data file")
    if not stat.S_ISREG(st.st_mode):   # opening a FIFO blocks; a device never ends
        raise BadInput(f"{path}: not a regular file (a FIFO, socket or device); a data file is an HDF5 file")
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise BadInput(f"{path}: data file not found") from None
    except OSError as e:
        raise BadInput(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None


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
    _check_extent(path, X, "X", size)
    _check_extent(path, y, "y", size)
    return X, y


# ------------------------------------------------------------------------- CSR files


def is_csr(f: h5py.File) -> bool:
    """Return whether an open data file holds CSR rows (attribute format = "csr")."""
    fmt = f.attrs.get("format")
    return (fmt.decode() if isinstance(fmt, bytes) else fmt) == "csr"


def _csr_datasets(f: h5py.File, path: Path) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset, h5py.Dataset, int]:
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
    d = _as_int(f.attrs.get("n_features", -1))
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
        _check_extent(path, dset, name, size)
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
        self._ds = _csr_datasets(self._f, path)
        self.n, self.d = self._ds[0].shape[0] - 1, self._ds[4]
        self._arrays: tuple[object, ...] = self._ds[:4]
        self._bufs: list[np.ndarray] = [np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0, np.float32),
                                        np.empty(0, np.float32)]
        self._direct = False
        if direct:
            maps = [_mapped(path, self._f, ds) for ds in self._ds[:4]]
            if all(m is not None for m in maps) and _copy_kernel_y(self._ds[3].dtype):
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
        _check_ranges(self.path, self.n, lo_a, hi_a)
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
        return X, yy, float(_fingerprint(lo_a, hi_a))

    def _read_mapped(self, ranges: Ranges, fresh: bool = False) -> tuple[CsrBatch, np.ndarray, float]:
        """Copy the rows out of the maps: into the reused buffers, or (fresh) new arrays."""
        from kernels.gather import csr_sizes, gather_csr, sort_ranges
        from kernels.sparse import CsrBatch
        lo, hi = sort_ranges(_as_bounds(ranges))
        _check_ranges(self.path, self.n, lo, hi)
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
        return CsrBatch(ip, ix, dv, self.d), yy, float(_fingerprint(lo, hi))

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


def open_reader(path: Path, direct: bool = True) -> RankReader | CsrReader:
    """Return the reader for a data file: CsrReader for format csr, else RankReader."""
    with open_h5(path) as f:
        csr = is_csr(f)
    return CsrReader(path, direct) if csr else RankReader(path, direct)


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
        from kernels.gather import visit_blocks  # numba's: the CLI's data checks run without it
        parts: list[np.ndarray] = []
        pos = start
        while pos < stop:
            e, off = divmod(pos, self.n)
            self._load_epoch(e)
            end = min(self.n, off + stop - pos)            # this epoch's part: offsets [off, end)
            part = visit_blocks(self._starts, self._cum, off, end)
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
            mx, my = _mapped(path, self._f, self.X), _mapped(path, self._f, self.y)
            if mx is not None and my is not None and _copy_kernel_y(my.dtype):
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
        it; the bits are the same either way); else ONE HDF5 read of a union of
        hyperslabs (one call per block costs ~40 us each, 10x the data movement at
        typical batch sizes). Rows come back in file order (``kernels.gather.file_order``): deterministic,
        and a gradient sum does not depend on order.
        """
        from kernels.gather import file_order
        lo, hi, cuts = file_order(_as_bounds(ranges))
        _check_ranges(self.path, self.n, lo, hi)
        total = int(np.sum(hi - lo))
        if self._xbuf.shape[0] < total:
            # On a cache line: the kernels' vector loads then touch one line each
            # (kernels.memory: 1.2x on the float32 GLM gradients of an in-cache batch, d = 128).
            self._xbuf = aligned_empty((total, self.d), np.float32)
            self._ybuf = np.empty(total, np.float32)
        X, y = self._xbuf[:total], self._ybuf[:total]
        if self._map is not None:
            # Imported here: it imports numba, which stays off the CLI's data checks (as lazy_njit).
            from kernels import gather
            if threads is None:
                threads = total >= GATHER_THREADS_MIN_ROWS and num_threads() > 1
            if threads:
                gather.gather_rows_threads(self._map[0], self._map[1], lo, hi, X, y, num_threads())
            else:
                gather.gather_rows(self._map[0], self._map[1], lo, hi, X, y)
        else:
            pairs, off = list(zip(lo.tolist(), hi.tolist())), 0
            for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
                layer = pairs[a:b]
                m = sum(b1 - a1 for a1, b1 in layer)
                self._read_union(self.X, layer, X[off:off + m], (self.d,))
                self._read_union(self.y, layer, y[off:off + m], ())
                off += m
        return X, y, float(_fingerprint(lo, hi))

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


def _copy_kernel_y(dtype: np.dtype) -> bool:
    """Return whether the copy kernels (kernels.gather, numba) take labels of this dtype:
    signed or unsigned integers, float32 or float64. Others (float16, long double) are
    read through HDF5, which converts them."""
    return dtype.kind in "iu" or dtype in (np.float32, np.float64)


def _check_ranges(path: Path, n: int, lo: np.ndarray, hi: np.ndarray) -> None:
    """Raise BadInput unless every range [lo, hi) lies within the file's n rows.

    The sample order comes from rank 0's look at the data; a rank whose copy of the file has
    fewer rows (another node's copy, a file replaced while the job ran) must stop here, not
    read past the end of a memory map.
    """
    if lo.size and (lo.min() < 0 or hi.max() > n or (hi < lo).any()):
        k = int(np.flatnonzero((lo < 0) | (hi > n) | (hi < lo))[0])
        raise BadInput(f"{path}: the job reads rows {lo[k]}..{hi[k]} but the file holds {n} rows; was it "
                       "replaced or truncated while the job ran, or does this node see another copy?")


def _as_bounds(ranges: Ranges) -> np.ndarray:
    """Return ranges as a C-contiguous int64 (k, 2) array (such an array as it is: the
    numba functions then see one array type, compiled once at install)."""
    if (isinstance(ranges, np.ndarray) and ranges.dtype == np.int64 and ranges.ndim == 2
            and ranges.flags.c_contiguous):
        return ranges
    return np.array(ranges, np.int64).reshape(-1, 2)


def range_list(ranges: Ranges) -> list[tuple[int, int]]:
    """Return ranges as a list of (lo, hi) int tuples."""
    return list(map(tuple, _as_bounds(ranges).tolist()))


def contiguous_share(n: int, rank: int, size: int) -> tuple[int, int]:
    """Return rows [lo, hi) of a fixed contiguous split of n rows over ``size`` ranks."""
    return rank * n // size, (rank + 1) * n // size
