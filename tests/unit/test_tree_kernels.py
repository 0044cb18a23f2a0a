"""Tree kernels and the serial learner against kernels.tree_reference on random data."""

from __future__ import annotations

import numpy as np
import pytest

from fleetmpi.models.trees import TreeLearner, TreeParams
from kernels import tree_reference as ref
from kernels import trees as K


def _data(seed: int, n: int = 600, d: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, 1] = np.round(X[:, 1] * 2)                  # heavy ties
    X[:, 2] = rng.integers(0, 3, n)                  # fewer distinct values than bins
    y = X[:, 0] + 0.5 * X[:, 3] ** 2 + 0.3 * rng.standard_normal(n).astype(np.float32)
    return X, y.astype(np.float32)


@pytest.mark.parametrize("bins", [2, 5, 16, 255])
def test_cut_points_and_codes_match_reference(bins: int) -> None:
    X, _ = _data(1)
    cuts, ncuts = K.cut_points(X, bins)
    want = ref.cut_points(X, bins)
    for f, c in enumerate(want):
        assert ncuts[f] == c.size <= bins - 1
        assert np.array_equal(cuts[f, : ncuts[f]], c)
        assert np.all(np.diff(c) > 0)
    assert np.array_equal(K.bin_rows(X, cuts, ncuts), ref.bin_rows(X, want))
    # The sample's row order does not matter.
    again, _ = K.cut_points(X[np.random.default_rng(2).permutation(X.shape[0])], bins)
    assert np.array_equal(again, cuts)


def test_binning_edge_cases() -> None:
    X = np.array([[3.0, 1.0, 0.5], [3.0, 2.0, 0.5], [3.0, 2.0, 0.7], [3.0, 5.0, 0.7]], np.float32)
    cuts, ncuts = K.cut_points(X, 8)
    assert ncuts.tolist() == [0, 2, 1]                           # constant; 3 distinct; 2 distinct
    assert cuts[1, :2].tolist() == [1.0, 2.0]
    codes = K.bin_rows(X, cuts, ncuts)
    assert codes.tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 1], [0, 2, 1]]
    # Below every cut -> bin 0, above every cut -> the last bin, on an exact cut -> its bin.
    Z = np.array([[-1e30, -7.0, 0.1], [1e30, 99.0, 9.0], [3.0, 2.0, 0.5]], np.float32)
    assert K.bin_rows(Z, cuts, ncuts).tolist() == [[0, 0, 0], [0, 2, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="row 1, feature 2 is NaN"):
        K.bin_rows(np.array([[0, 0, 0], [0, 0, np.nan]], np.float32), cuts, ncuts)
    with pytest.raises(ValueError, match=r"bins must be in 2\.\.256"):
        K.cut_points(X, 257)
    with pytest.raises(ValueError, match="finite"):
        K.cut_points(np.array([[np.inf]], np.float32), 4)


def test_histograms_and_subtraction_match_reference() -> None:
    X, _ = _data(3)
    cuts, ncuts = K.cut_points(X, 32)
    codes = K.bin_rows(X, cuts, ncuts)
    foff = K.feature_offsets(ncuts)
    rng = np.random.default_rng(4)
    gq = rng.integers(-(2**40), 2**40, X.shape[0])
    hq = rng.integers(1, 2**40, X.shape[0])
    order = rng.permutation(X.shape[0]).astype(np.int32)
    starts, counts = np.array([0, 250], np.int64), np.array([250, 350], np.int64)
    hist = K.build_histograms(codes, gq, hq, order, starts, counts, foff)
    nbins = [int(c) + 1 for c in ncuts]
    for j in range(2):
        want = ref._hist(codes, gq, hq, order[starts[j]:starts[j] + counts[j]], nbins)
        assert np.array_equal(hist[j], np.concatenate(want))
    whole = K.build_histograms(codes, gq, hq, order, np.zeros(1, np.int64), np.full(1, 600, np.int64), foff)[0]
    assert np.array_equal(whole - hist[0], hist[1])              # the sibling by subtraction is exact


def _quantized(g: np.ndarray, h: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    sg = K.fixed_scale(float(np.abs(g).max()), n)
    sh = K.fixed_scale(float(h.max()), n)
    return K.quantize(g, sg), K.quantize(h, sh), 1.0 / sg, 1.0 / sh


@pytest.mark.parametrize(("task", "bins"), [("regression", 32), ("binary", 32), ("multiclass", 32),
                                           ("binary", 255), ("multiclass", 255)])
def test_learner_matches_reference(task: str, bins: int) -> None:
    # 255 bins: features with 32+ cuts take the split scan's SIMD path, the rest its scalar one.
    X, yr = _data(5, n=800)
    y = {"regression": yr, "binary": (yr > 0.5).astype(np.float32),
         "multiclass": np.digitize(yr, [0.0, 1.0]).astype(np.float32)}[task]
    p = TreeParams(task=task, classes=3, trees=3, depth=4, learning_rate=0.3, bins=bins, l2=0.7,
                   min_child_weight=2.0)
    cuts, ncuts = K.cut_points(X, p.bins)
    codes = K.bin_rows(X, cuts, ncuts)
    learner = TreeLearner(p, cuts, ncuts)
    pred = np.tile(learner.init_base(y), (X.shape[0], 1))
    want_pred = pred.copy()
    nbins = [int(c) + 1 for c in ncuts]
    for _ in range(p.trees):
        before = len(learner.ensemble.trees)
        learner.fit_round(codes, y, pred, np.arange(X.shape[0]))
        if task == "multiclass":
            _, g, h = K.grad_softmax(want_pred.copy(), y)
        else:
            fn = K.grad_squared if task == "regression" else K.grad_logistic
            _, g1, h1 = fn(want_pred[:, 0].copy(), y)
            g, h = g1[None], h1[None]
        for c in range(p.outputs):
            gq, hq, ig, ih = _quantized(g[c], h[c], X.shape[0])
            tree, row_value = ref.grow_tree(codes, gq, hq, nbins, p.depth, ig, ih, p.l2, p.min_child_weight,
                                            p.learning_rate)
            got = learner.ensemble.trees[before + c]
            assert (got["feature"] >= 0).sum() >= 3, "the tree should split a few times"
            for name, arr in tree.items():
                assert np.array_equal(got[name], arr), f"{name} of tree {before + c} differs from the reference"
            want_pred[:, c] += row_value
        assert np.array_equal(pred, want_pred)
    # Raw float rows through the flat ensemble land in the same leaves as their codes.
    assert np.array_equal(learner.ensemble.raw(X), pred)


@pytest.mark.parametrize("rows", [600, 40, 5])
def test_best_splits_match_reference_on_dense_and_sparse_histograms(rows: int) -> None:
    # Few rows leave most of 255 bins empty; min_child_weight rules out cuts near both ends.
    X, _ = _data(11, n=600, d=6)
    X[:, 4] = np.random.default_rng(12).integers(0, 40, 600)     # 40 distinct values: SIMD with ties
    cuts, ncuts = K.cut_points(X, 255)
    codes = K.bin_rows(X, cuts, ncuts)
    foff = K.feature_offsets(ncuts)
    nbins = [int(c) + 1 for c in ncuts]
    rng = np.random.default_rng(rows)
    for trial in range(5):
        gq = rng.integers(-(2**40), 2**40, 600)
        hq = rng.integers(0, 2**40, 600)
        order = rng.permutation(600).astype(np.int32)
        hist = K.build_histograms(codes, gq, hq, order, np.zeros(1, np.int64), np.full(1, rows, np.int64), foff)
        sel = order[:rows]
        G, H = np.array([gq[sel].sum()]), np.array([hq[sel].sum()])
        mask = rng.random(6) < 0.8 if trial else np.ones(6, np.bool_)
        for mcw in (0.0, 1.5):
            f, t, gain, lg, lh = K.best_splits(hist, G, H, foff, mask[None], 2.0**-40, 2.0**-40, 0.5, mcw)
            want = ref._best(ref._hist(codes, gq, hq, sel, nbins), int(G[0]), int(H[0]), mask, 2.0**-40,
                             2.0**-40, 0.5, mcw)
            assert (int(f[0]), int(t[0]), int(lg[0]), int(lh[0])) == want, (trial, mcw)
            assert (f[0] >= 0) == (gain[0] > 0)


def test_one_split_by_hand() -> None:
    # y = 0, 0, 1, 1 at x = 1..4; base = mean 0.5, so g = .5, .5, -.5, -.5 and h = 1.
    # Split x <= 2: GL = 1, HL = 2, GR = -1, HR = 2; with l2 = 1 the gain is
    # 1/3 + 1/3 - 0 = 2/3 (any other cut gains less) and the leaves are -GL/(HL+l2) * lr
    # = -1/3 * 0.6 = -0.2 and +0.2.
    X = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    y = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    p = TreeParams(task="regression", trees=1, depth=1, learning_rate=0.6, bins=4, l2=1.0, min_child_weight=0.0)
    cuts, ncuts = K.cut_points(X, p.bins)
    assert cuts[0].tolist() == [1.0, 2.0, 3.0]
    learner = TreeLearner(p, cuts, ncuts)
    assert learner.init_base(y).tolist() == [0.5]
    pred = np.full((4, 1), 0.5)
    learner.fit_round(K.bin_rows(X, cuts, ncuts), y, pred, np.arange(4))
    tree = learner.ensemble.trees[0]
    assert tree["feature"].tolist() == [0, -1, -1]
    assert tree["bin"][0] == 1 and tree["threshold"][0] == 2.0
    assert np.allclose(tree["value"], [0.0, -0.2, 0.2], rtol=0, atol=1e-15)
    assert np.allclose(pred[:, 0], [0.3, 0.3, 0.7, 0.7], rtol=0, atol=1e-15)
    hist = K.build_histograms(K.bin_rows(X, cuts, ncuts), np.array([2, 2, -2, -2]), np.array([4, 4, 4, 4]),
                              np.arange(4, dtype=np.int32), np.zeros(1, np.int64), np.full(1, 4, np.int64),
                              K.feature_offsets(ncuts))
    f, t, gain, _, _ = K.best_splits(hist, np.array([0]), np.array([16]), K.feature_offsets(ncuts),
                                     np.ones((1, 1), np.bool_), 0.25, 0.25, 1.0, 0.0)
    assert (f[0], t[0]) == (0, 1) and abs(gain[0] - 2.0 / 3.0) < 1e-15


def test_ties_go_to_the_lowest_feature_and_bin() -> None:
    # Features 0 and 2 are copies: equal gains everywhere, the split must name feature 0.
    X, y = _data(7, n=300, d=4)
    X[:, 2] = X[:, 0]
    cuts, ncuts = K.cut_points(X, 16)
    codes = K.bin_rows(X, cuts, ncuts)
    foff = K.feature_offsets(ncuts)
    _, g, h = K.grad_squared(np.zeros(300), y)
    gq, hq, ig, ih = _quantized(g, h, 300)
    hist = K.build_histograms(codes, gq, hq, np.arange(300, dtype=np.int32), np.zeros(1, np.int64),
                              np.full(1, 300, np.int64), foff)
    mask = np.array([[True, False, True, False]])
    f, t, _, _, _ = K.best_splits(hist, np.array([gq.sum()]), np.array([hq.sum()]), foff, mask, ig, ih, 1.0, 1.0)
    assert f[0] == 0
    mask[0, 0] = False
    f2, t2, _, _, _ = K.best_splits(hist, np.array([gq.sum()]), np.array([hq.sum()]), foff, mask, ig, ih, 1.0, 1.0)
    assert (f2[0], t2[0]) == (2, t[0])


def test_state_round_trip_and_kinds() -> None:
    X, yr = _data(9, n=400)
    y = (yr > 0.5).astype(np.float32)
    for kind in ("gbdt", "forest", "tree"):
        p = TreeParams(kind=kind, task="binary", trees=4, depth=3, bins=16, row_sample=0.7, col_sample=0.6, seed=3)
        cuts, ncuts = K.cut_points(X, p.bins)
        learner = TreeLearner(p, cuts, ncuts)
        pred = np.tile(learner.init_base(y), (400, 1))
        codes = K.bin_rows(X, cuts, ncuts)
        losses = [learner.fit_round(codes, y, pred, np.arange(400)) for _ in range(2 if kind != "tree" else 1)]
        if kind == "gbdt":
            assert losses[1] < losses[0]
        back = type(learner.ensemble).from_state(learner.ensemble.state(), "binary")
        assert back.rounds == learner.ensemble.rounds
        assert np.array_equal(back.raw(X), pred)
        prob = back.predict(X)
        assert np.all((prob > 0) & (prob < 1))
        assert np.mean((prob > 0.5) == (y > 0.5)) > 0.6
