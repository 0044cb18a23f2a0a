"""A software prefetch for numba kernels: ``prefetch(arr, byte_offset)`` emits llvm.prefetch.

Kernels that read rows the hardware prefetcher cannot foresee (the tree kernels' row
orders), or read sequentially but in bursts with long compute in between (the softmax
gradient's eight-row blocks), ask for the lines they will need next while they compute.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["prefetch"]


@intrinsic
def prefetch(typingctx: object, arr: types.Array, offset: types.Integer) -> tuple[object, object] | None:
    """Ask the CPU to load the cache line at byte offset of arr's data (a hint: never faults, no result)."""
    if not isinstance(arr, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context: object, builder: ir.IRBuilder, signature: object, args: tuple[object, ...]) -> object:
        ary = context.make_array(signature.args[0])(context, builder, args[0])  # type: ignore[attr-defined]
        base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        off = context.cast(builder, args[1], signature.args[1], types.intp)  # type: ignore[attr-defined]
        ptr = builder.gep(base, [off])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep, data
        return context.get_dummy_value()  # type: ignore[attr-defined]

    return types.void(arr, offset), codegen
