"""Histogram-tree kernels on device arrays with numba.cuda: the int64 histograms of ``kernels.trees``.

``build_root`` and ``build_histograms`` fill the same (nodes, total bins, 2) int64
histograms as their namesakes in ``kernels.trees`` (all rows; rows
``order[starts[j]:starts[j]+counts[j]]`` per node j), from device arrays: codes (n, d)
uint8, gh (n, 2) int64 (the rows' fixed-point gradient and hessian), order int32,
starts / counts int64. Integer atomics are associative, so the sums are the CPU's bit
for bit whatever order the threads run in: trees grown from them are the CPU's trees.

Two kernels:

* ``_hist_shared``: each block sums its rows into a shared-memory histogram of one
  *feature group* (consecutive features with at most SMEM_BINS bins, 48 KiB of int64
  pairs: a block's static shared-memory limit), then adds its non-zero bins to the
  global histogram with atomics. A histogram wider than one group (32 features of 255
  bins are 8160 bins) takes one grid layer per group; each layer reads the rows' order
  and gh again, and the same 32-byte sectors of codes.
* ``_hist_global``: every row's bins go straight to the global histogram with atomics;
  one pass over the rows whatever the width. The fallback where the histogram does
  not fit one group (``method="auto"``), as the L2 absorbs scattered 64-bit atomics well;
  which is faster there is measured by bench/bench_gpu_trees.py on a real GPU.

Thread layout (both): a block walks its chunk of rows as a flat (row, feature) index, so
the 32 lanes of a warp read consecutive code bytes of a row (coalesced) and, having
different features, add into different bins (no atomic conflict within a warp).

A row index outside the codes or a code beyond its feature's bins is skipped and flags
``bad``; the launchers check the flag (``check=True``) and raise, instead of letting a
corrupt order or codes array write outside the histogram.

Like ``kernels.gpu``: runs under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), imports
touch no GPU, and kernels call no @cuda.jit(device=True) helper (those compile only against
a live GPU; ``kernels.gpu_compile`` compiles these without one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, int64

from kernels.gpu import _allow_small_grids, _is_device, stream_sync
from kernels.tree_rows import MAX_BINS

__all__ = ["MAX_BLOCKS_X", "ROWS_PER_BLOCK", "SMEM_BINS", "TPB", "Layout", "build_histograms", "build_root",
           "feature_groups"]

TPB = 256              # threads per block: 8 warps; 48 KiB of shared memory per block lets 4 blocks
                       # (1024 threads, half an SM's) be resident on an A100 / H100 SM
SMEM_BINS = 3072       # bins of one shared histogram: 3072 x (g, h) x 8 B = 48 KiB
_SMEM = 2 * SMEM_BINS  # a shared array's shape must be a plain constant, not an expression
ROWS_PER_BLOCK = 2048  # rows a block sums at least before a node gets another block: its flush
                       # (up to 2 SMEM_BINS atomics) stays small beside 2 d atomics a row
MAX_BLOCKS_X = 1024    # blocks per node and feature group; beyond this a block takes more rows
MAX_NODES = 65535      # grid y (one node per row of blocks) is limited to this

_allow_small_grids()


# --------------------------------------------------------------------------- kernels


@cuda.jit
def _zero(flat: Any, bad: Any) -> None:
    """Zero the output histogram and the bad-input flag."""
    q = cuda.grid(1)
    if q < flat.shape[0]:
        flat[q] = 0
    if q == 0:
        bad[0] = 0


@cuda.jit
def _hist_shared(codes: Any, gh: Any, order: Any, use_order: int, starts: Any, counts: Any, foff: Any, groups: Any,
                 out: Any, bad: Any) -> None:
    """Add the rows of node blockIdx.y, feature group blockIdx.z, chunk blockIdx.x into out (flat)."""
    sh = cuda.shared.array(_SMEM, int64)
    t: int = cuda.threadIdx.x
    j: int = cuda.blockIdx.y
    f0 = groups[cuda.blockIdx.z]
    gd = groups[cuda.blockIdx.z + 1] - f0      # features in the group
    base = foff[f0]
    width = 2 * (foff[f0 + gd] - base)          # int64 entries of the group's histogram
    for q in range(t, width, TPB):
        sh[q] = 0
    cuda.syncthreads()
    n = codes.shape[0]
    start = 0
    count = n
    if use_order:
        start = starts[j]
        count = counts[j]
        if start < 0 or count < 0 or start + count > order.shape[0]:
            if t == 0:
                bad[0] = 1
            count = 0
    nx = cuda.gridDim.x
    chunk = (count + nx - 1) // nx
    lo = cuda.blockIdx.x * chunk
    hi = min(lo + chunk, count)
    # Flat (row, feature) index t, t + TPB, ... walked without a division per element.
    r = lo + t // gd
    ff = t % gd
    step_r = TPB // gd
    step_f = TPB % gd
    while r < hi:
        i = order[start + r] if use_order else start + r
        f = f0 + ff
        if 0 <= i < n:
            b = foff[f] + codes[i, f]
            if b < foff[f + 1]:
                q = 2 * (b - base)
                cuda.atomic.add(sh, q, gh[i, 0])
                cuda.atomic.add(sh, q + 1, gh[i, 1])
            else:
                bad[0] = 1
        else:
            bad[0] = 1
        ff += step_f
        r += step_r
        if ff >= gd:
            ff -= gd
            r += 1
    cuda.syncthreads()
    # Empty bins add nothing: blocks of small or empty chunks flush few atomics.
    node = j * (out.shape[0] // cuda.gridDim.y) + 2 * base
    for q in range(t, width, TPB):
        v = sh[q]
        if v != 0:
            cuda.atomic.add(out, node + q, v)


@cuda.jit
def _hist_global(codes: Any, gh: Any, order: Any, use_order: int, starts: Any, counts: Any, foff: Any, out: Any,
                 bad: Any) -> None:
    """Add the rows of node blockIdx.y, chunk blockIdx.x straight into out (flat), all features."""
    # _hist_shared's row walk with the global histogram as target: a device function
    # shared by both would compile only against a live GPU (see the module docstring).
    t: int = cuda.threadIdx.x
    j: int = cuda.blockIdx.y
    d = codes.shape[1]
    n = codes.shape[0]
    start = 0
    count = n
    if use_order:
        start = starts[j]
        count = counts[j]
        if start < 0 or count < 0 or start + count > order.shape[0]:
            if t == 0:
                bad[0] = 1
            count = 0
    nx = cuda.gridDim.x
    chunk = (count + nx - 1) // nx
    lo = cuda.blockIdx.x * chunk
    hi = min(lo + chunk, count)
    node = j * (out.shape[0] // cuda.gridDim.y)
    r = lo + t // d
    f = t % d
    step_r = TPB // d
    step_f = TPB % d
    while r < hi:
        i = order[start + r] if use_order else start + r
        if 0 <= i < n:
            b = foff[f] + codes[i, f]
            if b < foff[f + 1]:
                q = node + 2 * b
                cuda.atomic.add(out, q, gh[i, 0])
                cuda.atomic.add(out, q + 1, gh[i, 1])
            else:
                bad[0] = 1
        else:
            bad[0] = 1
        f += step_f
        r += step_r
        if f >= d:
            f -= d
            r += 1


# --------------------------------------------------------------------------- host side


def feature_groups(foff: np.ndarray, max_bins: int = SMEM_BINS) -> np.ndarray:
    """Return (G + 1,) int64 feature boundaries: runs of consecutive features with at most max_bins bins each."""
    bounds = [0]
    d = foff.shape[0] - 1
    for f in range(d):
        if foff[f + 1] - foff[bounds[-1]] > max_bins:
            bounds.append(f)
    bounds.append(d)
    return np.array(bounds, np.int64)


class Layout:
    """The device side of a histogram layout: feature offsets, feature groups, scratch; made once per model.

    foff is kernels.tree_rows.feature_offsets' (d + 1,) int64 (host). Making it copies a
    few small arrays to the device.
    """

    def __init__(self, foff: np.ndarray, stream: Any = 0) -> None:
        foff = np.asarray(foff)
        if foff.ndim != 1 or foff.shape[0] < 2 or foff.dtype != np.int64 or foff[0] != 0 \
                or not (np.diff(foff) >= 1).all() or (np.diff(foff) > MAX_BINS).any():
            raise ValueError(f"foff must be (d + 1,) int64 feature offsets from 0 with 1..{MAX_BINS} bins per "
                             f"feature (kernels.trees.feature_offsets), got {foff!r:.200}")
        self.foff = foff.copy()
        self.d = foff.shape[0] - 1
        self.total_bins = int(foff[-1])
        self.groups = feature_groups(foff)
        self.dfoff = cuda.to_device(self.foff, stream=stream)
        self.dgroups = cuda.to_device(self.groups, stream=stream)
        self.bad = cuda.device_array(1, np.int32, stream=stream)
        # Stand-ins for order / starts / counts where a launch reads all rows (use_order 0).
        self.none_i32 = cuda.device_array(1, np.int32, stream=stream)
        self.none_i64 = cuda.device_array(1, np.int64, stream=stream)

    def method(self, method: str) -> str:
        """Return the kernel a launch uses: "shared" where the histogram is one group, else "global" (auto)."""
        if method not in ("auto", "shared", "global"):
            raise ValueError(f"method must be auto, shared or global, got {method!r}")
        if method == "auto":
            return "shared" if self.groups.shape[0] == 2 else "global"
        return method


def _check(a: Any, name: str, dtype: Any, shape: tuple[int | None, ...]) -> tuple[int, ...]:
    """Raise TypeError / ValueError unless a is a C-contiguous device array of dtype and shape (None: any)."""
    if not _is_device(a):
        raise TypeError(f"{name} must be a device array (numba.cuda), got {type(a).__name__}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    got = tuple(a.shape)
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}), got {got}")
    if not a.is_c_contiguous():
        raise ValueError(f"{name} must be C-contiguous")
    return got


def _rows(codes: Any, gh: Any, layout: Layout) -> int:
    n, _ = _check(codes, "codes", np.uint8, (None, layout.d))
    _check(gh, "gh", np.int64, (n, 2))
    return n


def _out(out: Any, k: int, layout: Layout, stream: Any) -> Any:
    shape = (k, layout.total_bins, 2)
    if out is None:
        return cuda.device_array(shape, np.int64, stream=stream)
    _check(out, "out", np.int64, shape)
    return out


def _launch(codes: Any, gh: Any, order: Any, use_order: int, starts: Any, counts: Any, k: int, rows: int,
            layout: Layout, out: Any, method: str, check: bool, stream: Any) -> Any:
    """Zero out, launch the histogram kernel for k nodes holding about ``rows`` rows, check the flag."""
    if k > MAX_NODES:
        raise ValueError(f"at most {MAX_NODES} nodes a launch, got {k}")
    out = _out(out, k, layout, stream)
    flat = out.reshape(out.size)
    _zero[max(1, -(-flat.shape[0] // TPB)), TPB, stream](flat, layout.bad)
    if k and rows:
        # Blocks per node from the mean rows of a node: a level's nodes share the rows.
        bx = max(1, min(MAX_BLOCKS_X, -(-rows // (k * ROWS_PER_BLOCK))))
        if layout.method(method) == "shared":
            grid = (bx, k, layout.groups.shape[0] - 1)
            _hist_shared[grid, TPB, stream](codes, gh, order, use_order, starts, counts, layout.dfoff,
                                            layout.dgroups, flat, layout.bad)
        else:
            _hist_global[(bx, k), TPB, stream](codes, gh, order, use_order, starts, counts, layout.dfoff, flat,
                                               layout.bad)
    if check:
        flag = layout.bad.copy_to_host(stream=stream)
        stream_sync(stream)
        if flag[0]:
            raise ValueError("a segment lies outside order, an order entry outside codes' rows, or a code beyond "
                             "its feature's bins (corrupt order / starts / counts / codes)")
    return out


def build_root(codes: Any, gh: Any, layout: Layout, out: Any = None, method: str = "auto", check: bool = True,
               stream: Any = 0) -> Any:
    """Return the device (1, total bins, 2) int64 histogram of every row of codes, as kernels.trees.build_root.

    codes: (n, d) uint8, gh: (n, 2) int64 device arrays; out: a (1, total bins, 2) int64
    device array to fill (allocated if None). method: "shared", "global" or "auto" (see
    Layout.method). check: synchronise and raise ValueError on a code beyond its feature's
    bins; without it the launch stays asynchronous on stream.
    """
    n = _rows(codes, gh, layout)
    return _launch(codes, gh, layout.none_i32, 0, layout.none_i64, layout.none_i64, 1, n, layout, out, method,
                   check, stream)


def build_histograms(codes: Any, gh: Any, order: Any, starts: Any, counts: Any, layout: Layout, out: Any = None,
                     method: str = "auto", check: bool = True, stream: Any = 0) -> Any:
    """Return the device (k, total bins, 2) int64 sums of gh over rows order[starts[j]:starts[j]+counts[j]].

    As kernels.trees.build_histograms with gh = pair(gq, hq); order: int32 device array,
    starts / counts: (k,) int64 device arrays. Segments may be empty or overlap. Other
    arguments as build_root; check also catches a segment outside order and an order
    entry outside codes' rows.
    """
    n = _rows(codes, gh, layout)
    (m,) = _check(order, "order", np.int32, (None,))
    (k,) = _check(starts, "starts", np.int64, (None,))
    _check(counts, "counts", np.int64, (k,))
    return _launch(codes, gh, order, 1, starts, counts, k, min(m, n) if k else 0, layout, out, method, check, stream)
