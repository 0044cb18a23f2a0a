"""Threshold quantisation with residual error feedback (Strom 2015), numba kernels.

A rank adds its gradient sum to its residual ``r``; every entry with ``|r_j| >= tau``
is sent as ``+tau`` or ``-tau`` and that amount leaves the residual, the rest waits for
later steps. So at all times: sum of sent amounts + residual = sum of gradients fed.

Wire format: one word per sent entry, its top bit the sign (set: ``-tau``), the other bits
the parameter index: uint32 (models of fewer than 2**31 parameters) or, for models of at
most 2**15 parameters, uint16 (``entry_dtype`` picks: half the bytes per entry). The
kernels take any unsigned word and derive the sign bit from its width.

The public functions check shapes and dtypes in O(1) and call the raw ``_*`` kernels;
each kernel is one pass over its input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

__all__ = ["INDEX_MASK", "MAX_PARAMS", "MAX_PARAMS_16", "SIGN_BIT", "decode", "encode", "entry_dtype", "warmup"]

SIGN_BIT = np.uint32(0x80000000)
INDEX_MASK = np.uint32(0x7FFFFFFF)
MAX_PARAMS = 1 << 31
MAX_PARAMS_16 = 1 << 15   # indices 0..2**15-1 fit the uint16 format


def entry_dtype(n_params: int) -> type:
    """Return the narrowest wire word for a model of ``n_params``: uint16 up to 2**15, else uint32."""
    return np.uint16 if n_params <= MAX_PARAMS_16 else np.uint32


def _sign_bit(dtype: Any) -> int:
    """Return the sign bit of a wire word of ``dtype`` (its top bit)."""
    return 1 << (8 * np.dtype(dtype).itemsize - 1)


# --------------------------------------------------------------------------- kernels


@njit(cache=True, fastmath=False, nogil=True)
def _encode(residual: np.ndarray, grad: np.ndarray, tau: float, out: np.ndarray, neg: int) -> int:
    """Add grad into residual, pack entries with |r| >= tau into out (sign bit ``neg``); return their count."""
    m = 0
    for j in range(residual.shape[0]):
        r = residual[j] + grad[j]
        if r >= tau:
            out[m] = j
            m += 1
            r -= tau
        elif r <= -tau:
            out[m] = j | neg
            m += 1
            r += tau
        residual[j] = r
    return m


@njit(cache=True, fastmath=False, nogil=True)
def _decode(packed: np.ndarray, tau: float, g: np.ndarray, sign: int) -> int:
    """Fill g with the sum of the packed +-tau entries (sign bit ``sign``); return -1 on an index out of range."""
    g[:] = 0.0
    n = g.shape[0]
    mask = sign - 1
    for w in packed:
        e = np.int64(w)
        j = e & mask
        if j >= n:
            return -1
        if e & sign:
            g[j] -= tau
        else:
            g[j] += tau
    return 0


# --------------------------------------------------------------------------- public


def _check(a: np.ndarray, name: str, dtype: type | tuple[type, ...], writable: bool = False) -> None:
    """Raise TypeError / ValueError unless ``a`` is a C-contiguous 1-D array of ``dtype`` (or one of them)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    if a.dtype not in allowed:
        names = " or ".join(np.dtype(d).name for d in allowed)
        raise TypeError(f"{name} must have dtype {names}, got {a.dtype}")
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

    residual, grad: float64 (n,); out: uint32, or uint16 for n <= 2**15, with room for n
    entries (the worst case).
    """
    _check(residual, "residual", np.float64, writable=True)
    _check(grad, "grad", np.float64)
    _check(out, "out", (np.uint32, np.uint16), writable=True)
    n = residual.shape[0]
    if grad.shape != (n,):
        raise ValueError(f"grad must have shape ({n},) like residual, got {grad.shape}")
    if out.shape[0] < n:
        raise ValueError(f"out must hold up to {n} entries, has room for {out.shape[0]}")
    if n > MAX_PARAMS:
        raise ValueError(f"the packed format addresses at most 2**31 parameters, got {n}")
    if out.dtype == np.uint16 and n > MAX_PARAMS_16:
        raise ValueError(f"the uint16 format addresses at most 2**15 parameters, got {n}")
    return int(_encode(residual, grad, _check_tau(tau), out, _sign_bit(out.dtype)))


def decode(packed: np.ndarray, tau: float, g_out: np.ndarray) -> None:
    """Fill g_out (float64 (n,)) with the sum of the packed +-tau entries (any ranks' blocks).

    The width of ``packed`` (uint32 or uint16) says where its sign bit is.
    """
    _check(packed, "packed", (np.uint32, np.uint16))
    _check(g_out, "g_out", np.float64, writable=True)
    if _decode(packed, _check_tau(tau), g_out, _sign_bit(packed.dtype)) < 0:
        raise ValueError(f"packed entries address an index >= {g_out.shape[0]} (corrupt or foreign buffer)")


def warmup() -> None:
    """Compile both kernels for both wire words on tiny inputs or load them from numba's cache."""
    for dtype in (np.uint32, np.uint16):
        r = np.array([0.5, -2.0, 0.1])
        out = np.empty(3, dtype)
        m = _encode(r, np.array([1.0, -0.5, 0.2]), 1.0, out, _sign_bit(dtype))
        _decode(out[:m], 1.0, np.empty(3), _sign_bit(dtype))
