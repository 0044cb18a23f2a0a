"""Histogram tree kernels: int64 histograms, split search, row partition, one tree level, a tree's leaves.

The pieces follow LightGBM's and XGBoost's hist learners, kept apart so a data-parallel
learner can put one integer Allreduce between histogram build and split finding. Rows
come binned and their gradients rounded to int64 by kernels.tree_rows (re-exported here,
so a learner imports one module):

* ``build_histograms`` fills (nodes, bins, 2) int64 histograms for row segments of a
  partitioned row order; ``best_splits`` scans them (gain with l2 and
  min_child_weight; ties go to the lowest (feature, bin)); ``partition`` splits each
  segment stably into left then right rows. Integer sums make a sibling derived by
  subtraction equal the one built directly.
* ``grow_level`` does one level in one call (split, partition, smaller child's
  histogram); ``finish_tree`` turns the leaves into values and the tree's node arrays.

Every kernel is plain numba, fastmath off: results depend on the inputs only.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.exact import fixed_scale
from kernels.prefetch import prefetch
from kernels.tree_rows import (
    MAX_BINS,
    bin_rows,
    bounds,
    cut_points,
    feature_offsets,
    grad_logistic,
    grad_softmax,
    grad_squared,
    pair,
    predict_raw,
    quantize,
    quantize_pair,
)

__all__ = [
    "best_splits",
    "bin_rows",
    "bounds",
    "build_histograms",
    "build_root",
    "children_histograms",
    "cut_points",
    "feature_offsets",
    "finish_tree",
    "fixed_scale",
    "grad_logistic",
    "grad_softmax",
    "grad_squared",
    "grow_level",
    "node_sums",
    "pair",
    "partition",
    "predict_raw",
    "quantize",
    "quantize_pair",
    "root_level",
    "warmup",
]

SIMD_CUTS = 32          # a feature's split scan vectorises its gains from this many cuts on
LEVEL_ROWS = 6          # a level array's rows: node id, order start, count, gq sum, hq sum, hist row
PREFETCH_ROWS = 16      # rows ahead whose codes and g/h are requested while this row is summed


# --------------------------------------------------------------------------- histograms


@njit(cache=True, nogil=True)
def _add_row(hist: np.ndarray, row: np.ndarray, foff: np.ndarray, g: np.int64, h: np.int64) -> None:
    # One row into a flat [bin][g, h] histogram: both sums of a bin share a cache line.
    for f in range(row.shape[0]):
        b = 2 * (foff[f] + np.int64(row[f]))
        hist[b] += g
        hist[b + 1] += h


@njit(cache=True, nogil=True)
def _build_gh(codes: np.ndarray, gh: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray,
              foff: np.ndarray, out: np.ndarray) -> None:
    for j in range(starts.shape[0]):
        hist = out[j].reshape(-1)
        for p in range(starts[j], starts[j] + counts[j]):
            i = order[p]
            _add_row(hist, codes[i], foff, gh[i, 0], gh[i, 1])


@njit(cache=True, nogil=True)
def _build_all(codes: np.ndarray, gh: np.ndarray, foff: np.ndarray, out: np.ndarray) -> None:
    hist = out.reshape(-1)
    for i in range(codes.shape[0]):
        _add_row(hist, codes[i], foff, gh[i, 0], gh[i, 1])


def build_histograms(codes: np.ndarray, gq: np.ndarray, hq: np.ndarray, order: np.ndarray,
                     starts: np.ndarray, counts: np.ndarray, foff: np.ndarray) -> np.ndarray:
    """Return (len(starts), total bins, 2) int64 sums of (gq, hq) over each order segment's rows."""
    out = np.zeros((starts.shape[0], int(foff[-1]), 2), dtype=np.int64)
    _build_gh(codes, pair(gq, hq), order, starts, counts, foff, out)
    return out


def build_root(codes: np.ndarray, gh: np.ndarray, foff: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return the (1, total bins, 2) int64 histogram of every row of codes with gh (n, 2) sums.

    out, when given, is a reused buffer whose first node receives it.
    """
    out = np.empty((1, int(foff[-1]), 2), dtype=np.int64) if out is None else out[:1]
    out[:] = 0
    _build_all(codes, gh, foff, out)
    return out


def node_sums(hist: np.ndarray, foff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return each node's (gq, hq) sums of hist (k, bins, 2): its first feature's bins add up to them."""
    s = hist[:, foff[0]:foff[1]].sum(axis=1)
    return s[:, 0], s[:, 1]


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gain(gl: np.int64, hl: np.int64, gsum: np.int64, hsum: np.int64, inv_g: float, inv_h: float, l2: float,
          mcw: float, parent: float) -> float:
    # A cut leaving either child below min_child_weight scores -inf (hessians are >= 0), as
    # does one dividing by zero (l2 = 0 and an all-zero hessian side): numpy's error model
    # (no ZeroDivisionError branch, which kept the loop scalar) would make that gain inf.
    HL = hl * inv_h
    HR = (hsum - hl) * inv_h
    GL = gl * inv_g
    GR = (gsum - gl) * inv_g
    s = GL * GL / (HL + l2) + GR * GR / (HR + l2) - parent
    return s if (HL >= mcw) & (HR >= mcw) & (HL + l2 > 0.0) & (HR + l2 > 0.0) else -np.inf


@njit(cache=True, nogil=True, error_model="numpy")
def _best_one(hist: np.ndarray, gsum: np.int64, hsum: np.int64, foff: np.ndarray, cm: np.ndarray, inv_g: float,
              inv_h: float, l2: float, mcw: float, cg: np.ndarray, ch: np.ndarray, at: np.ndarray, gain: np.ndarray
              ) -> tuple[int, int, float, int, int]:
    # cg, ch, at (int64) and gain (float64) are scratch of at least MAX_BINS. A feature's scan
    # runs in three loops so that the middle one (two divisions a cut) has no branch and no
    # carried sum and compiles to SIMD: the sequential scan's per-cut division latency was
    # most of a small node's time. The result is the sequential scan's: the same gains, the
    # first strict maximum. An empty bin repeats the previous cut's gain, so it never wins
    # and is left out of the packed running sums.
    G = gsum * inv_g
    H = hsum * inv_h
    parent = G * G / (H + l2)
    best = 0.0
    bf, bt, bl, bh = -1, -1, 0, 0
    for f in range(foff.shape[0] - 1):
        if not cm[f]:
            continue
        lo = foff[f]
        m = foff[f + 1] - 1 - lo            # cuts: every bin but the last
        gl = 0
        hl = 0
        if m < SIMD_CUTS:                   # too few for SIMD to pay its set-up: one scalar loop
            for b in range(m):
                dg = hist[lo + b, 0]
                dh = hist[lo + b, 1]
                if dg == 0 and dh == 0:
                    continue
                gl += dg
                hl += dh
                if (hsum - hl) * inv_h < mcw:
                    break                   # the right child's hessian only shrinks from here on
                if hl * inv_h < mcw:
                    continue
                s = _gain(gl, hl, gsum, hsum, inv_g, inv_h, l2, mcw, parent)
                if s > best:
                    best = s
                    bf = f
                    bt = b
                    bl = gl
                    bh = hl
            continue
        k = 0
        for b in range(m):                  # running sums at the non-empty bins, packed
            dg = hist[lo + b, 0]
            dh = hist[lo + b, 1]
            if dg == 0 and dh == 0:
                continue
            gl += dg
            hl += dh
            if (hsum - hl) * inv_h < mcw:
                break                       # the right child's hessian only shrinks from here on
            cg[k] = gl
            ch[k] = hl
            at[k] = b
            k += 1
        for c in range(k):
            gain[c] = _gain(cg[c], ch[c], gsum, hsum, inv_g, inv_h, l2, mcw, parent)
        for c in range(k):
            if gain[c] > best:
                best = gain[c]
                bf = f
                bt = at[c]
                bl = cg[c]
                bh = ch[c]
    return bf, bt, best, bl, bh


@njit(cache=True, nogil=True)
def _best_splits(hist: np.ndarray, gsum: np.ndarray, hsum: np.ndarray, foff: np.ndarray, colmask: np.ndarray,
                 inv_g: float, inv_h: float, l2: float, mcw: float, feat: np.ndarray, thr: np.ndarray,
                 gain: np.ndarray, lg: np.ndarray, lh: np.ndarray) -> None:
    cg, ch, at, work = (np.empty(MAX_BINS, np.int64), np.empty(MAX_BINS, np.int64), np.empty(MAX_BINS, np.int64),
                         np.empty(MAX_BINS))
    for j in range(hist.shape[0]):
        cm = colmask[j if colmask.shape[0] > 1 else 0]
        feat[j], thr[j], gain[j], lg[j], lh[j] = _best_one(hist[j], gsum[j], hsum[j], foff, cm, inv_g, inv_h, l2,
                                                           mcw, cg, ch, at, work)


def best_splits(hist: np.ndarray, gsum: np.ndarray, hsum: np.ndarray, foff: np.ndarray, colmask: np.ndarray,
                inv_g: float, inv_h: float, l2: float, min_child_weight: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return per node (feature or -1, threshold bin, gain, left gq sum, left hq sum) of the best split.

    A split sends codes <= threshold bin left; its gain is GL^2/(HL+l2) + GR^2/(HR+l2) -
    G^2/(H+l2) with both children's hessian at least min_child_weight; only a positive
    gain splits, and equal gains go to the lowest (feature, bin). Hessian sums must be
    non-negative (the scan of a feature stops where the right child's falls short).
    """
    k = hist.shape[0]
    feat = np.empty(k, np.int32)
    thr = np.empty(k, np.int32)
    gain = np.empty(k)
    lg = np.empty(k, np.int64)
    lh = np.empty(k, np.int64)
    _best_splits(hist, gsum, hsum, foff, colmask, float(inv_g), float(inv_h), float(l2), float(min_child_weight),
                 feat, thr, gain, lg, lh)
    return feat, thr, gain, lg, lh


@njit(cache=True, nogil=True)
def _partition(codes: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray, feat: np.ndarray,
               thr: np.ndarray, nleft: np.ndarray, tmp: np.ndarray) -> None:
    for j in range(starts.shape[0]):
        f = feat[j]
        if f < 0:
            nleft[j] = counts[j]
            continue
        s = starts[j]
        t = thr[j]
        nl = 0
        nr = 0
        for p in range(s, s + counts[j]):
            i = order[p]
            if codes[i, f] <= t:
                order[s + nl] = i        # s + nl <= p: never overwrites an unread row
                nl += 1
            else:
                tmp[nr] = i
                nr += 1
        for r in range(nr):
            order[s + nl + r] = tmp[r]
        nleft[j] = nl


def partition(codes: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray, feat: np.ndarray,
              thr: np.ndarray) -> np.ndarray:
    """Split each segment of order in place, stably, into rows with code <= thr then the rest; return left counts."""
    nleft = np.empty(starts.shape[0], np.int64)
    tmp = np.empty(int(counts.max()) if counts.size else 0, order.dtype)
    _partition(codes, order, starts, counts, feat, thr, nleft, tmp)
    return nleft


@njit(cache=True, nogil=True)
def _splittable(hq: np.int64, inv_h: float, mcw: float) -> bool:
    # Two children need HL, HR >= mcw, so H >= 2 mcw; HL + HR may round 2**-52 above H
    # (int64 -> float64), hence the margin: a node this rejects could never split.
    return bool(hq * inv_h >= 2.0 * mcw * (1.0 - 1e-12))


@njit(cache=True, nogil=True)
def _grow_level(codes: np.ndarray, gh: np.ndarray, order: np.ndarray, tmp: np.ndarray, hist: np.ndarray,
                level: np.ndarray, foff: np.ndarray, colmask: np.ndarray, inv_g: float, inv_h: float, l2: float,
                mcw: float, build: bool, tnode: np.ndarray, gain_out: np.ndarray, nodes: int, leaves: np.ndarray,
                nleaves: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    # Few array arguments and results: each costs the call from Python a few hundred ns.
    ids, starts, counts, gs, hs, hrow = level[0], level[1], level[2], level[3], level[4], level[5]
    feature, tbin, left, right = tnode[0], tnode[1], tnode[2], tnode[3]
    k = ids.shape[0]
    d = codes.shape[1]
    feat = np.empty(k, np.int64)
    thr = np.empty(k, np.int64)
    lg = np.empty(k, np.int64)
    lh = np.empty(k, np.int64)
    gsplit = np.empty(k, np.float64)
    nsplit = 0
    nbuilt = 0
    cg, ch, at, work = (np.empty(MAX_BINS, np.int64), np.empty(MAX_BINS, np.int64), np.empty(MAX_BINS, np.int64),
                         np.empty(MAX_BINS))
    for j in range(k):
        feat[j] = -1
        if not _splittable(hs[j], inv_h, mcw):
            continue                   # its histogram was never made (see need below)
        cm = colmask[j if colmask.shape[0] > 1 else 0]
        feat[j], thr[j], gsplit[j], lg[j], lh[j] = _best_one(hist[hrow[j]], gs[j], hs[j], foff, cm, inv_g, inv_h, l2, mcw,
                                                              cg, ch, at, work)
        if feat[j] >= 0:
            nsplit += 1
            if build and (_splittable(lh[j], inv_h, mcw) or _splittable(hs[j] - lh[j], inv_h, mcw)):
                nbuilt += 1
    children = np.empty((LEVEL_ROWS, 2 * nsplit), np.int64)
    c_ids, c_starts, c_counts, c_gs, c_hs, c_hrow = (children[0], children[1], children[2], children[3],
                                                     children[4], children[5])
    c_hrow[:] = -1
    links = np.empty((2, nbuilt), np.int64)
    parent, need = links[0], links[1]
    built = out[:nbuilt]
    built[:] = 0
    q = 0
    b = 0
    for j in range(k):
        node = ids[j]
        s = starts[j]
        n = counts[j]
        if feat[j] < 0:
            leaves[nleaves, 0] = node
            leaves[nleaves, 1] = s
            leaves[nleaves, 2] = n
            leaves[nleaves, 3] = gs[j]
            leaves[nleaves, 4] = hs[j]
            nleaves += 1
            continue
        f = feat[j]
        t = thr[j]
        li = nodes + 2 * q
        feature[node] = f
        tbin[node] = t
        left[node] = li
        right[node] = li + 1
        gain_out[node] = gsplit[j]
        # Build the child with the smaller global hessian (every rank agrees on it) while
        # its rows pass through the partition; the sibling is the parent minus it.
        go = 0 if lh[j] <= hs[j] - lh[j] else 1
        # A child that cannot split never has its histogram read: when neither can, none
        # is built (nor summed over ranks); bit 1 of want: the built child, bit 2: its sibling.
        want = 0
        if build:
            want = (1 if _splittable(lh[j] if go == 0 else hs[j] - lh[j], inv_h, mcw) else 0) \
                + (2 if _splittable(hs[j] - lh[j] if go == 0 else lh[j], inv_h, mcw) else 0)
        nl = 0
        nr = 0
        # The node's rows are scattered over codes: request rows PREFETCH_ROWS ahead (as
        # LightGBM does) so their cache misses overlap the histogram updates.
        end = s + n
        if want:
            hb = built[b].reshape(-1)
            for p in range(s, end):
                if p + PREFETCH_ROWS < end:
                    ia = np.int64(order[p + PREFETCH_ROWS])
                    prefetch(codes, ia * d)            # codes: uint8, one byte an element
                    prefetch(codes, ia * d + d - 1)
                    prefetch(gh, ia * 2)               # gh: (n, 2) int64, the row's quantized g and h
                i = order[p]
                row = codes[i]
                side = 0 if row[f] <= t else 1
                if side == 0:
                    order[s + nl] = i        # s + nl <= p: never overwrites an unread row
                    nl += 1
                else:
                    tmp[nr] = i
                    nr += 1
                if side == go:
                    _add_row(hb, row, foff, gh[i, 0], gh[i, 1])
        else:
            for p in range(s, end):
                if p + PREFETCH_ROWS < end:
                    prefetch(codes, np.int64(order[p + PREFETCH_ROWS]) * d + f)
                i = order[p]
                if codes[i, f] <= t:
                    order[s + nl] = i
                    nl += 1
                else:
                    tmp[nr] = i
                    nr += 1
        for r in range(nr):
            order[s + nl + r] = tmp[r]
        for c in range(2):
            c_ids[2 * q + c] = li + c
        c_starts[2 * q] = s
        c_starts[2 * q + 1] = s + nl
        c_counts[2 * q] = nl
        c_counts[2 * q + 1] = n - nl
        c_gs[2 * q] = lg[j]
        c_gs[2 * q + 1] = gs[j] - lg[j]
        c_hs[2 * q] = lh[j]
        c_hs[2 * q + 1] = hs[j] - lh[j]
        if want:
            # The built child stays in out[b], where it was summed; its sibling goes to
            # out[nbuilt + b]. Children whose histograms are never read keep row -1.
            parent[b] = hrow[j]
            need[b] = want
            if want & 1:
                c_hrow[2 * q + go] = b
            if want & 2:
                c_hrow[2 * q + 1 - go] = nbuilt + b
            b += 1
        q += 1
    return children, links, nbuilt, nodes + 2 * nsplit, nleaves


def root_level(n: int, hist: np.ndarray, foff: np.ndarray) -> np.ndarray:
    """Return grow_level's level array of a root over n local rows with global histogram hist[0]."""
    gs, hs = node_sums(hist[:1], foff)
    return np.array([[0], [0], [n], [gs[0]], [hs[0]], [0]], np.int64)


def grow_level(codes: np.ndarray, gh: np.ndarray, order: np.ndarray, tmp: np.ndarray, hist: np.ndarray,
               level: np.ndarray, foff: np.ndarray, colmask: np.ndarray, inv_g: float, inv_h: float, l2: float,
               min_child_weight: float, build: bool, tree: tuple[np.ndarray, np.ndarray], nodes: int,
               leaves: np.ndarray, nleaves: int, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Split one level's nodes in one pass: best split, tree arrays, stable partition, smaller-child histograms.

    level is (LEVEL_ROWS, k) int64: per node its id, order start, count, gq sum, hq sum
    and the row of hist (rows, bins, 2) holding its global histogram (-1: none; see
    root_level); colmask is (k, d) or (1, d) for all. Nodes without a positive-gain split
    become rows of leaves (node, start, count, gq, hq) from nleaves on; so do nodes whose
    hessian is below 2 min_child_weight, without a look at their histogram (no split could
    leave both children min_child_weight), so theirs need not exist. Each split node writes
    feature, bin, left, right into tree[0] ((4, nodes) int32) and its gain into tree[1];
    its children take node ids nodes, nodes + 1, ... in level order. With build, the local
    histogram of each split's smaller child (by global hessian, left on a tie) is summed
    while its rows are partitioned, into out[0:nbuilt] (out: a reused buffer of at least
    2 k rows, not hist), unless neither child could split. Return (the children's level,
    links, nbuilt, nodes, nleaves); the children's hist rows point into out, links are
    (2, nbuilt): per built child its parent's hist row and which histograms the next level
    reads (bit 1: it, bit 2: its sibling).
    """
    r = _grow_level(codes, gh, order, tmp, hist, level, foff, colmask, float(inv_g), float(inv_h), float(l2),
                    float(min_child_weight), bool(build), tree[0], tree[1], int(nodes), leaves, int(nleaves), out)
    return r[0], r[1], int(r[2]), int(r[3]), int(r[4])


@njit(cache=True, nogil=True)
def _children(hist: np.ndarray, parent: np.ndarray, need: np.ndarray, out: np.ndarray) -> None:
    nb = hist.shape[1]
    nbuilt = parent.shape[0]
    for q in range(nbuilt):
        if need[q] & 2:
            o = out[nbuilt + q]
            src = out[q]
            par = hist[parent[q]]
            for b in range(nb):
                o[b, 0] = par[b, 0] - src[b, 0]
                o[b, 1] = par[b, 1] - src[b, 1]


def children_histograms(hist: np.ndarray, links: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill the siblings' histograms of grow_level's out, now holding the built children's global sums; return out.

    Sibling of built child b: its parent's (hist[parent[b]]) minus it, into out[nbuilt + b],
    where the next level's hist rows point; siblings the next level never reads are skipped.
    """
    _children(hist, links[0], links[1], out)
    return out


@njit(cache=True, nogil=True)
def _leaf(node: np.int64, s: np.int64, n: np.int64, gq: np.int64, hq: np.int64, inv_g: float, inv_h: float,
          l2: float, lr: float, value: np.ndarray, order: np.ndarray, pred: np.ndarray, c: int) -> None:
    # The Newton step -G / (H + l2) times the learning rate, as kernels.tree_reference has it.
    v = -(np.float64(gq) * inv_g) / (np.float64(hq) * inv_h + l2) * lr
    value[node] = v
    for p in range(s, s + n):
        pred[order[p], c] += v


@njit(cache=True, nogil=True)
def _finish_tree(leaves: np.ndarray, nleaves: int, level: np.ndarray, tnode: np.ndarray, gain: np.ndarray,
                 nodes: int, cuts: np.ndarray, inv_g: float, inv_h: float, l2: float, lr: float, order: np.ndarray,
                 pred: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tn = tnode[:, :nodes].copy()
    fa, ba = tn[0], tn[1]
    ga = gain[:nodes].copy()
    thr = np.zeros(nodes, np.float32)
    value = np.zeros(nodes)
    for node in range(nodes):
        if fa[node] >= 0:
            thr[node] = cuts[fa[node], ba[node]]
    for j in range(nleaves):
        _leaf(leaves[j, 0], leaves[j, 1], leaves[j, 2], leaves[j, 3], leaves[j, 4], inv_g, inv_h, l2, lr, value,
              order, pred, c)
    for j in range(level.shape[1]):
        _leaf(level[0, j], level[1, j], level[2, j], level[3, j], level[4, j], inv_g, inv_h, l2, lr, value, order,
              pred, c)
    # The work arrays go back to "no split" for the next tree.
    tnode[:, :nodes] = -1
    gain[:nodes] = 0.0
    return tn, thr, value, ga


def finish_tree(leaves: np.ndarray, nleaves: int, level: np.ndarray, tree: tuple[np.ndarray, np.ndarray],
                nodes: int, cuts: np.ndarray, inv_g: float, inv_h: float, l2: float, learning_rate: float,
                order: np.ndarray, pred: np.ndarray, c: int) -> dict[str, np.ndarray]:
    """Return a grown tree's node arrays and add its leaves to pred[:, c] (n, outputs) of their rows.

    Leaves are the first nleaves rows of leaves plus every node of the last level (both as
    grow_level gives them); each gets the Newton step -G / (H + l2) times learning_rate. tree holds grow_level's
    work arrays ((4, nodes) int32 feature, bin, left, right; gain), reset to "no split" so the
    next tree can reuse them; split nodes get their bin's float32 cut as threshold.
    """
    tn, thr, value, gain = _finish_tree(leaves, int(nleaves), level, tree[0], tree[1], int(nodes), cuts, float(inv_g),
                                        float(inv_h), float(l2), float(learning_rate), order, pred, int(c))
    return {"feature": tn[0], "bin": tn[1], "threshold": thr, "left": tn[2], "right": tn[3], "value": value,
            "gain": gain}


def warmup() -> None:
    """Compile every kernel for the dtypes the learner uses, or load it from numba's cache."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 2)).astype(np.float32)
    cuts, ncuts = cut_points(X, 4)
    codes = bin_rows(X, cuts, ncuts)
    y = (X[:, 0] > 0).astype(np.float32)
    pred = np.zeros(8)
    grad_squared(pred, y)
    _, g, h = grad_logistic(pred, y)
    grad_softmax(np.zeros((8, 2)), y)
    foff = feature_offsets(ncuts)
    order = np.arange(8, dtype=np.int32)
    starts, counts = np.zeros(1, np.int64), np.full(1, 8, np.int64)
    hist = build_histograms(codes, quantize(g, 2.0**20), quantize(h, 2.0**20), order, starts, counts, foff)
    f, t, _, _, _ = best_splits(hist, hist[:, : foff[1], 0].sum(1), hist[:, : foff[1], 1].sum(1), foff,
                                np.ones((1, 2), np.bool_), 2.0**-20, 2.0**-20, 1.0, 0.0)
    partition(codes, order, starts, counts, f, t)
    gh = quantize_pair(g, h, 2.0**20, 2.0**20, np.empty((8, 2), np.int64))
    bounds(g, h)
    root = build_root(codes, gh, foff)
    level = root_level(8, root, foff)
    tree = (np.full((4, 7), -1, np.int32), np.zeros(7))
    leaves = np.empty((7, 5), np.int64)
    out = np.empty((2, root.shape[1], 2), np.int64)
    level, links, _, nodes, nleaves = grow_level(codes, gh, order, np.empty(8, np.int32), root, level, foff,
                                                 np.ones((1, 2), np.bool_), 2.0**-20, 2.0**-20, 1.0, 0.0, True, tree,
                                                 1, leaves, 0, out)
    children_histograms(root, links, out)
    finish_tree(leaves, nleaves, level, tree, nodes, cuts, 2.0**-20, 2.0**-20, 1.0, 0.1, order,
                np.zeros((8, 1)), 0)
    predict_raw(X, np.array([-1], np.int32), np.zeros(1, np.float32), np.zeros(1, np.int32), np.zeros(1, np.int32),
                np.ones(1), np.array([0, 1], np.int64), np.zeros(1, np.int32), np.zeros(1))
