"""kernels.gpu_trees against kernels.trees' CPU histogram kernels, bit for bit, on random data.

Runs where numba sees a CUDA device: under the simulator (tests/gpu/test_gpu_kernels.py runs
this folder with NUMBA_ENABLE_CUDASIM=1) and on a real GPU. Sizes stay small (a few hundred
rows): the simulator runs every thread of a block as a Python thread.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from kernels import gpu_trees as G
from kernels import trees as T

pytestmark = pytest.mark.skipif(
    not cuda.is_available(),
    reason="no CUDA GPU visible (numba.cuda.is_available() is False without the simulator); "
           "tests/gpu/test_gpu_kernels.py runs this module with NUMBA_ENABLE_CUDASIM=1")

METHODS = ["shared", "global"]


def _problem(n: int, d: int, bins: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (codes, gh, foff): rows binned by cut points, features of varied bin counts, g/h of both signs."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((max(n, 1), d)).astype(np.float32)
    for f in range(d):                 # a few distinct values, a constant, continuous: bin counts differ
        if f % 3 == 1:
            X[:, f] = rng.integers(0, 1 + f, X.shape[0])
        elif f % 5 == 4:
            X[:, f] = 2.5
    cuts, ncuts = T.cut_points(X, bins)
    codes = T.bin_rows(X[:n], cuts, ncuts)
    # Both signs, magnitudes near 2**50: n of them sum far from int64's limits, and an
    # order-dependent float sum would show.
    gh = rng.integers(-(2**50), 2**50, (n, 2), dtype=np.int64)
    return codes, gh, T.feature_offsets(ncuts)


def _segments(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (order, starts, counts): a permutation cut into k random segments, some empty, not all rows used."""
    rng = np.random.default_rng(seed + 100)
    order = rng.permutation(n).astype(np.int32)
    cuts = np.sort(rng.integers(0, n + 1, 2 * k))
    starts, ends = cuts[0::2].copy(), cuts[1::2].copy()
    if k > 1:
        ends[1] = starts[1]             # an empty segment, whatever the draw
    return order, starts.astype(np.int64), (ends - starts).astype(np.int64)


def _gpu_root(codes: np.ndarray, gh: np.ndarray, foff: np.ndarray, method: str) -> np.ndarray:
    return G.build_root(cuda.to_device(codes), cuda.to_device(gh), G.Layout(foff), method=method).copy_to_host()


def _gpu_segments(codes: np.ndarray, gh: np.ndarray, foff: np.ndarray, order: np.ndarray, starts: np.ndarray,
                  counts: np.ndarray, method: str, out: np.ndarray | None = None) -> np.ndarray:
    dout = None if out is None else cuda.to_device(out)
    got = G.build_histograms(cuda.to_device(codes), cuda.to_device(gh), cuda.to_device(order), cuda.to_device(starts),
                             cuda.to_device(counts), G.Layout(foff), out=dout, method=method)
    return got.copy_to_host()


def _cpu_segments(codes: np.ndarray, gh: np.ndarray, foff: np.ndarray, order: np.ndarray, starts: np.ndarray,
                  counts: np.ndarray) -> np.ndarray:
    return T.build_histograms(codes, gh[:, 0].copy(), gh[:, 1].copy(), order, starts, counts, foff)


# ------------------------------------------------------------------ equal to the CPU


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "d", "bins", "seed"), [(300, 7, 32, 0), (257, 3, 255, 1)])
def test_root_histogram_is_the_cpu_one(n: int, d: int, bins: int, seed: int, method: str) -> None:
    codes, gh, foff = _problem(n, d, bins, seed)
    want = T.build_root(codes, gh, foff)
    got = _gpu_root(codes, gh, foff, method)
    assert got.dtype == np.int64 and got.shape == want.shape == (1, foff[-1], 2)
    assert np.array_equal(got, want)
    assert (want[..., 1] < 0).any() and (want[..., 0] > 0).any()   # sums of both signs occur


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "d", "k", "seed"), [(300, 6, 5, 2), (120, 9, 1, 3)])
def test_segment_histograms_are_the_cpu_ones(n: int, d: int, k: int, seed: int, method: str) -> None:
    codes, gh, foff = _problem(n, d, 40, seed)
    order, starts, counts = _segments(n, k, seed)
    want = _cpu_segments(codes, gh, foff, order, starts, counts)
    # The out buffer starts as garbage: every entry is overwritten.
    garbage = np.full(want.shape, -7, np.int64)
    got = _gpu_segments(codes, gh, foff, order, starts, counts, method, out=garbage)
    assert np.array_equal(got, want)
    if k > 1:
        assert counts[1] == 0 and not got[1].any()


@pytest.mark.parametrize("method", METHODS)
def test_overlapping_and_repeated_segments(method: str) -> None:
    # build_histograms sums any segments: the same rows twice, a sibling and its parent.
    codes, gh, foff = _problem(90, 4, 16, 4)
    order = np.random.default_rng(4).permutation(90).astype(np.int32)
    starts, counts = np.array([0, 0, 30, 0], np.int64), np.array([90, 30, 60, 90], np.int64)
    got = _gpu_segments(codes, gh, foff, order, starts, counts, method)
    assert np.array_equal(got, _cpu_segments(codes, gh, foff, order, starts, counts))
    assert np.array_equal(got[1] + got[2], got[0]) and np.array_equal(got[3], got[0])


def test_max_bins_spill_over_one_shared_group() -> None:
    # 13 features of MAX_BINS bins: 3328 bins, more than one shared histogram holds, so the
    # shared kernel runs two feature groups; "auto" picks the global kernel.
    rng = np.random.default_rng(5)
    n, d = 200, 13
    foff = T.feature_offsets(np.full(d, T.MAX_BINS - 1, np.int32))
    layout = G.Layout(foff)
    assert layout.groups.tolist() == [0, 12, 13] and layout.method("auto") == "global"
    codes = rng.integers(0, T.MAX_BINS, (n, d), dtype=np.uint8)
    codes[:3] = T.MAX_BINS - 1                  # the last bin of every feature is used
    gh = rng.integers(-(2**40), 2**40, (n, 2), dtype=np.int64)
    want = T.build_root(codes, gh, foff)
    for method in METHODS:
        assert np.array_equal(_gpu_root(codes, gh, foff, method), want), method
    order, starts, counts = _segments(n, 3, 5)
    assert np.array_equal(_gpu_segments(codes, gh, foff, order, starts, counts, "shared"),
                          _cpu_segments(codes, gh, foff, order, starts, counts))


@pytest.mark.parametrize("method", METHODS)
def test_many_blocks_per_node(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 rows a block: 300 rows spread over 19 blocks at the root and chunks of a segment.
    monkeypatch.setattr(G, "ROWS_PER_BLOCK", 16)
    codes, gh, foff = _problem(300, 5, 20, 6)
    assert np.array_equal(_gpu_root(codes, gh, foff, method), T.build_root(codes, gh, foff))
    order, starts, counts = _segments(300, 2, 6)
    assert np.array_equal(_gpu_segments(codes, gh, foff, order, starts, counts, method),
                          _cpu_segments(codes, gh, foff, order, starts, counts))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "d"), [(0, 4), (1, 4), (150, 1), (1, 1)])
def test_edge_sizes(n: int, d: int, method: str) -> None:
    codes, gh, foff = _problem(n, d, 8, 7)
    assert np.array_equal(_gpu_root(codes, gh, foff, method), T.build_root(codes, gh, foff))
    order = np.arange(n, dtype=np.int32)
    starts, counts = np.array([0, 0], np.int64), np.array([n, 0], np.int64)
    assert np.array_equal(_gpu_segments(codes, gh, foff, order, starts, counts, method),
                          _cpu_segments(codes, gh, foff, order, starts, counts))


def test_no_nodes_gives_an_empty_histogram() -> None:
    codes, gh, foff = _problem(10, 2, 4, 8)
    empty = np.zeros(0, np.int64)
    got = _gpu_segments(codes, gh, foff, np.arange(10, dtype=np.int32), empty, empty, "auto")
    assert got.shape == (0, foff[-1], 2)


# ------------------------------------------------------------------ bad input


def test_corrupt_rows_raise_instead_of_writing_outside() -> None:
    codes, gh, foff = _problem(40, 3, 8, 9)
    order = np.arange(40, dtype=np.int32)
    one, forty = np.array([1], np.int64), np.array([40], np.int64)
    for method in METHODS:
        with pytest.raises(ValueError, match="a segment lies outside order"):
            _gpu_segments(codes, gh, foff, order, one, forty, method)          # rows 1..40 of 40
        bad_order = order.copy()
        bad_order[5] = 40
        with pytest.raises(ValueError, match="an order entry outside codes' rows"):
            _gpu_segments(codes, gh, foff, bad_order, np.array([0], np.int64), forty, method)
        bad_codes = codes.copy()
        bad_codes[3, 2] = foff[3] - foff[2]                                    # one past the last bin
        with pytest.raises(ValueError, match="a code beyond its feature's bins"):
            _gpu_root(bad_codes, gh, foff, method)


def test_launchers_check_arrays_and_layout() -> None:
    codes, gh, foff = _problem(20, 3, 8, 10)
    layout = G.Layout(foff)
    dcodes, dgh = cuda.to_device(codes), cuda.to_device(gh)
    with pytest.raises(TypeError, match="codes must be a device array"):
        G.build_root(codes, dgh, layout)
    with pytest.raises(TypeError, match="codes must have dtype uint8"):
        G.build_root(cuda.to_device(codes.astype(np.int32)), dgh, layout)
    with pytest.raises(ValueError, match=r"gh must have shape \(20, 2\)"):
        G.build_root(dcodes, cuda.to_device(gh[:19]), layout)
    with pytest.raises(ValueError, match=r"codes must have shape \(\*, 3\)"):
        G.build_root(cuda.to_device(codes[:, :2].copy()), dgh, layout)
    with pytest.raises(ValueError, match="out must have shape"):
        G.build_root(dcodes, dgh, layout, out=cuda.device_array((2, int(foff[-1]), 2), np.int64))
    with pytest.raises(TypeError, match="order must have dtype int32"):
        G.build_histograms(dcodes, dgh, cuda.to_device(np.arange(20)), cuda.to_device(np.zeros(1, np.int64)),
                           cuda.to_device(np.ones(1, np.int64)), layout)
    with pytest.raises(ValueError, match="method must be auto, shared or global"):
        G.build_root(dcodes, dgh, layout, method="atomic")
    for bad in (foff.astype(np.int32), foff[::-1].copy(), np.array([0], np.int64), foff + 1):
        with pytest.raises(ValueError, match="foff must be"):
            G.Layout(bad)


def test_feature_groups_hold_at_most_the_shared_bins() -> None:
    rng = np.random.default_rng(11)
    foff = T.feature_offsets(rng.integers(0, T.MAX_BINS, 60).astype(np.int32))
    groups = G.feature_groups(foff)
    assert groups[0] == 0 and groups[-1] == 60 and (np.diff(groups) >= 1).all()
    widths = foff[groups[1:]] - foff[groups[:-1]]
    assert widths.max() <= G.SMEM_BINS
    # Greedy: a group ends only where its next feature would not fit.
    assert (widths[:-1] + (foff[groups[1:-1] + 1] - foff[groups[1:-1]]) > G.SMEM_BINS).all()
    assert G.feature_groups(foff, 10**6).tolist() == [0, 60]
