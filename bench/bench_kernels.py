"""Gradient kernels: fused numba single pass vs the numpy two-pass reference, in GB/s of X.

Baselines measured in the same run on the same arrays: the numpy two-pass gradient as a
numpy user writes it (float32 X, float64 weights), the same with X cast to float64 once
beforehand (cast not timed: numpy's best case), and a plain numba read of X summed with
reassociation allowed, so it vectorises (the memory bound the fused kernel can approach).
"""

from __future__ import annotations

import sys

import numba
import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__file__))
from common import best_of, save, table

from kernels import cpu, reference


@numba.njit(cache=True, nogil=True, fastmath=True)
def _read_all(X: np.ndarray) -> float:
    s = 0.0
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            s += X[i, j]
    return s


def run(n: int = 200_000, d: int = 128, k: int = 10) -> list[dict]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    X64 = X.astype(np.float64)
    yb = (rng.random(n) < 0.5).astype(np.float32)
    yk = rng.integers(0, k, n).astype(np.float32)
    w = 0.1 * rng.standard_normal(d + 1)
    W = 0.1 * rng.standard_normal((d + 1) * k)
    g, G = np.empty(d + 1), np.empty((d + 1) * k)
    cpu.warmup()
    _read_all(X[:10])
    gb = X.nbytes / 1e9
    t_read = best_of(lambda: _read_all(X))
    rows = []

    def two_pass_f64() -> None:
        z = X64 @ w[:d] + w[d]
        r = 1.0 / (1.0 + np.exp(-z)) - yb
        X64.T @ r

    def softmax_np() -> None:
        Z = X64 @ W.reshape(d + 1, k)[:d] + W.reshape(d + 1, k)[d]
        Z -= Z.max(axis=1, keepdims=True)
        P = np.exp(Z)
        P /= P.sum(axis=1, keepdims=True)
        P[np.arange(n), yk.astype(np.int64)] -= 1.0
        X64.T @ P

    cases = [
        ("logistic", lambda: cpu.logistic_grad(X, yb, w, g),
         lambda: reference.logistic_loss_grad_twopass(X, yb, w), two_pass_f64),
        ("linear", lambda: cpu.linear_grad(X, yb, w, g), lambda: reference.linear_loss_grad(X, yb, w), None),
        ("softmax k=10", lambda: cpu.softmax_grad(X, yk, W, k, G),
         lambda: reference.softmax_loss_grad(X, yk, W, k), softmax_np),
    ]
    for name, fused, ref, ref64 in cases:
        t_f, t_r = best_of(fused), best_of(ref, repeat=3)
        t_64 = best_of(ref64, repeat=3) if ref64 else None
        rows.append({"kernel": name, "fused_GBps": gb / t_f, "numpy_GBps": gb / t_r,
                     "numpy_f64_GBps": gb / t_64 if t_64 else None, "read_GBps": gb / t_read,
                     "vs_numpy": t_r / t_f, "vs_numpy_f64": (t_64 / t_f) if t_64 else None,
                     "of_read": t_read / t_f})
    return rows


def main() -> None:
    rows = run()
    print(table("gradient kernels, X float32 200000 x 128 (GB/s of X; ratios measured in this run)", rows,
                [("kernel", "s"), ("fused_GBps", ".2f"), ("numpy_GBps", ".2f"), ("numpy_f64_GBps", ".2f"),
                 ("read_GBps", ".2f"), ("vs_numpy", ".2f"), ("vs_numpy_f64", ".2f"), ("of_read", ".2f")]))
    save("kernels", rows, threads_numba=numba.get_num_threads())


if __name__ == "__main__":
    main()
