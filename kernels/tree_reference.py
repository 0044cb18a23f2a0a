"""Plain numpy reference of the histogram tree kernels, for tests only.

Same binning rule (code = #{cuts < x}), same integer gradients, same gain and the same
tie-breaking as kernels.trees, written the obvious way: every node's histogram is built
directly from its rows (no sibling subtraction), every node is a boolean row mask.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bin_rows", "cut_points", "grow_tree"]


def cut_points(sample: np.ndarray, bins: int) -> list[np.ndarray]:
    """Return each feature's float32 cuts: distinct values but the largest, or quantile values."""
    S = np.asarray(sample, dtype=np.float32)
    m = S.shape[0]
    out = []
    for f in range(S.shape[1]):
        v = np.sort(S[:, f])
        u = np.unique(v)
        if u.size <= bins:
            out.append(u[:-1])
            continue
        q = sorted({float(v[(k * m) // bins]) for k in range(1, bins)})
        out.append(np.array([x for x in q if x < u[-1]], np.float32))
    return out


def bin_rows(X: np.ndarray, cuts: list[np.ndarray]) -> np.ndarray:
    """Return (n, d) codes: the number of a feature's cuts strictly below each value."""
    X = np.asarray(X, dtype=np.float32)
    return np.stack([np.searchsorted(c, X[:, f], side="left") for f, c in enumerate(cuts)], axis=1).astype(np.uint8)


def _hist(codes: np.ndarray, gq: np.ndarray, hq: np.ndarray, rows: np.ndarray, nbins: list[int]) -> list[np.ndarray]:
    out = []
    for f, nb in enumerate(nbins):
        hg = np.zeros(nb, np.int64)
        hh = np.zeros(nb, np.int64)
        np.add.at(hg, codes[rows, f], gq[rows])
        np.add.at(hh, codes[rows, f], hq[rows])
        out.append(np.stack([hg, hh], axis=1))
    return out


def _best(hist: list[np.ndarray], G: int, H: int, mask: np.ndarray, inv_g: float, inv_h: float, l2: float,
          mcw: float) -> tuple[int, int, int, int]:
    Gf, Hf = G * inv_g, H * inv_h
    parent = Gf * Gf / (Hf + l2)
    best, bf, bb, bl, bh = 0.0, -1, -1, 0, 0
    for f, hf in enumerate(hist):
        if not mask[f] or hf.shape[0] < 2:
            continue
        gl = np.cumsum(hf[:-1, 0])
        hl = np.cumsum(hf[:-1, 1])
        HL, HR = hl * inv_h, (H - hl) * inv_h
        GL, GR = gl * inv_g, (G - gl) * inv_g
        gain = GL * GL / (HL + l2) + GR * GR / (HR + l2) - parent
        gain[(HL < mcw) | (HR < mcw)] = -np.inf
        b = int(np.argmax(gain))            # first maximum: the lowest bin
        if gain[b] > best:                  # strict: an equal gain keeps the lower feature
            best, bf, bb, bl, bh = float(gain[b]), f, b, int(gl[b]), int(hl[b])
    return bf, bb, bl, bh


def grow_tree(codes: np.ndarray, gq: np.ndarray, hq: np.ndarray, nbins: list[int], depth: int, inv_g: float,
              inv_h: float, l2: float, mcw: float, lr: float, colmask: np.ndarray | None = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return (node arrays feature, bin, left, right, value in breadth-first order, per-row leaf value)."""
    n, d = codes.shape
    mask = np.ones(d, np.bool_) if colmask is None else colmask
    feature, tbin, left, right, value = [-1], [-1], [-1], [-1], [0.0]
    rows_of = {0: np.arange(n)}
    level = [0]
    for lvl in range(depth + 1):
        nxt = []
        for node in level:
            rows = rows_of[node]
            G, H = int(gq[rows].sum()), int(hq[rows].sum())
            f = -1
            if lvl < depth:
                f, b, _, _ = _best(_hist(codes, gq, hq, rows, nbins), G, H, mask, inv_g, inv_h, l2, mcw)
            if f < 0:
                value[node] = -(G * inv_g) / (H * inv_h + l2) * lr
                continue
            li, ri = len(feature), len(feature) + 1
            feature[node], tbin[node], left[node], right[node] = f, b, li, ri
            feature += [-1, -1]
            tbin += [-1, -1]
            left += [-1, -1]
            right += [-1, -1]
            value += [0.0, 0.0]
            go_left = codes[rows, f] <= b
            rows_of[li], rows_of[ri] = rows[go_left], rows[~go_left]
            nxt += [li, ri]
        level = nxt
    row_value = np.zeros(n)
    for node, rows in rows_of.items():
        if feature[node] < 0:
            row_value[rows] = value[node]
    tree = {"feature": np.array(feature, np.int32), "bin": np.array(tbin, np.int32),
            "left": np.array(left, np.int32), "right": np.array(right, np.int32), "value": np.array(value)}
    return tree, row_value
