"""HDF5 data files at the level every reader shares: opening and mapping them, checking what
they declare, and row ranges with their fingerprint.

``fleetmpi.engine.data`` (dense X, the sample order) and ``fleetmpi.engine.csr_data`` (CSR
rows) build on it. numba stays unimported until a kernel runs (``kernels.lazy_function``): the CLI's
data checks import this before they spawn mpiexec.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TypeAlias

import h5py
import numpy as np

from fleetmpi.errors import BadInput
from kernels import lazy_function

# Row ranges as readers take them: (lo, hi) pairs, a list or an int64 (k, 2) array
# (``SampleOrder.bounds``, which RankReader takes without converting).
Ranges: TypeAlias = "list[tuple[int, int]] | np.ndarray"

# Multiplicative hash of a row index, summed per step into a fingerprint of the batch.
# Each term is < 2**31, so the sum of up to 2**22 rows stays exact in float64.
FP_MULT = np.uint64(2654435761)
FP_MASK = np.uint64(2**31 - 1)

# The finite check reads this many bytes of X per block, so its memory stays bounded.
CHECK_BLOCK_BYTES = 16 << 20


def row_fingerprint(lo: int, hi: int) -> float:
    """Return the sum of hash(i) over rows lo..hi-1 (exact in float64)."""
    return float(ranges_fingerprint(np.array([lo], np.int64), np.array([hi], np.int64)))


_fingerprint = lazy_function("kernels.gather", "ranges_fingerprint")   # numba's, at the first call


def ranges_fingerprint(lo: np.ndarray, hi: np.ndarray) -> np.uint64:
    """Return the sum of hash(i) over the rows of every range [lo[k], hi[k]) (integer, exact)."""
    return _fingerprint(lo, hi, FP_MULT, FP_MASK)


def map_dataset(path: Path, f: h5py.File, dset: h5py.Dataset) -> np.ndarray | None:
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


def as_int(v: object) -> int:
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


def check_extent(path: Path, dset: h5py.Dataset, name: str, file_size: int) -> None:
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


def is_csr(f: h5py.File) -> bool:
    """Return whether an open data file holds CSR rows (attribute format = "csr")."""
    fmt = f.attrs.get("format")
    return (fmt.decode() if isinstance(fmt, bytes) else fmt) == "csr"


def copy_kernel_y(dtype: np.dtype) -> bool:
    """Return whether the copy kernels (kernels.gather, numba) take labels of this dtype:
    signed or unsigned integers, float32 or float64. Others (float16, long double) are
    read through HDF5, which converts them."""
    return dtype.kind in "iu" or dtype in (np.float32, np.float64)


def check_ranges(path: Path, n: int, lo: np.ndarray, hi: np.ndarray) -> int:
    """Return how many rows the ranges [lo, hi) hold; BadInput unless each lies within the file's n rows.

    The sample order comes from rank 0's look at the data; a rank whose copy of the file has
    fewer rows (another node's copy, a file replaced while the job ran) must stop here, not
    read past the end of a memory map. One numba pass (``kernels.gather.span_rows``): numpy's
    reductions and sum took 7 us a batch.
    """
    from kernels.gather import span_rows  # numba: loaded by the first read, not by this module's import
    total = int(span_rows(lo, hi, n))
    if total < 0:
        raise outside_file(path, n, lo, hi)
    return total


def outside_file(path: Path, n: int, lo: np.ndarray, hi: np.ndarray) -> BadInput:
    """Return the BadInput for ranges [lo, hi) of which one lies outside a file of n rows (naming the first)."""
    k = int(np.flatnonzero((lo < 0) | (hi > n) | (hi < lo))[0])
    return BadInput(f"{path}: the job reads rows {lo[k]}..{hi[k]} but the file holds {n} rows; was it "
                    "replaced or truncated while the job ran, or does this node see another copy?")


def as_bounds(ranges: Ranges) -> np.ndarray:
    """Return ranges as a C-contiguous int64 (k, 2) array (such an array as it is: the
    numba functions then see one array type, compiled once at install)."""
    if (isinstance(ranges, np.ndarray) and ranges.dtype == np.int64 and ranges.ndim == 2
            and ranges.flags.c_contiguous):
        return ranges
    return np.array(ranges, np.int64).reshape(-1, 2)


def range_list(ranges: Ranges) -> list[tuple[int, int]]:
    """Return ranges as a list of (lo, hi) int tuples."""
    return list(map(tuple, as_bounds(ranges).tolist()))


def contiguous_share(n: int, rank: int, size: int) -> tuple[int, int]:
    """Return rows [lo, hi) of a fixed contiguous split of n rows over ``size`` ranks."""
    return rank * n // size, (rank + 1) * n // size
