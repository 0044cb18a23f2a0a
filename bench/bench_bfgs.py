"""Iterations and function evaluations to an l2-logistic optimum: fleetmpi bfgs / lbfgs vs scipy's BFGS.

One objective per set (mean log-loss + l2/2 |w|^2, bias free), on one process: the
optimizers are fleetmpi.optim's own classes, whose arithmetic every rank of a phase
repeats on the allreduced gradient. f* is scipy's L-BFGS-B at gtol 1e-12, improved by
the best value any method reached. A function evaluation is one loss + gradient (one
allreduce in a phase).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from common import save, table

GAPS = (1e-4, 1e-6, 1e-9)   # relative gaps (f - f*) / f* to reach
MAX_ITERS = 1000


def datasets() -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """Return (name, X, y, l2): breast_cancer standardised as make-data writes it, and a synthetic set."""
    from fleetmpi.makedata import bundled, synthetic
    X, y, _ = bundled("breast_cancer")
    Xs, ys = synthetic("binary", 2000, 100, 2, 1.0, 3)
    return [("breast_cancer C=1", X.astype(np.float64), y.astype(np.float64), 1.0 / len(y)),
            ("breast_cancer C=100", X.astype(np.float64), y.astype(np.float64), 1.0 / (100 * len(y))),
            ("synthetic 2000x100", Xs.astype(np.float64), ys.astype(np.float64), 1e-3)]


def objective(X: np.ndarray, y: np.ndarray, l2: float) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """Return w -> (mean log-loss + l2/2 |w[:-1]|^2, gradient); w[-1] is the bias."""
    n = len(y)

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = X @ w[:-1] + w[-1]
        r = 1.0 / (1.0 + np.exp(-z)) - y
        g = np.empty_like(w)
        g[:-1] = X.T @ r / n + l2 * w[:-1]
        g[-1] = r.mean()
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w[:-1] @ w[:-1]), g
    return f


def trace_fleet(kind: str, fun: Callable[[np.ndarray], tuple[float, np.ndarray]], p: int) -> list[tuple[float, int]]:
    """Return (f, evals so far) after every iteration of fleetmpi's optimizer ``kind`` from w = 0."""
    from fleetmpi.optim import BFGS, LBFGS
    from fleetmpi.spec import BfgsSpec, LbfgsSpec
    opt: Any = BFGS(BfgsSpec(tol_grad=1e-12), p) if kind == "bfgs" else LBFGS(LbfgsSpec(tol_grad=1e-12), p)
    w = np.zeros(p)
    out = []
    for _ in range(MAX_ITERS):
        f, moved = opt.step(w, fun)
        out.append((f, opt.evals))
        if not moved:
            break
    return out


def trace_scipy(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], p: int) -> list[tuple[float, int]]:
    """Return (f, evals so far) after every iteration of scipy.optimize.minimize(method="BFGS") from w = 0."""
    from scipy.optimize import minimize
    evals = [0]

    def counted(w: np.ndarray) -> tuple[float, np.ndarray]:
        evals[0] += 1
        return fun(w)

    out: list[tuple[float, int]] = []
    minimize(counted, np.zeros(p), jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": MAX_ITERS},
             callback=lambda xk: out.append((fun(xk)[0], evals[0])))
    return out


def f_star(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], p: int) -> float:
    """Return scipy L-BFGS-B's minimum, run far past any gap the table reports."""
    from scipy.optimize import minimize
    res = minimize(fun, np.zeros(p), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 10_000, "maxcor": 30})
    return float(res.fun)


def main() -> None:
    rows: list[dict[str, Any]] = []
    for name, X, y, l2 in datasets():
        fun, p = objective(X, y, l2), X.shape[1] + 1
        traces: dict[str, tuple[list[tuple[float, int]], float]] = {}
        for method, run in (("fleetmpi bfgs", lambda: trace_fleet("bfgs", fun, p)),
                            ("fleetmpi lbfgs (m=10)", lambda: trace_fleet("lbfgs", fun, p)),
                            ("scipy BFGS", lambda: trace_scipy(fun, p))):
            t0 = time.perf_counter()
            tr = run()
            traces[method] = (tr, time.perf_counter() - t0)
        best = min(f_star(fun, p), *(f for tr, _ in traces.values() for f, _ in tr))
        for method, (tr, sec) in traces.items():
            row: dict[str, Any] = {"set": name, "params": p, "method": method, "iters": len(tr),
                                   "final_gap": (tr[-1][0] - best) / best, "s": sec}
            for gap in GAPS:
                hit = next((i for i, (f, _) in enumerate(tr) if f - best <= gap * best), None)
                row[f"it@{gap:g}"] = None if hit is None else hit + 1
                row[f"ev@{gap:g}"] = None if hit is None else tr[hit][1]
            rows.append(row)
    cols = [("set", "s"), ("params", "d"), ("method", "s")] + \
        [c for gap in GAPS for c in ((f"it@{gap:g}", "d"), (f"ev@{gap:g}", "d"))] + \
        [("iters", "d"), ("final_gap", ".1e"), ("s", ".3f")]
    print(table("iterations (it) and loss+gradient evaluations (ev) to a relative gap from f*", rows, cols))
    save("bfgs", rows, gaps=list(GAPS), note="one process; f* = best of scipy L-BFGS-B (gtol 1e-12) and all runs")


if __name__ == "__main__":
    main()
