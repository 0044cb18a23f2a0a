"""Threshold quantisation with residual error feedback (Strom 2015), numba kernels.

A rank adds its gradient sum to its residual ``r``; every entry with ``|r_j| >= tau``
is sent as ``+tau`` or ``-tau`` and that amount leaves the residual, the rest waits for
later steps. So at all times: sum of sent amounts + residual = sum of gradients fed.

Wire format: one word per sent entry, its top bit the sign (set: ``-tau``), the other bits
the parameter index: uint32 (models of fewer than 2**31 parameters) or, for models of at
most 2**15 parameters, uint16 (``entry_dtype`` picks: half the bytes per entry). The
kernels take any unsigned word and derive the sign bit from its width.

Compact wire format (``encode_gaps`` / ``decode_gaps``, the host threshold sync's): the
sent entries in index order, each one LEB128 varint of ``2 * gap + sign`` where gap is the
number of skipped indices since the previous sent entry (the first counts from -1). A
model whose entries are spread over many parameters pays 1 byte per entry while sent
entries lie under 64 indices apart (the softmax of the benches: 650 parameters) and 2
bytes under 8192 apart (its MLP: 19210).

The public functions check shapes and dtypes in O(1) and call the raw ``_*`` kernels;
each kernel is one pass over its input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

__all__ = ["INDEX_MASK", "MAX_GAP_BYTES", "MAX_PARAMS", "MAX_PARAMS_16", "SIGN_BIT", "decode", "decode_gaps", "encode",
           "encode_gaps", "entry_dtype", "warmup"]

SIGN_BIT = np.uint32(0x80000000)
INDEX_MASK = np.uint32(0x7FFFFFFF)
MAX_PARAMS = 1 << 31
MAX_PARAMS_16 = 1 << 15   # indices 0..2**15-1 fit the uint16 format
MAX_GAP_BYTES = 5         # bytes of one varint entry at most (2 * gap + 1 < 2**32 < 2**35)


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


@njit(cache=True, fastmath=False, nogil=True)
def _encode_gaps(residual: np.ndarray, grad: np.ndarray, tau: float, out: np.ndarray) -> tuple[int, int]:
    """Add grad into residual, write the +-tau entries as gap varints into out; return (entries, bytes)."""
    m = 0
    nb = 0
    prev = -1
    for j in range(residual.shape[0]):
        r = residual[j] + grad[j]
        neg = -1
        if r >= tau:
            neg = 0
            r -= tau
        elif r <= -tau:
            neg = 1
            r += tau
        residual[j] = r
        if neg >= 0:
            v = np.uint64(2 * (j - prev - 1) + neg)
            prev = j
            m += 1
            while v >= 128:
                out[nb] = np.uint8((v & np.uint64(127)) | np.uint64(128))
                nb += 1
                v >>= np.uint64(7)
            out[nb] = np.uint8(v)
            nb += 1
    return m, nb


@njit(cache=True, fastmath=False, nogil=True)
def _decode_gaps(buf: np.ndarray, tau: float, g: np.ndarray) -> int:
    """Add the +-tau entries of one gap-varint block to g; return the entry count, -1 if corrupt."""
    n = g.shape[0]
    j = -1
    m = 0
    i = 0
    while i < buf.shape[0]:
        v = np.uint64(0)
        shift = np.uint64(0)
        while True:
            if i >= buf.shape[0] or shift > np.uint64(56):
                return -1          # a varint cut off at the block's end, or too long
            b = np.uint64(buf[i])
            i += 1
            v |= (b & np.uint64(127)) << shift
            shift += np.uint64(7)
            if b < 128:
                break
        j += 1 + np.int64(v >> np.uint64(1))
        if j >= n:
            return -1
        if v & np.uint64(1):
            g[j] -= tau
        else:
            g[j] += tau
        m += 1
    return m


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


def encode_gaps(residual: np.ndarray, grad: np.ndarray, tau: float, out: np.ndarray) -> tuple[int, int]:
    """Add grad to residual in place, write the +-tau entries as gap varints into out; return (entries, bytes).

    residual, grad: float64 (n,); out: uint8 with room for ``MAX_GAP_BYTES * n`` bytes (the
    worst case; a model's typical block is a small fraction of it).
    """
    _check(residual, "residual", np.float64, writable=True)
    _check(grad, "grad", np.float64)
    _check(out, "out", np.uint8, writable=True)
    n = residual.shape[0]
    if grad.shape != (n,):
        raise ValueError(f"grad must have shape ({n},) like residual, got {grad.shape}")
    if out.shape[0] < MAX_GAP_BYTES * n:
        raise ValueError(f"out must hold {MAX_GAP_BYTES * n} bytes (the worst case), has {out.shape[0]}")
    m, nb = _encode_gaps(residual, grad, _check_tau(tau), out)
    return int(m), int(nb)


def decode_gaps(block: np.ndarray, tau: float, g: np.ndarray) -> int:
    """Add the +-tau entries of one rank's gap-varint ``block`` (uint8) to g (float64); return their count.

    Adds rather than fills, so that every rank's block lands in the same sum.
    """
    _check(block, "block", np.uint8)
    _check(g, "g", np.float64, writable=True)
    m = int(_decode_gaps(block, _check_tau(tau), g))
    if m < 0:
        raise ValueError(f"gap-varint block of {block.shape[0]} bytes is cut off or addresses an index >= "
                         f"{g.shape[0]} (corrupt or foreign buffer)")
    return m


def warmup() -> None:
    """Compile both kernels for both wire words on tiny inputs or load them from numba's cache."""
    for dtype in (np.uint32, np.uint16):
        r = np.array([0.5, -2.0, 0.1])
        out = np.empty(3, dtype)
        m = _encode(r, np.array([1.0, -0.5, 0.2]), 1.0, out, _sign_bit(dtype))
        _decode(out[:m], 1.0, np.empty(3), _sign_bit(dtype))
    buf = np.empty(MAX_GAP_BYTES * 3, np.uint8)
    _, nb = _encode_gaps(np.array([0.5, -2.0, 0.1]), np.array([1.0, -0.5, 0.2]), 1.0, buf)
    _decode_gaps(buf[:nb], 1.0, np.zeros(3))
