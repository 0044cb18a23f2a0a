"""Lag windows of series data as samples: the map from window index to points, and each rank's reads.

A series file is HDF5 with dataset ``series``, float32 of shape (T,) or (T, m): m series
of T points as columns. ``data.valid_tail`` holds out the last V points of every series (a
fraction of T, rounded, or a count). With lags p, a window is a target time t of one
column c with p points before it: row [y_{t-1}, ..., y_{t-p}], target y_t.

- training windows: t in [p, T - V) of every column, so no training target lies in the tail;
- validation windows: t in [T - V, T); their inputs may lie before the tail (true values:
  one-step-ahead errors).

Window indices run column after column: training window i is column i // N at
t = p + i % N with N = T - V - p. They are the samples of ``fleetmpi.engine.data.SampleOrder``
exactly as rows are, so a step's windows follow the engine's global-order rules for any
rank count. A rank reads, per range of consecutive windows of one column, the points of
its targets plus a halo of the p points before the first: one long series splits across
ranks at any window, not per series.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fleetmpi.engine.h5rows import Ranges, check_finite, contiguous_share, open_h5, range_list, ranges_fingerprint
from fleetmpi.errors import BadInput

if TYPE_CHECKING:
    from fleetmpi.engine.trainer import Trainer


@dataclass(frozen=True)
class SeriesInfo:
    path: Path
    T: int          # points per series
    m: int          # series (columns)
    lags: int       # p
    tail: int       # V: held-out points at the end of every series

    @property
    def per_train(self) -> int:
        """Return training windows per series (T - V - p)."""
        return self.T - self.tail - self.lags

    @property
    def n_train(self) -> int:
        return self.m * self.per_train

    @property
    def n_valid(self) -> int:
        return self.m * self.tail


def tail_points(valid_tail: float | int | None, T: int) -> int:
    """Return the held-out points of a T-point series: round(fraction * T) for a float, the count for an int."""
    if valid_tail is None:
        return 0
    if isinstance(valid_tail, float):
        return int(round(valid_tail * T))
    return int(valid_tail)


def series_dataset(f: h5py.File, path: Path) -> h5py.Dataset:
    """Return the file's ``series`` dataset; BadInput naming what a series file must hold."""
    s = f.get("series")
    if not isinstance(s, h5py.Dataset):
        raise BadInput(f"{path}: missing dataset 'series'; series data hold series float32 (T,) or (T, m) "
                       "(write them with `fleetmpi make-data --from csv FILE --series-columns a,b`)")
    if s.ndim not in (1, 2) or s.shape[0] == 0 or (s.ndim == 2 and s.shape[1] == 0):
        raise BadInput(f"{path}: dataset series has shape {s.shape}; expected (T,) or (T, m) with T, m >= 1")
    if s.dtype != np.float32:
        raise BadInput(f"{path}: dataset series must be float32, got {s.dtype}; write it with astype('float32')")
    return s


def describe_series(path: Path, lags: int, valid_tail: float | int | None, check: bool = True) -> SeriesInfo:
    """Check a series file for AR(lags) windows with the tail held out; return its shape. BadInput on problems."""
    with open_h5(path) as f:
        s = series_dataset(f, path)
        T, m = s.shape[0], (s.shape[1] if s.ndim == 2 else 1)
        if check:
            check_finite(path, s, "series")
    V = tail_points(valid_tail, T)
    if lags >= T:
        raise BadInput(f"{path}: lags {lags} is longer than the series ({T} points); a window needs lags + 1 "
                       f"points: lags must be at most {T - 2} (one training target and its lags)")
    if T - V - lags < 1:
        raise BadInput(f"{path}: data.valid_tail {valid_tail!r} holds out {V} of {T} points, which leaves no training "
                       f"window for lags {lags}; the tail may hold at most {T - lags - 1} points")
    return SeriesInfo(Path(path), T, m, lags, V)


class WindowReader:
    """Read lag windows (training or validation) of a series file: X (k, p) float32, y (k,) float32.

    Has RankReader's interface (``read``, ``read_contiguous``, ``direct``, ``close``), so
    the gradient techniques and L-BFGS's fixed rows read windows without knowing it.
    """

    direct = True   # no hyperslab-speed note: reads are per column range, not per row

    def __init__(self, info: SeriesInfo, valid: bool = False) -> None:
        self.info, self.valid, self.path = info, valid, info.path
        self._f = open_h5(info.path)
        self._s = series_dataset(self._f, info.path)
        self.n = info.n_valid if valid else info.n_train
        self.d = info.lags

    def spans(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Return (column, first point read, end point) per column that windows [lo, hi) touch; halo included."""
        info, p = self.info, self.info.lags
        per = info.tail if self.valid else info.per_train
        first_t = info.T - info.tail if self.valid else p
        out = []
        i = lo
        while i < hi:
            c, j = divmod(i, per)
            k = min(hi - i, per - j)
            out.append((c, first_t + j - p, first_t + j + k))
            i += k
        return out

    def _points(self, c: int, a: int, b: int) -> np.ndarray:
        return np.asarray(self._s[a:b, c] if self._s.ndim == 2 else self._s[a:b], dtype=np.float32)

    def read_contiguous(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Return copies of windows [lo, hi): X (hi - lo, p) newest lag first, y (hi - lo,)."""
        p = self.info.lags
        X = np.empty((hi - lo, p), np.float32)
        y = np.empty(hi - lo, np.float32)
        off = 0
        for c, a, b in self.spans(lo, hi):
            win = sliding_window_view(self._points(c, a, b), p + 1)   # (b - a - p, p + 1): oldest .. target
            k = win.shape[0]
            X[off:off + k] = win[:, p - 1::-1]
            y[off:off + k] = win[:, p]
            off += k
        return X, y

    def read(self, ranges: Ranges) -> tuple[np.ndarray, np.ndarray, float]:
        """Return (X, y, fingerprint) of the window ranges, in window order (a sum does not depend on order)."""
        ranges = sorted(range_list(ranges))
        parts = [self.read_contiguous(lo, hi) for lo, hi in ranges]
        X = np.concatenate([q[0] for q in parts]) if parts else np.empty((0, self.d), np.float32)
        y = np.concatenate([q[1] for q in parts]) if parts else np.empty(0, np.float32)
        bounds = np.array(ranges, np.int64).reshape(-1, 2)
        return X, y, float(ranges_fingerprint(bounds[:, 0].copy(), bounds[:, 1].copy()))

    def close(self) -> None:
        self._f.close()


def open_windows(run: Trainer, on_root: Callable[[Any, Callable[[], Any]], Any]) -> None:
    """Set ``run``'s data to lag windows: count, width, training reader, this rank's validation windows, order.

    ``on_root(comm, fn)`` runs ``fn`` on rank 0 and broadcasts its result or BadInput (the trainer's).
    """
    from fleetmpi.engine.data import SampleOrder
    sp = run.spec
    lags = sp.lags
    assert lags is not None
    path = sp.data_path(sp.data.train)
    info: SeriesInfo = on_root(run.comm, lambda: describe_series(path, lags, sp.data.valid_tail, check=False))
    run.task, run.n, run.d, run.classes = "regression", info.n_train, lags, None
    run.reader = WindowReader(info)
    run.valid_xy = None
    run.n_valid = info.n_valid
    if info.n_valid:
        vr = WindowReader(info, valid=True)
        run.valid_xy = vr.read_contiguous(*contiguous_share(info.n_valid, run.rank, run.size))
        vr.close()
    run.order = SampleOrder(run.n, sp.optimizer.batch, sp.seed, sp.data.block_rows)
