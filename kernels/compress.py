"""Threshold quantisation with residual error feedback (Strom 2015), numba kernels.

A rank adds its gradient sum to its residual ``r``; every entry with ``|r_j| >= tau``
is sent as ``+tau`` or ``-tau`` and that amount leaves the residual, the rest waits for
later steps. So at all times: sum of sent amounts + residual = sum of gradients fed.

Wire format: one uint32 per sent entry, bit 31 the sign (set: ``-tau``), bits 0..30 the
parameter index; models therefore have fewer than 2**31 parameters.

The public functions check shapes and dtypes in O(1) and call the raw ``_*`` kernels;
each kernel is one pass over its input.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["INDEX_MASK", "MAX_PARAMS", "SIGN_BIT", "decode", "encode", "warmup"]

SIGN_BIT = np.uint32(0x80000000)
INDEX_MASK = np.uint32(0x7FFFFFFF)
MAX_PARAMS = 1 << 31


# --------------------------------------------------------------------------- kernels


@njit(cache=True, fastmath=False, nogil=True)
def _encode(residual: np.ndarray, grad: np.ndarray, tau: float, out: np.ndarray) -> int:
    """Add grad into residual, pack entries with |r| >= tau into out; return their count."""
    m = 0
    neg = np.uint32(0x80000000)
    for j in range(residual.shape[0]):
        r = residual[j] + grad[j]
        if r >= tau:
            out[m] = np.uint32(j)
            m += 1
            r -= tau
        elif r <= -tau:
            out[m] = np.uint32(j) | neg
            m += 1
            r += tau
        residual[j] = r
    return m


@njit(cache=True, fastmath=False, nogil=True)
def _decode(packed: np.ndarray, tau: float, g: np.ndarray) -> int:
    """Fill g with the sum of the packed +-tau entries; return -1 on an index out of range."""
    g[:] = 0.0
    n = g.shape[0]
    sign = np.uint32(0x80000000)
    mask = np.uint32(0x7FFFFFFF)
    for e in packed:
        j = np.int64(e & mask)
        if j >= n:
            return -1
        if e & sign:
            g[j] -= tau
        else:
            g[j] += tau
    return 0


# --------------------------------------------------------------------------- public


def _check(a: np.ndarray, name: str, dtype: type, writable: bool = False) -> None:
    """Raise TypeError / ValueError unless ``a`` is a C-contiguous 1-D array of ``dtype``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous 1-D array, got shape {a.shape}")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")


def _check_tau(tau: float) -> float:
    """Return tau as a float after checking it is finite and > 0."""
    tau = float(tau)
    if not (0.0 < tau < np.inf):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return tau


def encode(residual: np.ndarray, grad: np.ndarray, tau: float, out: np.ndarray) -> int:
    """Add grad to residual in place, pack the +-tau entries into out; return the count.

    residual, grad: float64 (n,); out: uint32 with room for n entries (the worst case).
    """
    _check(residual, "residual", np.float64, writable=True)
    _check(grad, "grad", np.float64)
    _check(out, "out", np.uint32, writable=True)
    n = residual.shape[0]
    if grad.shape != (n,):
        raise ValueError(f"grad must have shape ({n},) like residual, got {grad.shape}")
    if out.shape[0] < n:
        raise ValueError(f"out must hold up to {n} entries, has room for {out.shape[0]}")
    if n > MAX_PARAMS:
        raise ValueError(f"the packed format addresses at most 2**31 parameters, got {n}")
    return int(_encode(residual, grad, _check_tau(tau), out))


def decode(packed: np.ndarray, tau: float, g_out: np.ndarray) -> None:
    """Fill g_out (float64 (n,)) with the sum of the packed +-tau entries (any ranks' blocks)."""
    _check(packed, "packed", np.uint32)
    _check(g_out, "g_out", np.float64, writable=True)
    if _decode(packed, _check_tau(tau), g_out) < 0:
        raise ValueError(f"packed entries address an index >= {g_out.shape[0]} (corrupt or foreign buffer)")


def warmup() -> None:
    """Compile both kernels on tiny inputs or load them from numba's cache."""
    r = np.array([0.5, -2.0, 0.1])
    out = np.empty(3, np.uint32)
    m = _encode(r, np.array([1.0, -0.5, 0.2]), 1.0, out)
    _decode(out[:m], 1.0, np.empty(3))
