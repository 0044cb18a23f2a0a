"""Gradient, compression and optimizer kernels on device arrays with numba.cuda.

Same conventions as ``kernels.cpu`` (X float32 C-contiguous (n, d), y float32 (n,), flat
float64 parameters, gradient *sums*). Every gradient kernel writes ONE float64 vector
``out``: the gradient sum (n_params), then the loss sum. That is the layout of the dense
sync's send buffer (gradient, then the extras, loss first), so the kernel can write
straight into it.

Determinism: no floating-point atomics. Block ``b`` owns a contiguous chunk of rows and
writes its partial sums into row ``b`` of ``part`` (n_blocks, n_params + 1) in a fixed
order; ``_sum_blocks`` then adds the rows in block order, one thread per column. The
block count comes from the row count alone (``n_blocks``), never from the device, so a
result depends on the data only, not on scheduling or on the GPU model.

The threshold decoder counts +-tau entries per index with integer atomics (associative,
so order-free) and multiplies once: ``count * tau``. The optimizer update uses libdevice's
``dmul_rn`` / ``dadd_rn`` / ``ddiv_rn``, which NVVM never contracts into a fused
multiply-add, so its rounding is numpy's, bit for bit.

Runs under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, read when numba is first
imported) on the CPU, slowly. Importing this module defines kernels and touches no GPU:
numba compiles a kernel on its first launch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import config, cuda, float32, float64, int32

__all__ = [
    "INDEX_MASK",
    "MAX_BLOCKS",
    "SIGN_BIT",
    "TPB",
    "decode",
    "encode",
    "encode_scratch",
    "linear_grad",
    "logistic_grad",
    "n_blocks",
    "partials",
    "sgd_update",
    "simulated",
    "softmax_grad",
    "stream_sync",
]

TPB = 128            # threads per block of the row kernels
TILE_COLS = 32       # columns of X staged in shared memory per pass (one 128-byte line per row)
_SX_COLS = TILE_COLS + 1   # +1: no shared-memory bank conflicts (a shape must be a constant, not an expression)
MAX_BLOCKS = 1024    # beyond this a block loops over several tiles of its chunk
SIGN_BIT = np.uint32(0x80000000)
INDEX_MASK = np.uint32(0x7FFFFFFF)
_SIGN_ADD = 1 << 31  # int64: stored into a uint32 it sets bit 31
_ZERO_I32 = np.zeros(1, np.int32)   # resets decode's range-check flag (copied, never written)
_LINEAR, _LOGISTIC = 0, 1


def simulated() -> bool:
    """Return whether numba runs CUDA kernels in its CPU simulator (NUMBA_ENABLE_CUDASIM=1)."""
    return bool(getattr(config, "ENABLE_CUDASIM", 0))


def _allow_small_grids() -> None:
    """Turn off numba's warning for grids under 128 blocks (NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS).

    Small grids are by design here: the scan runs in one block, the reductions launch one
    block per 128 outputs, and a small batch has few row blocks. numba would warn at each
    such launch site in every rank's log (and a test run with warnings as errors fails).
    numba-cuda reads its own config module; numba's built-in target reads numba's.
    """
    import importlib
    for name in ("numba.core.config", "numba.cuda.core.config"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "CUDA_LOW_OCCUPANCY_WARNINGS"):
            module.CUDA_LOW_OCCUPANCY_WARNINGS = 0


_allow_small_grids()


# --------------------------------------------------------------------------- rounding
# libdevice's __nv_d*_rn are "never merged into a single multiply-add instruction"; a
# plain a * b + c may become an FMA (NVVM contracts by default), which rounds once where
# numpy rounds twice. The simulator runs Python floats, which never contract, and has
# no libdevice, so it gets plain operators.
if simulated():
    @cuda.jit(device=True)
    def _mul(a: float, b: float) -> float:
        return a * b

    @cuda.jit(device=True)
    def _add(a: float, b: float) -> float:
        return a + b

    @cuda.jit(device=True)
    def _div(a: float, b: float) -> float:
        return a / b
else:
    # The libdevice functions themselves, not device functions wrapping them: a kernel
    # that calls a @cuda.jit(device=True) function cannot be compiled without a GPU
    # (numba asks the current device for its compute capability), and the compile check
    # (kernels.gpu_compile) must run where there is none.
    from numba.cuda.libdevice import dadd_rn as _add  # type: ignore[no-redef]
    from numba.cuda.libdevice import ddiv_rn as _div  # type: ignore[no-redef]
    from numba.cuda.libdevice import dmul_rn as _mul  # type: ignore[no-redef]


# --------------------------------------------------------------------------- kernels


@cuda.jit
def _glm_partials(X: Any, y: Any, w: Any, kind: int, chunk: int, part: Any) -> None:
    """Write block b's sums over its rows [b*chunk, (b+1)*chunk): r*x per column, r, loss."""
    n, d = X.shape
    t: int = cuda.threadIdx.x
    b: int = cuda.blockIdx.x
    sx = cuda.shared.array((TPB, _SX_COLS), float32)
    sr = cuda.shared.array(TPB, float64)
    sl = cuda.shared.array(TPB, float64)
    lo = b * chunk
    hi = min(lo + chunk, n)
    for j in range(t, d + 2, TPB):
        part[b, j] = 0.0
    for r0 in range(lo, hi, TPB):
        m = min(TPB, hi - r0)
        z = 0.0
        for c0 in range(0, d, TILE_COLS):
            # Coalesced: a warp reads one row's 32 consecutive columns at a time.
            for e in range(t, TPB * TILE_COLS, TPB):
                rr = e // TILE_COLS
                cc = e - rr * TILE_COLS
                if rr < m and c0 + cc < d:
                    sx[rr, cc] = X[r0 + rr, c0 + cc]
            cuda.syncthreads()
            if t < m:
                for cc in range(min(TILE_COLS, d - c0)):
                    z += sx[t, cc] * w[c0 + cc]
            cuda.syncthreads()
        if t < m:
            z += w[d]
            yi = float64(y[r0 + t])
            if kind == _LOGISTIC:
                # One exp serves the stable loss and the stable sigmoid, as in kernels.cpu.
                ez = math.exp(-abs(z))
                sl[t] = math.log1p(ez) + max(z, 0.0) - yi * z
                q = 1.0 / (1.0 + ez)
                sr[t] = (q if z >= 0.0 else ez * q) - yi
            else:
                r = z - yi
                sl[t] = 0.5 * r * r
                sr[t] = r
        cuda.syncthreads()
        # Thread t owns columns t, t+TPB, ...: each sums the tile's rows in order.
        for j in range(t, d + 2, TPB):
            s = 0.0
            if j < d:
                for i in range(m):
                    s += sr[i] * X[r0 + i, j]
            elif j == d:
                for i in range(m):
                    s += sr[i]
            else:
                for i in range(m):
                    s += sl[i]
            part[b, j] += s
        cuda.syncthreads()   # sr / sl are refilled by the next tile


_SOFTMAX: dict[int, Any] = {}


def _softmax_kernel(k: int) -> Any:
    """Return the softmax partial-sum kernel for ``k`` classes (k is a compile-time constant)."""
    if k in _SOFTMAX:
        return _SOFTMAX[k]

    @cuda.jit
    def _softmax_partials(X: Any, y: Any, W: Any, chunk: int, R: Any, part: Any) -> None:
        n, d = X.shape
        t: int = cuda.threadIdx.x
        b: int = cuda.blockIdx.x
        sx = cuda.shared.array((TPB, _SX_COLS), float32)
        sl = cuda.shared.array(TPB, float64)
        z = cuda.local.array(k, float64)
        width = (d + 1) * k
        lo = b * chunk
        hi = min(lo + chunk, n)
        for q in range(t, width + 1, TPB):
            part[b, q] = 0.0
        for r0 in range(lo, hi, TPB):
            m = min(TPB, hi - r0)
            for c in range(k):
                z[c] = W[d * k + c]
            for c0 in range(0, d, TILE_COLS):
                # The tile staging of _glm_partials, written out again: a shared
                # @cuda.jit(device=True) helper would compile only against a live GPU,
                # and kernels.gpu_compile must compile these kernels without one.
                for e in range(t, TPB * TILE_COLS, TPB):
                    rr = e // TILE_COLS
                    cc = e - rr * TILE_COLS
                    if rr < m and c0 + cc < d:
                        sx[rr, cc] = X[r0 + rr, c0 + cc]
                cuda.syncthreads()
                if t < m:
                    for cc in range(min(TILE_COLS, d - c0)):
                        a = float64(sx[t, cc])
                        base = (c0 + cc) * k
                        for c in range(k):
                            z[c] += a * W[base + c]
                cuda.syncthreads()
            if t < m:
                # softmax(z) - onehot(label) and the cross-entropy, as kernels.cpu does it.
                label = int32(y[r0 + t])
                mx = z[0]
                for c in range(1, k):
                    mx = max(mx, z[c])
                zl = z[label] - mx
                s = 0.0
                for c in range(k):
                    z[c] = math.exp(z[c] - mx)
                    s += z[c]
                inv = 1.0 / s
                for c in range(k):
                    R[r0 + t, c] = z[c] * inv
                R[r0 + t, label] -= 1.0
                sl[t] = math.log(s) - zl
            cuda.syncthreads()   # R's rows of this tile are written
            for q in range(t, width + 1, TPB):
                s = 0.0
                if q < d * k:
                    j = q // k
                    c = q - j * k
                    for i in range(m):
                        s += X[r0 + i, j] * R[r0 + i, c]
                elif q < width:
                    c = q - d * k
                    for i in range(m):
                        s += R[r0 + i, c]
                else:
                    for i in range(m):
                        s += sl[i]
                part[b, q] += s
            cuda.syncthreads()

    _SOFTMAX[k] = _softmax_partials
    return _softmax_partials


@cuda.jit
def _sum_blocks(part: Any, nb: int, out: Any) -> None:
    """out[j] = sum of part[b, j] over b = 0 .. nb-1, in that order."""
    j = cuda.grid(1)
    if j < out.shape[0]:
        s = 0.0
        for b in range(nb):
            s += part[b, j]
        out[j] = s


@cuda.jit
def _threshold_flags(residual: Any, grad: Any, tau: float, flags: Any, counts: Any) -> None:
    """r += g; flag entries with |r| >= tau (1: +tau, 2: -tau) and take tau off; count per block."""
    j = cuda.grid(1)
    f = 0
    if j < residual.shape[0]:
        r = residual[j] + grad[j]
        if r >= tau:
            f = 1
            r -= tau
        elif r <= -tau:
            f = 2
            r += tau
        residual[j] = r
        flags[j] = f
    c = cuda.syncthreads_count(int32(f))   # counts the threads with f != 0 (the predicate must be int32)
    if cuda.threadIdx.x == 0:
        counts[cuda.blockIdx.x] = c


@cuda.jit
def _exclusive_scan(counts: Any, nb: int, offsets: Any) -> None:
    """offsets[b] = sum of counts[:b] for b <= nb (one block; integer sums, so any order is exact)."""
    t: int = cuda.threadIdx.x
    tot = cuda.shared.array(TPB, int32)
    per = (nb + TPB - 1) // TPB
    lo = min(t * per, nb)
    hi = min(lo + per, nb)
    s = 0
    for b in range(lo, hi):
        s += counts[b]
    tot[t] = s
    cuda.syncthreads()
    if t == 0:
        acc = 0
        for i in range(TPB):
            v = tot[i]
            tot[i] = acc
            acc += v
        offsets[nb] = acc
    cuda.syncthreads()
    acc = tot[t]
    for b in range(lo, hi):
        offsets[b] = acc
        acc += counts[b]


@cuda.jit
def _threshold_pack(flags: Any, offsets: Any, out: Any) -> None:
    """Write each flagged index (bit 31: -tau) at its block's offset plus its rank in the block."""
    j = cuda.grid(1)
    t: int = cuda.threadIdx.x
    scan = cuda.shared.array(TPB, int32)
    f = 0
    if j < flags.shape[0]:
        f = flags[j]
    scan[t] = 1 if f != 0 else 0
    cuda.syncthreads()
    step = 1
    while step < TPB:   # Hillis-Steele inclusive scan
        v = scan[t - step] if t >= step else 0
        cuda.syncthreads()
        scan[t] += v
        cuda.syncthreads()
        step *= 2
    if f != 0:
        pos = offsets[cuda.blockIdx.x] + scan[t] - 1
        out[pos] = j + _SIGN_ADD if f == 2 else j


@cuda.jit
def _decode_counts(packed: Any, m: int, counts: Any, bad: Any) -> None:
    """counts[j] += 1 (or -1) per packed entry; bad[0] = 1 if an index is out of range."""
    i = cuda.grid(1)
    if i < m:
        e = packed[i]
        j = e & 0x7FFFFFFF
        if j >= counts.shape[0]:
            bad[0] = 1
        elif e & 0x80000000:
            cuda.atomic.add(counts, j, -1)
        else:
            cuda.atomic.add(counts, j, 1)


@cuda.jit
def _counts_to_grad(counts: Any, tau: float, g: Any) -> None:
    j = cuda.grid(1)
    if j < g.shape[0]:
        g[j] = counts[j] * tau
        counts[j] = 0   # ready for the next decode


@cuda.jit
def _sgd(params: Any, velocity: Any, g: Any, mask: Any, batch: float, l2: float, lr: float,
         momentum: float) -> None:
    """grad = g / batch (+ l2 * mask * params); v = v * momentum + grad; params -= lr * v."""
    j = cuda.grid(1)
    if j < params.shape[0]:
        gr = _div(g[j], batch)
        p = params[j]
        if l2 != 0.0:
            gr = _add(gr, _mul(_mul(l2, mask[j]), p))
        if momentum != 0.0:
            v = _add(_mul(velocity[j], momentum), gr)
            velocity[j] = v
            params[j] = _add(p, -_mul(lr, v))
        else:
            params[j] = _add(p, -_mul(lr, gr))


# --------------------------------------------------------------------------- checks


def _is_device(a: Any) -> bool:
    """Return whether ``a`` is a device array (the simulator's fake ones count)."""
    if simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return isinstance(a, FakeCUDAArray)
    return bool(cuda.is_cuda_array(a))


def _check(a: Any, name: str, dtype: Any, shape: tuple[int, ...]) -> None:
    """Raise TypeError / ValueError unless ``a`` is a device array of dtype and shape."""
    if not _is_device(a):
        raise TypeError(f"{name} must be a device array (numba.cuda), got {type(a).__name__}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")


def _check_rows(X: Any, y: Any) -> tuple[int, int]:
    if not _is_device(X) or len(X.shape) != 2:
        raise TypeError(f"X must be a 2-D device array (n, d), got {type(X).__name__} "
                        f"of shape {getattr(X, 'shape', None)}")
    n, d = X.shape
    _check(X, "X", np.float32, (n, d))
    _check(y, "y", np.float32, (n,))
    return n, d


def n_blocks(n: int) -> int:
    """Return the number of thread blocks (= rows of ``part``) a gradient kernel uses for n rows."""
    return max(1, min(-(-n // TPB), MAX_BLOCKS))


def _chunk(n: int) -> int:
    """Return rows per block: whole tiles, so that only the last block has a partial tile."""
    tiles = -(-n // TPB)
    return -(-tiles // n_blocks(n)) * TPB


def partials(n: int, n_params: int, stream: Any = 0) -> Any:
    """Return scratch for a gradient kernel over up to ``n`` rows: float64 (n_blocks(n), n_params + 1)."""
    return cuda.device_array((n_blocks(n), n_params + 1), np.float64, stream=stream)


def _part(part: Any, n: int, width: int, stream: Any) -> Any:
    need = n_blocks(n)
    if part is None:
        return cuda.device_array((need, width), np.float64, stream=stream)
    if not _is_device(part) or len(part.shape) != 2 or part.shape[0] < need or part.shape[1] != width:
        raise ValueError(f"part must be a float64 device array of at least ({need}, {width}) (see partials()), "
                         f"got {getattr(part, 'shape', None)}")
    return part


def _reduce(part: Any, n: int, out: Any, stream: Any) -> None:
    """Sum the partials of a kernel over n rows into every entry of ``out`` (zeros when n == 0)."""
    _sum_blocks[-(-out.shape[0] // TPB), TPB, stream](part, n_blocks(n) if n else 0, out)


# --------------------------------------------------------------------------- public


def _glm(kind: int, X: Any, y: Any, w: Any, out: Any, part: Any, stream: Any) -> None:
    n, d = _check_rows(X, y)
    _check(w, "w", np.float64, (d + 1,))
    _check(out, "out", np.float64, (d + 2,))
    part = _part(part, n, d + 2, stream)
    if n:
        _glm_partials[n_blocks(n), TPB, stream](X, y, w, kind, _chunk(n), part)
    _reduce(part, n, out, stream)


def linear_grad(X: Any, y: Any, w: Any, out: Any, part: Any = None, stream: Any = 0) -> None:
    """Fill device ``out`` (d+2,) with the summed squared-error gradient (d+1), then the loss sum.

    Asynchronous on ``stream``; ``part`` is scratch from ``partials(n, d + 1)`` (allocated if None).
    """
    _glm(_LINEAR, X, y, w, out, part, stream)


def logistic_grad(X: Any, y: Any, w: Any, out: Any, part: Any = None, stream: Any = 0) -> None:
    """Fill device ``out`` (d+2,) with the summed log-loss gradient (0/1 y), then the loss sum."""
    _glm(_LOGISTIC, X, y, w, out, part, stream)


def softmax_grad(X: Any, y: Any, W_flat: Any, k: int, out: Any, part: Any = None, resid: Any = None,
                 stream: Any = 0) -> None:
    """Fill device ``out`` ((d+1)*k + 1,) with the summed cross-entropy gradient, then the loss sum.

    Labels must lie in 0..k-1 (checked by the caller on the host copy: a device check
    would cost a synchronisation). ``resid``: float64 (>= n, k) scratch for softmax - onehot.
    """
    n, d = _check_rows(X, y)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1 classes, got {k!r}")
    k = int(k)
    _check(W_flat, "W_flat", np.float64, ((d + 1) * k,))
    _check(out, "out", np.float64, ((d + 1) * k + 1,))
    part = _part(part, n, (d + 1) * k + 1, stream)
    if resid is None:
        resid = cuda.device_array((max(n, 1), k), np.float64, stream=stream)
    elif not _is_device(resid) or resid.shape[0] < n or resid.shape[1] != k:
        raise ValueError(f"resid must be a float64 device array of at least ({n}, {k}), got {resid.shape}")
    if n:
        _softmax_kernel(k)[n_blocks(n), TPB, stream](X, y, W_flat, _chunk(n), resid, part)
    _reduce(part, n, out, stream)


def encode(residual: Any, grad: Any, tau: float, out: Any, stream: Any = 0,
           scratch: tuple[Any, Any, Any] | None = None) -> int:
    """Add grad to residual, pack the +-tau entries into ``out`` in index order; return the count.

    Same wire format as ``kernels.compress.encode``. Synchronises ``stream`` (the count
    comes back to the host). ``scratch``: (flags uint8 (n,), counts int32 (nb,), offsets
    int32 (nb+1,)) with nb = ceil(n / TPB), reused between calls.
    """
    n = residual.shape[0] if _is_device(residual) else -1
    _check(residual, "residual", np.float64, (n,))
    _check(grad, "grad", np.float64, (n,))
    if not _is_device(out) or np.dtype(out.dtype) != np.uint32 or out.shape[0] < n:
        raise ValueError(f"out must be a uint32 device array with room for {n} entries")
    tau = float(tau)
    if not 0.0 < tau < np.inf:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    if n == 0:
        return 0
    nb = -(-n // TPB)
    flags, counts, offsets = scratch if scratch is not None else encode_scratch(n, stream)
    _threshold_flags[nb, TPB, stream](residual, grad, tau, flags, counts)
    _exclusive_scan[1, TPB, stream](counts, nb, offsets)
    _threshold_pack[nb, TPB, stream](flags, offsets, out)
    total = np.empty(1, np.int32)
    offsets[nb:nb + 1].copy_to_host(total, stream=stream)
    stream_sync(stream)
    return int(total[0])


def encode_scratch(n: int, stream: Any = 0) -> tuple[Any, Any, Any]:
    """Return reusable scratch for ``encode`` on n entries."""
    nb = -(-n // TPB)
    return (cuda.device_array(max(n, 1), np.uint8, stream=stream), cuda.device_array(nb, np.int32, stream=stream),
            cuda.device_array(nb + 1, np.int32, stream=stream))


def decode(packed: Any, m: int, tau: float, g_out: Any, counts: Any = None, stream: Any = 0,
           bad: Any = None) -> None:
    """Fill device g_out with the sum of the first m packed +-tau entries (any ranks' blocks).

    ``counts``: int32 device zeros of g_out's length, left zeroed again (allocated if None).
    ``bad``: int32 device scratch of one entry for the range check (allocated if None; a
    sync that decodes every step passes its own, so a step allocates no device memory).
    Synchronises ``stream`` to check for an out-of-range index (a corrupt or foreign buffer).
    """
    n = g_out.shape[0] if _is_device(g_out) else -1
    _check(g_out, "g_out", np.float64, (n,))
    if not _is_device(packed) or np.dtype(packed.dtype) != np.uint32 or packed.shape[0] < m:
        raise ValueError(f"packed must be a uint32 device array of at least {m} entries")
    if counts is None:
        counts = cuda.to_device(np.zeros(max(n, 1), np.int32), stream=stream)
    if bad is None:
        bad = cuda.to_device(_ZERO_I32, stream=stream)
    else:
        _check(bad, "bad", np.int32, (1,))
        bad.copy_to_device(_ZERO_I32, stream=stream)
    if m:
        _decode_counts[-(-m // TPB), TPB, stream](packed, m, counts, bad)
    if n:
        _counts_to_grad[-(-n // TPB), TPB, stream](counts, float(tau), g_out)
    flag = bad.copy_to_host(stream=stream)
    stream_sync(stream)
    if flag[0]:
        raise ValueError(f"packed entries address an index >= {n} (corrupt or foreign buffer)")


def sgd_update(params: Any, velocity: Any, g: Any, mask: Any, batch: float, l2: float, lr: float,
               momentum: float, stream: Any = 0) -> None:
    """Take one SGD step in place on device arrays, rounding as numpy does in ``optim.SGD``.

    grad = g / batch + l2 * mask * params (the L2 term only when l2 != 0);
    with momentum: velocity = velocity * momentum + grad, params -= lr * velocity;
    without: params -= lr * grad.
    """
    n = params.shape[0] if _is_device(params) else -1
    for a, name in ((params, "params"), (velocity, "velocity"), (g, "g"), (mask, "mask")):
        _check(a, name, np.float64, (n,))
    if n:
        _sgd[-(-n // TPB), TPB, stream](params, velocity, g, mask, float(batch), float(l2), float(lr),
                                        float(momentum))


def stream_sync(stream: Any) -> None:
    """Wait for ``stream`` (0: the whole device)."""
    if stream:
        stream.synchronize()
    else:
        cuda.synchronize()
