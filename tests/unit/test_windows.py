"""Lag windows of series data: the window map near the train/valid split, the halo, the shares."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from fleetmpi.engine.data import SampleOrder
from fleetmpi.engine.h5rows import row_fingerprint
from fleetmpi.engine.windows import WindowReader, describe_series, tail_points
from fleetmpi.errors import BadInput

T, M, P = 10, 2, 3


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, np.ndarray]:
    s = np.random.default_rng(15).standard_normal((T, M)).astype(np.float32)
    path = tmp_path / "series.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("series", data=s)
    return path, s


def test_training_windows_by_hand_stop_before_the_tail(series: tuple[Path, np.ndarray]) -> None:
    path, s = series
    info = describe_series(path, P, 0.2)       # 0.2 of 10 points: the last 2 are held out
    assert (info.tail, info.per_train, info.n_train, info.n_valid) == (2, 5, 10, 4)
    X, y = WindowReader(info).read_contiguous(0, info.n_train)
    # Column 0 first, targets t = 3..7 (t = 7 is the last before the tail at 8), then column 1.
    want = [(c, t) for c in range(M) for t in range(P, T - 2)]
    for i, (c, t) in enumerate(want):
        np.testing.assert_array_equal(X[i], [s[t - 1, c], s[t - 2, c], s[t - 3, c]])
        assert y[i] == s[t, c]
    assert not any(t >= T - 2 for _, t in want)


def test_validation_windows_take_inputs_from_before_the_tail(series: tuple[Path, np.ndarray]) -> None:
    path, s = series
    info = describe_series(path, P, 2)          # a count of points, as the fraction above
    X, y = WindowReader(info, valid=True).read_contiguous(0, info.n_valid)
    for i, (c, t) in enumerate([(0, 8), (0, 9), (1, 8), (1, 9)]):
        np.testing.assert_array_equal(X[i], [s[t - 1, c], s[t - 2, c], s[t - 3, c]])
        assert y[i] == s[t, c]
    # Window (c, 8) reads points 5, 6, 7: all before the tail.
    assert WindowReader(info, valid=True).spans(0, 1) == [(0, 5, 9)]


def test_a_range_reads_its_points_plus_a_halo_of_p_per_column(series: tuple[Path, np.ndarray]) -> None:
    path, _ = series
    info = describe_series(path, P, 0.2)
    r = WindowReader(info)
    # Windows 3..6: targets 6, 7 of column 0 (halo 3, 4, 5), targets 3, 4 of column 1 (halo 0, 1, 2).
    assert r.spans(3, 7) == [(0, 3, 8), (1, 0, 5)]
    assert r.spans(9, 10) == [(1, 4, 8)]   # the last training window: target 7, points 4..7


def test_read_matches_contiguous_and_fingerprints_windows(series: tuple[Path, np.ndarray]) -> None:
    path, _ = series
    info = describe_series(path, P, 0.2)
    r = WindowReader(info)
    X, y, fp = r.read([(6, 9), (1, 3)])
    Xa, ya = r.read_contiguous(1, 3)
    Xb, yb = r.read_contiguous(6, 9)
    np.testing.assert_array_equal(X, np.concatenate([Xa, Xb]))
    np.testing.assert_array_equal(y, np.concatenate([ya, yb]))
    assert fp == row_fingerprint(1, 3) + row_fingerprint(6, 9)


def test_a_steps_windows_do_not_depend_on_the_rank_count(series: tuple[Path, np.ndarray]) -> None:
    path, _ = series
    info = describe_series(path, P, 0.2)
    r = WindowReader(info)
    order = SampleOrder(info.n_train, 7, seed=4, block_rows=2)
    for step in range(4):
        got = []
        for size in (1, 2, 3):
            parts = [r.read(order.ranges(*order.share(step, k, size))) for k in range(size)]
            got.append((np.sort(np.concatenate([p[1] for p in parts])), sum(p[2] for p in parts)))
        for ys, fp in got[1:]:
            np.testing.assert_array_equal(ys, got[0][0])
            assert fp == got[0][1]


def test_one_column_series(tmp_path: Path) -> None:
    s = np.random.default_rng(2).standard_normal(12).astype(np.float32)
    path = tmp_path / "one.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("series", data=s)
    info = describe_series(path, 2, None)
    X, y = WindowReader(info).read_contiguous(0, info.n_train)
    assert (info.m, info.n_train, info.n_valid) == (1, 10, 0)
    np.testing.assert_array_equal(X[:, 0], s[1:11])
    np.testing.assert_array_equal(X[:, 1], s[0:10])
    np.testing.assert_array_equal(y, s[2:])


def test_tail_points() -> None:
    assert (tail_points(None, 10), tail_points(0.2, 10), tail_points(0.25, 10), tail_points(3, 10)) == (0, 2, 2, 3)


@pytest.mark.parametrize(("lags", "tail", "words"), [
    (10, 0.2, "lags 10 is longer than the series (10 points)"),
    (3, 7, "leaves no training window for lags 3; the tail may hold at most 6 points"),
])
def test_refusals(series: tuple[Path, np.ndarray], lags: int, tail: float, words: str) -> None:
    path, _ = series
    with pytest.raises(BadInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        describe_series(path, lags, tail)
