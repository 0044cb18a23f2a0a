"""Explicit SIMD loops for the GLM kernels, written in LLVM vector IR as numba intrinsics.

numba's loop vectoriser gave the GLM kernels' two inner loops code that ran well below
what the core can do with them (one thread, Zen 4, rows in L1, d = 128, float32):
- the gradient update g += sum_t r_t x_t, eight rows a pass over g, ran at 4.6-5.9 ns a
  row: one chain of eight dependent FMAs per 16 columns, g loaded and stored per pass;
- the logits, two rows a pass over w (``kernels.cpu_glm._dot2``), at 4.5 ns a row.
Here the accumulators are IR values that LLVM keeps in registers:
- ``add_rows``: 128 columns of g (8 vectors of 16 lanes) stay in registers while the rows
  stream past, one FMA per element: 2.9-3.1 ns a row (1.6x);
- ``dot_rows8``: eight rows' dot products with w, w's 128 columns in registers, each row
  read in address order, and the eight vector sums reduced to eight row sums by a
  transpose tree (16 shuffles and 8 adds, not 8 separate lane reductions): 3.2 ns a row
  (1.4x).
- ``linear_rows``: the float32 linear gradient in one pass a row (kernels.cpu_glm has why
  and the figures).
The order of every sum is fixed by the code: lane j of a vector holds the same columns
on any machine (LLVM splits a 16-lane vector into two on AVX2, lane for lane), and each
vector FMA is ``llvm.fma`` (one rounding). So the results do not depend on the vector
width, unlike the vectoriser's reductions: AVX2 and AVX-512 builds gave the same bits.
The scalar loops for the columns past the last whole vector are FMAs by contraction,
which needs an FMA unit (every AVX2 and AVX-512 core has one); on an older core they
round twice there.
The intrinsics check no bounds and assume no overlap: callers keep the rows, offsets and
outputs in range, and g / out apart from X / w (the GLM and softmax kernels do).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16   # lanes per vector: a zmm of float32 (two of float64)
TILE = 8     # vectors per tile: 128 columns held in registers

_I32 = ir.IntType(32)


def _c_array(a, dtypes, ndim=1) -> bool:  # type: ignore[no-untyped-def]
    """Return True for a numba C-contiguous array type of ndim and one of dtypes: the
    intrinsics compute element offsets as row * d + column, so strided views are refused
    at typing (numba then reports no matching signature)."""
    return isinstance(a, types.Array) and a.layout == "C" and a.ndim == ndim and a.dtype in dtypes


def _load(builder, ptr, idx, vp):  # type: ignore[no-untyped-def]
    """Return the vector at ptr[idx] (element index; 4-byte aligned only)."""
    v = builder.load(builder.bitcast(cgutils.gep(builder, ptr, idx), vp))
    v.align = 4
    return v


def _store(builder, val, ptr, idx):  # type: ignore[no-untyped-def]
    st = builder.store(val, builder.bitcast(cgutils.gep(builder, ptr, idx), val.type.as_pointer()))
    st.align = 4


def _shuffle(builder, a, b, mask):  # type: ignore[no-untyped-def]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


def _fma(builder, vt):  # type: ignore[no-untyped-def]
    name = f"llvm.fma.v{LANES}{'f32' if isinstance(vt.element, ir.FloatType) else 'f64'}"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), name)


def _make_add_tiles(tile: int):  # type: ignore[no-untyped-def]
    """Return an intrinsic adding rows times residuals into ntiles tiles of ``tile`` vectors."""

    @intrinsic
    def add_tiles(typingctx, g, X, i, r, o, m, c0, ntiles):  # type: ignore[no-untyped-def]
        # g[c : c + tile*LANES] += r[o + t] * X[i + t, same columns] for t < m in order, for
        # each tile c = c0, c0 + tile*LANES, ... (ntiles of them). X float32; g and r of one
        # float type (float64: x widened exactly before its FMA).
        if not (_c_array(g, (types.float32, types.float64)) and _c_array(X, (types.float32,), 2)
                and _c_array(r, (g.dtype,))):
            return None
        sig = types.none(g, X, i, r, o, m, c0, ntiles)

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            ga = context.make_array(sig.args[0])(context, builder, args[0])
            xa = context.make_array(sig.args[1])(context, builder, args[1])
            ra = context.make_array(sig.args[3])(context, builder, args[3])
            intp = context.get_value_type(types.intp)
            i_, o_, m_, c0_, nt_ = (context.cast(builder, args[k], sig.args[k], types.intp)
                                    for k in (2, 4, 5, 6, 7))
            et = context.get_value_type(sig.args[0].dtype)
            vt = ir.VectorType(et, LANES)
            xvp = ir.VectorType(ir.FloatType(), LANES).as_pointer()
            d = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
            fma = _fma(builder, vt)
            accs = [cgutils.alloca_once(builder, vt) for _ in range(tile)]
            with cgutils.for_range(builder, nt_) as tl:
                c = builder.add(c0_, builder.mul(tl.index, intp(LANES * tile)))
                for k in range(tile):
                    builder.store(_load(builder, ga.data, builder.add(c, intp(LANES * k)), vt.as_pointer()),
                                  accs[k])
                with cgutils.for_range(builder, m_) as rl:
                    t = rl.index
                    rv = builder.load(cgutils.gep(builder, ra.data, builder.add(o_, t)))
                    b = builder.insert_element(ir.Constant(vt, ir.Undefined), rv, _I32(0))
                    b = _shuffle(builder, b, ir.Constant(vt, ir.Undefined), [0] * LANES)
                    base = builder.add(builder.mul(builder.add(i_, t), d), c)
                    for k in range(tile):
                        xv = _load(builder, xa.data, builder.add(base, intp(LANES * k)), xvp)
                        if vt.element != xv.type.element:
                            xv = builder.fpext(xv, vt)
                        builder.store(builder.call(fma, [b, xv, builder.load(accs[k])]), accs[k])
                for k in range(tile):
                    _store(builder, builder.load(accs[k]), ga.data, builder.add(c, intp(LANES * k)))
            return context.get_dummy_value()

        return sig, codegen

    return add_tiles


_add_tiles8 = _make_add_tiles(TILE)
_add_tiles1 = _make_add_tiles(1)


@njit(cache=True, fastmath={"contract"}, nogil=True)
def add_rows(g: np.ndarray, X: np.ndarray, i: int, r: np.ndarray, o: int, m: int) -> None:
    """g[:d] += r[o + t] * X[i + t] for t < m, in row order, one FMA per element.

    X float32 (n, d) C-contiguous; g (>= d) and r of one float type. The columns past the
    last whole vector run as a scalar loop in the same row order. Unchecked: rows
    i..i+m of X and r[o:o+m] must exist, and g must not overlap X.
    """
    d = X.shape[1]
    nv = d // LANES
    n8 = nv // TILE
    _add_tiles8(g, X, i, r, o, m, 0, n8)
    _add_tiles1(g, X, i, r, o, m, n8 * TILE * LANES, nv - n8 * TILE)
    for t in range(m):
        x = X[i + t]
        rt = r[o + t]
        for j in range(nv * LANES, d):
            g[j] += rt * x[j]


@intrinsic
def _dot_tiles8(typingctx, X, i, w, nvec, out, oo):  # type: ignore[no-untyped-def]
    # out[oo + q] = X[i + q, :nvec*LANES] . w[:nvec*LANES] for q < 8, float32. Row by row
    # within tiles of TILE vectors (the tile of w held in registers), so each row is read
    # in address order; the vectors past the last whole tile go column by column.
    if not (_c_array(X, (types.float32,), 2) and _c_array(w, (types.float32,))
            and _c_array(out, (types.float32,))):
        return None
    sig = types.none(X, i, w, nvec, out, oo)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        xa = context.make_array(sig.args[0])(context, builder, args[0])
        wa = context.make_array(sig.args[2])(context, builder, args[2])
        oa = context.make_array(sig.args[4])(context, builder, args[4])
        intp = context.get_value_type(types.intp)
        i_, nv, oo_ = (context.cast(builder, args[k], sig.args[k], types.intp) for k in (1, 3, 5))
        vt = ir.VectorType(ir.FloatType(), LANES)
        vp = vt.as_pointer()
        d = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
        fma = _fma(builder, vt)
        accs = [cgutils.alloca_once(builder, vt) for _ in range(8)]
        for a in accs:
            builder.store(ir.Constant(vt, [0.0] * LANES), a)
        rows = [builder.mul(builder.add(i_, intp(q)), d) for q in range(8)]
        ntile = builder.sdiv(nv, intp(TILE))
        with cgutils.for_range(builder, ntile) as tl:
            c = builder.mul(tl.index, intp(LANES * TILE))
            wv = [_load(builder, wa.data, builder.add(c, intp(LANES * k)), vp) for k in range(TILE)]
            for q in range(8):
                a = builder.load(accs[q])
                for k in range(TILE):
                    xv = _load(builder, xa.data, builder.add(rows[q], builder.add(c, intp(LANES * k))), vp)
                    a = builder.call(fma, [xv, wv[k], a])
                builder.store(a, accs[q])
        with cgutils.for_range(builder, builder.sub(nv, builder.mul(ntile, intp(TILE)))) as vl:
            c = builder.mul(builder.add(builder.mul(ntile, intp(TILE)), vl.index), intp(LANES))
            w1 = _load(builder, wa.data, c, vp)
            for q in range(8):
                xv = _load(builder, xa.data, builder.add(rows[q], c), vp)
                builder.store(builder.call(fma, [xv, w1, builder.load(accs[q])]), accs[q])
        a = [builder.load(x) for x in accs]
        # Transpose tree: pairs of vectors fold their halves into one vector (row 2p in
        # lanes 0-7, 2p+1 in 8-15), then quarters, eighths, and the last pair of lanes.
        h = [builder.fadd(_shuffle(builder, a[2 * p], a[2 * p + 1], [*range(0, 8), *range(16, 24)]),
                          _shuffle(builder, a[2 * p], a[2 * p + 1], [*range(8, 16), *range(24, 32)]))
             for p in range(4)]
        qm = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
        u = [builder.fadd(_shuffle(builder, h[2 * p], h[2 * p + 1], qm),
                          _shuffle(builder, h[2 * p], h[2 * p + 1], [x + 4 for x in qm]))
             for p in range(2)]
        em = [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]
        v = builder.fadd(_shuffle(builder, u[0], u[1], em), _shuffle(builder, u[0], u[1], [x + 2 for x in em]))
        z = builder.fadd(_shuffle(builder, v, v, [0, 2, 4, 6, 8, 10, 12, 14]),
                         _shuffle(builder, v, v, [1, 3, 5, 7, 9, 11, 13, 15]))
        _store(builder, z, oa.data, oo_)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath={"contract"}, nogil=True)
def dot_rows8(X: np.ndarray, i: int, w: np.ndarray, out: np.ndarray, oo: int) -> None:
    """out[oo + q] = X[i + q] . w[:d] for q < 8, float32 (X float32 (n, d), w and out float32).

    The columns past the last whole vector are added after, in column order. Unchecked:
    rows i..i+8 of X and out[oo:oo+8] must exist.
    """
    d = X.shape[1]
    nv = d // LANES
    _dot_tiles8(X, i, w, nv, out, oo)
    if nv * LANES < d:
        for q in range(8):
            x = X[i + q]
            s = out[oo + q]
            for j in range(nv * LANES, d):
                s += x[j] * w[j]
            out[oo + q] = s


def _emit_linear_rows(builder, intp, arrays, i_, m_, bias, d, nv):  # type: ignore[no-untyped-def]
    """Emit ``linear_rows``' loop for rows of nv vectors (nv fixed: the row stays in registers)."""
    ga, xa, wa, ya, aa = arrays
    f32, f64 = ir.FloatType(), ir.DoubleType()
    vt = ir.VectorType(f32, LANES)
    vp = vt.as_pointer()
    fma = _fma(builder, vt)
    wv = [_load(builder, wa.data, intp(LANES * k), vp) for k in range(nv)]
    gacc = [cgutils.alloca_once(builder, vt) for _ in range(nv)]
    for a in gacc:
        builder.store(ir.Constant(vt, [0.0] * LANES), a)
    sums = [cgutils.gep(builder, aa.data, intp(k)) for k in (0, 1)]
    loss, rsum = (cgutils.alloca_once(builder, f64) for _ in range(2))
    builder.store(builder.load(sums[0]), loss)
    builder.store(builder.load(sums[1]), rsum)
    with cgutils.for_range(builder, m_) as rl:
        row = builder.add(i_, rl.index)
        base = builder.mul(row, d)
        xv = [_load(builder, xa.data, builder.add(base, intp(LANES * k)), vp) for k in range(nv)]
        chains = [builder.fmul(xv[k], wv[k]) for k in range(min(2, nv))]
        for k in range(2, nv):
            chains[k % 2] = builder.call(fma, [xv[k], wv[k], chains[k % 2]])
        z = chains[0] if nv == 1 else builder.fadd(chains[0], chains[1])
        for half in (8, 4, 2, 1):   # lanes [0, half) + [half, 2 half)
            z = builder.fadd(_shuffle(builder, z, z, [*range(half), *range(LANES - half)]),
                             _shuffle(builder, z, z, [*range(half, 2 * half), *range(LANES - half)]))
        yv = builder.fpext(builder.load(cgutils.gep(builder, ya.data, row)), f64)
        r = builder.fsub(builder.fadd(builder.fpext(builder.extract_element(z, _I32(0)), f64), bias), yv)
        builder.store(builder.fadd(builder.load(loss), builder.fmul(f64(0.5), builder.fmul(r, r))), loss)
        builder.store(builder.fadd(builder.load(rsum), r), rsum)
        rb = builder.insert_element(ir.Constant(vt, ir.Undefined), builder.fptrunc(r, f32), _I32(0))
        rb = _shuffle(builder, rb, ir.Constant(vt, ir.Undefined), [0] * LANES)
        for k in range(nv):
            builder.store(builder.call(fma, [rb, xv[k], builder.load(gacc[k])]), gacc[k])
    for k in range(nv):
        _store(builder, builder.load(gacc[k]), ga.data, intp(LANES * k))
    builder.store(builder.load(loss), sums[0])
    builder.store(builder.load(rsum), sums[1])


@intrinsic
def _linear_rows(typingctx, g, X, i, m, w, y, b, acc):  # type: ignore[no-untyped-def]
    # For t < m in row order, row = i + t, d = nv * LANES: z = X[row] . w (float32 FMAs:
    # even vectors in one chain, odd in another, then a halving tree over the lanes);
    # r = (z + b) - y[row] in float64; acc[0] += 0.5 r^2 and acc[1] += r in row order;
    # g[:d] = sum of float32(r) * X[row] (float32 FMAs, from zero). Each row's vectors are
    # loaded once and stay in registers for both of its FMAs, so the loop is emitted once
    # per vector count (1..TILE) and the IR switches on d.
    if not (_c_array(g, (types.float32,)) and _c_array(X, (types.float32,), 2)
            and _c_array(w, (types.float32,)) and _c_array(y, (types.float32,))
            and _c_array(acc, (types.float64,))):
        return None
    sig = types.none(g, X, i, m, w, y, b, acc)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        arrays = [context.make_array(sig.args[k])(context, builder, args[k]) for k in (0, 1, 4, 5, 7)]
        intp = context.get_value_type(types.intp)
        i_, m_ = (context.cast(builder, args[k], sig.args[k], types.intp) for k in (2, 3))
        bias = context.cast(builder, args[6], sig.args[6], types.float64)
        d = cgutils.unpack_tuple(builder, arrays[1].shape, 2)[1]
        end = builder.append_basic_block("linear_rows.end")
        switch = builder.switch(d, end)   # d itself: a d with a partial vector runs nothing
        for nv in range(1, TILE + 1):
            block = builder.append_basic_block(f"linear_rows.{nv}")
            switch.add_case(intp(nv * LANES), block)
            builder.position_at_end(block)
            _emit_linear_rows(builder, intp, arrays, i_, m_, bias, d, nv)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def linear_rows_fit(d: int) -> bool:
    """Return whether ``linear_rows`` takes rows of d columns: whole vectors, at most one tile."""
    return 0 < d <= LANES * TILE and d % LANES == 0


@njit(cache=True, nogil=True)
def linear_rows(g: np.ndarray, X: np.ndarray, i: int, m: int, w: np.ndarray, y: np.ndarray, b: float,
                acc: np.ndarray) -> None:
    """The linear float32 gradient of rows i..i+m in one pass, each row held in registers.

    g[:d] = sum of float32(r_t) * X[i + t] (float32, from zero), with r_t = (X[i + t] . w + b)
    - y[i + t] in float64; acc[0] += 0.5 r_t^2 and acc[1] += r_t, in row order. X float32
    (n, d) with ``linear_rows_fit(d)`` (other d: nothing is done); w, g, y float32; acc
    float64 (2,). Unchecked.
    """
    _linear_rows(g, X, i, m, w, y, b, acc)


def _lanes8(context, builder, arr_ty, arr_val):  # type: ignore[no-untyped-def]
    """Return (data pointer, <8 x double> pointer type) of a float64 array argument."""
    a = context.make_array(arr_ty)(context, builder, arr_val)
    return a.data, ir.VectorType(ir.DoubleType(), 8).as_pointer()


def _fold_classes(builder, ptr, k, vp, combine):  # type: ignore[no-untyped-def]
    """Return class 0's 8-lane vector of ptr (k, 8) folded with classes 1..k-1 in order."""
    intp = ir.IntType(64)
    acc = cgutils.alloca_once(builder, vp.pointee)
    builder.store(_load(builder, ptr, intp(0), vp), acc)
    with cgutils.for_range(builder, builder.sub(k, intp(1))) as cl:
        v = _load(builder, ptr, builder.mul(builder.add(cl.index, intp(1)), intp(8)), vp)
        builder.store(combine(builder.load(acc), v), acc)
    return builder.load(acc)


@intrinsic
def softmax8_shift(typingctx, Z, D):  # type: ignore[no-untyped-def]
    """D[c*8:(c+1)*8] = Z[c] - max over classes of Z[:, lane], for Z (k, 8) float64, k >= 1.

    The max keeps the earlier class on ties and NaN (a later one wins only if greater),
    as ``max(m, z)`` in the scalar loop it replaces.
    """
    if not (_c_array(Z, (types.float64,), 2) and _c_array(D, (types.float64,))):
        return None
    sig = types.none(Z, D)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        zp, vp = _lanes8(context, builder, sig.args[0], args[0])
        dp, _ = _lanes8(context, builder, sig.args[1], args[1])
        intp = context.get_value_type(types.intp)
        k = cgutils.unpack_tuple(builder, context.make_array(sig.args[0])(context, builder, args[0]).shape, 2)[0]
        m = _fold_classes(builder, zp, k, vp,
                          lambda a, z: builder.select(builder.fcmp_ordered(">", z, a), z, a))
        with cgutils.for_range(builder, k) as cl:
            off = builder.mul(cl.index, intp(8))
            _store(builder, builder.fsub(_load(builder, zp, off, vp), m), dp, off)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def softmax8_scale(typingctx, E, Z, s):  # type: ignore[no-untyped-def]
    """s[:8] = sum over classes of E (class order); Z[c] = E[c*8:(c+1)*8] * (1 / s).

    Z (k, 8) with k >= 1, E at least 8 k long, s at least 8.
    """
    if not (_c_array(E, (types.float64,)) and _c_array(Z, (types.float64,), 2)
            and _c_array(s, (types.float64,))):
        return None
    sig = types.none(E, Z, s)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ep, vp = _lanes8(context, builder, sig.args[0], args[0])
        zp, _ = _lanes8(context, builder, sig.args[1], args[1])
        sp, _ = _lanes8(context, builder, sig.args[2], args[2])
        intp = context.get_value_type(types.intp)
        k = cgutils.unpack_tuple(builder, context.make_array(sig.args[1])(context, builder, args[1]).shape, 2)[0]
        sv = _fold_classes(builder, ep, k, vp, builder.fadd)
        _store(builder, sv, sp, intp(0))
        inv = builder.fdiv(ir.Constant(vp.pointee, [1.0] * 8), sv)
        with cgutils.for_range(builder, k) as cl:
            off = builder.mul(cl.index, intp(8))
            _store(builder, builder.fmul(_load(builder, ep, off, vp), inv), zp, off)
        return context.get_dummy_value()

    return sig, codegen
