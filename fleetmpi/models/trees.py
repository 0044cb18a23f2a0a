"""Histogram tree learner (gbdt, forest, one tree) that runs on one rank or data-parallel.

Like LightGBM's serial -> data-parallel learner split, the learner is whole on one rank
and takes two reducers for what crosses ranks: ``reduce`` sums int64 arrays (the level's
histograms, class counts; ``MPI.INT64_T`` SUM over MPI) and ``reduce_max`` takes the
elementwise max of float64 arrays (gradient bounds that set the fixed-point scale). On
one rank both are the identity. Histograms are integer sums of per-row rounded
gradients, so every rank count gives the same splits and leaves bit for bit.

Rows are the caller's: each rank passes its own rows' uint8 codes, labels and global row
ids (which seed row sampling, so sampling never depends on the rank). Cut points come
from a seeded sample of global rows (``cut_sample_ids``, ``gather_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels import trees as K

__all__ = ["Ensemble", "TreeLearner", "TreeModel", "TreeParams", "cut_sample_ids", "forest_scores", "gather_sample",
           "mpi_reducers", "tree_summary"]

Reduce = Callable[[np.ndarray], np.ndarray]
KINDS = ("gbdt", "forest", "tree")
TASKS = ("regression", "binary", "multiclass")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _identity(a: np.ndarray) -> np.ndarray:
    return a


@dataclass(frozen=True)
class TreeParams:
    """Settings of one tree ensemble (the spec's ``model:`` for kind gbdt | forest | tree)."""

    kind: str = "gbdt"
    task: str = "binary"
    classes: int = 2
    trees: int = 100
    depth: int = 6
    learning_rate: float = 0.1
    bins: int = 255
    l2: float = 1.0
    min_child_weight: float = 1.0
    row_sample: float = 1.0
    col_sample: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "multiclass" and self.classes < 2:
            raise ValueError(f"multiclass needs classes >= 2, got {self.classes}")
        if not 2 <= self.bins <= K.MAX_BINS:
            raise ValueError(f"model.bins must be in 2..{K.MAX_BINS}, got {self.bins}")
        if not 1 <= self.depth <= 30 or self.trees < 1:
            raise ValueError(f"model.depth must be in 1..30 and model.trees >= 1, got {self.depth}, {self.trees}")
        for name in ("row_sample", "col_sample"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"model.{name} must be in (0, 1], got {v}")
        if self.l2 < 0 or self.min_child_weight < 0 or self.learning_rate <= 0:
            raise ValueError("model.l2 and min_child_weight must be >= 0 and learning_rate > 0")

    @property
    def outputs(self) -> int:
        """Return the number of raw scores per row (one tree per output per round)."""
        return self.classes if self.task == "multiclass" else 1


@dataclass
class Ensemble:
    """Trees as flat node arrays plus the cuts that bin their inputs; ``state()`` checkpoints it."""

    cuts: np.ndarray
    ncuts: np.ndarray
    base: np.ndarray
    task: str
    rounds: int = 0
    trees: list[dict[str, np.ndarray]] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the node arrays of every tree concatenated, with tree offsets and classes."""
        names = ("feature", "bin", "threshold", "left", "right", "value", "gain")
        dtypes = (np.int32, np.int32, np.float32, np.int32, np.int32, np.float64, np.float64)
        out = {n: (np.concatenate([t[n] for t in self.trees]) if self.trees else np.empty(0, dt))
               for n, dt in zip(names, dtypes)}
        sizes = [t["feature"].size for t in self.trees]
        out["offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out["tree_class"] = np.array([int(t["class"][0]) for t in self.trees], np.int32)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Return every array a checkpoint needs, by name (round as a 0-d int64)."""
        return {"cuts": self.cuts, "ncuts": self.ncuts, "base": self.base, "round": np.array(self.rounds),
                **self.arrays()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], task: str) -> Ensemble:
        """Return the ensemble a ``state()`` dict describes."""
        off = state["offsets"]
        trees = []
        for t in range(off.size - 1):
            sl = slice(int(off[t]), int(off[t + 1]))
            tree = {n: np.array(state[n][sl]) for n in ("feature", "bin", "threshold", "left", "right", "value")}
            # Split gains (for importance) came later than the node arrays; older states read as 0.
            tree["gain"] = np.array(state["gain"][sl]) if "gain" in state else np.zeros(sl.stop - sl.start)
            tree["class"] = np.array([state["tree_class"][t]], np.int32)
            trees.append(tree)
        return cls(np.array(state["cuts"]), np.array(state["ncuts"]), np.array(state["base"]), task,
                   int(state["round"]), trees)

    def raw(self, X: np.ndarray) -> np.ndarray:
        """Return raw scores (n, outputs) of float32 rows X."""
        a = self.arrays()
        return K.predict_raw(X, a["feature"], a["threshold"], a["left"], a["right"], a["value"], a["offsets"],
                             a["tree_class"], self.base)

    def importance(self, d: int) -> np.ndarray:
        """Return each of ``d`` features' summed split gain over every tree (gain-based importance)."""
        a = self.arrays()
        split = a["feature"] >= 0
        return np.bincount(a["feature"][split], weights=a["gain"][split], minlength=d)[:d]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Return predictions: values (regression), P(y=1) (binary) or class probabilities (n, k)."""
        z = self.raw(X)
        if self.task == "regression":
            return z[:, 0]
        if self.task == "binary":
            return 1.0 / (1.0 + np.exp(-z[:, 0]))
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def cut_sample_ids(n_global: int, size: int, seed: int) -> np.ndarray:
    """Return the sorted global row ids (at most ``size``) every rank bins from; rank-free."""
    if n_global <= size:
        return np.arange(n_global, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 0x637574]).choice(n_global, size, replace=False)).astype(np.int64)


def gather_sample(X: np.ndarray, row_ids: np.ndarray, ids: np.ndarray,
                  allgather: Callable[[Any], list[Any]] = lambda o: [o]) -> np.ndarray:
    """Return the sample rows ``ids`` in global id order, each read by the rank that holds it."""
    mine = np.isin(row_ids, ids)
    parts = allgather((row_ids[mine], np.ascontiguousarray(X[mine], dtype=np.float32)))
    rid = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    return rows[np.argsort(rid, kind="stable")]


def mpi_reducers(comm: Any) -> tuple[Reduce, Reduce]:
    """Return (int64 SUM, float64 MAX) Allreduce callables over comm; identities on a one-rank comm.

    The SUM works in place when given a contiguous int64 array (and returns it).

    An Allreduce over one rank returns its input, so it is skipped: it only cost a copy
    and an MPI call per tree level (small data sets run a few hundred levels a second).
    """
    from mpi4py import MPI

    if comm.Get_size() == 1:
        return _identity, _identity

    def reduce(a: np.ndarray) -> np.ndarray:
        # In place: a fresh multi-MiB result per tree level costs page faults and a copy back.
        a = np.ascontiguousarray(a, dtype=np.int64)
        comm.Allreduce(MPI.IN_PLACE, [a, MPI.INT64_T], op=MPI.SUM)
        return a

    def reduce_max(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float64)
        out = np.empty_like(a)
        comm.Allreduce([a, MPI.DOUBLE], [out, MPI.DOUBLE], op=MPI.MAX)
        return out

    return reduce, reduce_max


def _uniform(row_ids: np.ndarray, *key: int) -> np.ndarray:
    """Return a uniform [0, 1) number per global row id from splitmix64 of (key, id)."""
    z = row_ids.astype(np.uint64)
    for k in key:
        z = (z + np.uint64(k & 0xFFFFFFFFFFFFFFFF)) * _GOLDEN
        z ^= z >> np.uint64(31)
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


# Poisson(1) cumulative probabilities: bootstrap counts by inverse transform.
_POISSON_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(20)])


class TreeLearner:
    """Grow trees level by level on this rank's rows; ``reduce``/``reduce_max`` join the ranks."""

    def __init__(self, params: TreeParams, cuts: np.ndarray, ncuts: np.ndarray, reduce: Reduce = _identity,
                 reduce_max: Reduce = _identity) -> None:
        self.p = params
        self.reduce = reduce
        self.reduce_max = reduce_max
        self.foff = K.feature_offsets(ncuts)
        self.ensemble = Ensemble(cuts, ncuts, np.zeros(params.outputs), params.task)
        # int64 histogram bytes this rank put into reduce() so far; counted on one rank too,
        # where the reducer is the identity: the payload a data-parallel run sums per rank.
        self.hist_bytes = 0
        self._n_global: int | None = None
        self._bufs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._hbufs = [np.empty((0, int(self.foff[-1]), 2), np.int64) for _ in range(2)]
        size = 2 ** (min(params.depth, 6) + 1) - 1        # grown by _tree_work for deeper trees
        # (feature, bin, left, right) per node (int32, -1: none) and each split's gain (float64)
        self._tree = (np.full((4, size), -1, np.int32), np.zeros(size))
        self._leaves = np.empty((size, 5), np.int64)       # node, start, count, gq sum, hq sum
        self._arange = np.empty(0, np.int32)
        self._mask = np.ones((1, self.foff.size - 1), np.bool_)
        self._mask_key: tuple[int, int] | None = None

    # ----------------------------------------------------------------- set-up

    def init_base(self, y: np.ndarray) -> np.ndarray:
        """Set the base score from the global label mean (exact integer sums); return it."""
        p = self.p
        n = int(self.reduce(np.array([y.shape[0]], np.int64))[0])
        if p.task == "regression":
            bound = float(self.reduce_max(np.array([np.abs(y).max() if y.size else 0.0]))[0])
            scale = K.fixed_scale(bound, max(n, 1))
            s = self.reduce(np.array([K.quantize(y.astype(np.float64), scale).sum()], np.int64))[0]
            base = np.array([float(s) / scale / max(n, 1)])
        else:
            counts = self.reduce(np.bincount(y.astype(np.int64), minlength=p.outputs if p.outputs > 1 else 2))
            frac = np.clip(counts / max(n, 1), 1e-6, 1.0 - 1e-6)
            base = np.array([math.log(frac[1] / frac[0])]) if p.task == "binary" else np.log(frac)
        self.ensemble.base = base
        return base

    # ----------------------------------------------------------------- one round

    def fit_round(self, codes: np.ndarray, y: np.ndarray, pred: np.ndarray, row_ids: np.ndarray) -> float:
        """Grow one round's trees (one per output) on local rows; add them to pred (n, outputs); return local loss."""
        p, r = self.p, self.ensemble.rounds
        score = np.broadcast_to(self.ensemble.base, pred.shape) if p.kind == "forest" else pred
        if p.task == "regression":
            loss, g, h = K.grad_squared(np.ascontiguousarray(score[:, 0]), y)
            g, h = g[None], h[None]
        elif p.task == "binary":
            loss, g, h = K.grad_logistic(np.ascontiguousarray(score[:, 0]), y)
            g, h = g[None], h[None]
        else:
            loss, g, h = K.grad_softmax(np.ascontiguousarray(score), y)
        lr = {"gbdt": p.learning_rate, "forest": 1.0 / p.trees, "tree": 1.0}[p.kind]
        for c in range(p.outputs):
            w = self._row_weights(row_ids, r, c)
            gc, hc = (g[c], h[c]) if w is None else (g[c] * w, h[c] * w)
            tree = self._grow(codes, gc, hc, r, c, lr, pred)
            tree["class"] = np.array([c], np.int32)
            self.ensemble.trees.append(tree)
        self.ensemble.rounds += 1
        return loss

    def _row_weights(self, row_ids: np.ndarray, r: int, c: int) -> np.ndarray | None:
        p = self.p
        if p.kind == "forest":
            u = _uniform(row_ids, p.seed, r, c, 1)
            return np.searchsorted(_POISSON_CDF, u, side="right").astype(np.float64)
        if p.row_sample < 1.0:
            return (_uniform(row_ids, p.seed, r, c, 0) < p.row_sample).astype(np.float64)
        return None

    def _colmask(self, r: int, c: int, ids: np.ndarray) -> np.ndarray:
        """Return the (nodes, d) feature mask of a level, or (1, d) when every node shares it."""
        p = self.p
        d = self.foff.size - 1
        if p.kind == "forest":
            m = max(1, int(math.isqrt(d)))
            mask = np.zeros((len(ids), d), np.bool_)
            for j, node in enumerate(ids.tolist()):
                mask[j, np.random.default_rng([p.seed, r, c, 2, node]).choice(d, m, replace=False)] = True
            return mask
        key = (r, c)
        if self._mask_key != key:
            mask = np.zeros((1, d), np.bool_)
            if p.col_sample < 1.0:
                m = max(1, int(round(p.col_sample * d)))
                mask[:, np.random.default_rng([p.seed, r, c, 3]).choice(d, m, replace=False)] = True
            else:
                mask[:] = True
            self._mask, self._mask_key = mask, key
        return self._mask

    def _reduce_hist(self, h: np.ndarray) -> None:
        """Replace contiguous histograms h by their sums over ranks, in place."""
        self.hist_bytes += h.nbytes
        flat = h.reshape(-1)
        summed = self.reduce(flat)
        if summed is not flat:
            flat[:] = summed

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (order, tmp, gh) row buffers, reused across trees while n stays the same."""
        if self._bufs is None or self._bufs[0].shape[0] != n:
            self._arange = np.arange(n, dtype=np.int32)
            self._bufs = (np.empty(n, np.int32), np.empty(n, np.int32), np.empty((n, 2), np.int64))
        order, tmp, gh = self._bufs
        order[:] = self._arange
        return order, tmp, gh

    def _hist_buffer(self, slot: int, k: int) -> np.ndarray:
        """Return reusable histogram buffer slot (0 or 1: levels alternate) with at least k nodes.

        Fresh multi-MiB arrays would be page-faulted in on every level; reused ones stay mapped.
        """
        buf = self._hbufs[slot]
        if buf.shape[0] < k:
            buf = np.empty((max(k, 2 * buf.shape[0]), int(self.foff[-1]), 2), np.int64)
            self._hbufs[slot] = buf
        return buf

    def _tree_work(self, nodes: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """Return grow_level's tree arrays and leaf rows with room for ``nodes`` nodes, kept across trees.

        finish_tree resets the nodes a tree used, so no tree starts with another's splits.
        """
        tree, leaves = self._tree, self._leaves
        size = tree[1].size
        if nodes > size:
            grow = max(nodes, 2 * size) - size
            tree = (np.concatenate([tree[0], np.full((4, grow), -1, np.int32)], axis=1),
                    np.concatenate([tree[1], np.zeros(grow)]))
            leaves = np.concatenate([leaves, np.empty((grow, 5), np.int64)])
            self._tree, self._leaves = tree, leaves
        return tree, leaves

    def _grow(self, codes: np.ndarray, g: np.ndarray, h: np.ndarray, r: int, c: int, lr: float, pred: np.ndarray
              ) -> dict[str, np.ndarray]:
        """Return one tree's node arrays; add its leaf values to pred[:, c] of their rows."""
        p, foff = self.p, self.foff
        n = codes.shape[0]
        if self._n_global is None:
            self._n_global = int(self.reduce(np.array([n], np.int64))[0])
        n_global = self._n_global
        bg, bh = self.reduce_max(K.bounds(g, h))
        sg, sh = K.fixed_scale(float(bg), max(n_global, 1)), K.fixed_scale(float(bh), max(n_global, 1))
        order, tmp, gh = self._buffers(n)
        K.quantize_pair(g, h, sg, sh, gh)
        inv_g, inv_h = 1.0 / sg, 1.0 / sh

        # Levels alternate between histogram slots 0 and 1, the root (in 1) first.
        hist = K.build_root(codes, gh, foff, self._hist_buffer(1, 1))
        self._reduce_hist(hist)
        level = K.root_level(n, hist, foff)
        nodes, nleaves = 1, 0
        for depth in range(p.depth):
            last = depth == p.depth - 1
            k = level.shape[1]
            tree, leaves = self._tree_work(nodes + 2 * k)
            out = self._hist_buffer(depth % 2, 0 if last else 2 * k)
            level, links, nbuilt, nodes, nleaves = K.grow_level(
                codes, gh, order, tmp, hist, level, foff, self._colmask(r, c, level[0]), inv_g, inv_h, p.l2,
                p.min_child_weight, not last, tree, nodes, leaves, nleaves, out)
            # No child histogram built: no child can split, so the level is all leaves (every rank agrees).
            if not level.shape[1] or last or not nbuilt:
                break
            self._reduce_hist(out[:nbuilt])
            hist = K.children_histograms(hist, links, out)
        return K.finish_tree(self._leaves, nleaves, level, self._tree, nodes, self.ensemble.cuts, inv_g, inv_h, p.l2,
                             lr, order, pred, c)


def forest_scores(raw: np.ndarray, base: np.ndarray, kind: str, trees: int, rounds: int) -> np.ndarray:
    """Return raw scores as the model means them: a forest of ``rounds`` < ``trees`` trees is averaged over those."""
    if kind != "forest" or rounds in (0, trees):
        return raw
    # Each forest tree was stored at weight 1/trees; an early stop averages the trees grown.
    return base + (raw - base) * (trees / rounds)


def tree_depths(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Return each tree's depth (edges from root to its deepest leaf) from flat node arrays."""
    off, left, right = arrays["offsets"], arrays["left"], arrays["right"]
    out = np.zeros(off.size - 1, np.int64)
    for t in range(off.size - 1):
        base = int(off[t])
        level, depth = [0], 0
        while True:
            nxt = [int(c) for n in level for c in (left[base + n], right[base + n]) if c >= 0]
            if not nxt:
                break
            level, depth = nxt, depth + 1
        out[t] = depth
    return out


def tree_summary(arrays: dict[str, np.ndarray], top: int = 10) -> dict[str, Any]:
    """Return trees, rounds, max depth, leaves and the ``top`` features by share of total split gain."""
    d = int(arrays["cuts"].shape[0])
    split = arrays["feature"] >= 0
    gain = np.bincount(arrays["feature"][split], weights=arrays["gain"][split], minlength=d)[:d] \
        if "gain" in arrays else np.zeros(d)
    total = float(gain.sum())
    order = np.argsort(-gain, kind="stable")[:top]
    depths = tree_depths(arrays)
    return {"trees": int(arrays["offsets"].size - 1), "rounds": int(arrays["round"]),
            "depth": int(depths.max()) if depths.size else 0, "leaves": int((~split).sum()),
            "importance_gain": [{"feature": int(f), "gain": float(gain[f]), "share": float(gain[f] / total)}
                                for f in order if gain[f] > 0] if total > 0 else []}


class TreeModel:
    """A trained ensemble read from a model file, with the prediction contract of ``fleetmpi.models.Model``."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.kind, self.task = str(meta["kind"]), str(meta["task"])
        self.trees = int(meta["trees"])
        self._meta = meta
        self.ensemble = Ensemble.from_state(arrays, self.task)
        self.d = int(self.ensemble.cuts.shape[0])

    def meta(self) -> dict[str, Any]:
        """Return the model file's metadata (d included)."""
        return {**self._meta, "d": self.d}

    def predict(self, X: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
        """Return values (regression), P(y=1) (binary) or class probabilities (n, k) of float32 rows X."""
        e = self.ensemble
        z = forest_scores(e.raw(X), e.base, self.kind, self.trees, e.rounds)
        if self.task == "regression":
            return z[:, 0]
        if self.task == "binary":
            return 1.0 / (1.0 + np.exp(-z[:, 0]))
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
