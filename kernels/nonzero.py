"""The column indices of a row's nonzeros, for the sparse kernels: one cache line of the row at a time.

A numba loop can write the indices of the nonzeros one after another (compact them) only one element at a
time, each element waiting for the count before it. On AVX-512, one instruction (vpcompressd, LLVM's
masked compress-store) writes the indices that a cache line's nonzero lanes select.

`nonzero_columns` is the Python definition (it runs as written under NUMBA_DISABLE_JIT); compiled code
gets the overload below: on a CPU with AVX-512, `_compress_line` for every whole line of the range and a
branch-free loop for the rest; elsewhere (LLVM would expand the compress-store into a branch per lane), and
for rows that are not contiguous, the branch-free loop alone.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .jit import CACHE_LINE, CPU_FEATURES

COMPRESS = '+avx512f' in CPU_FEATURES.split(',')


def nonzero_columns(xi, lo, hi, ci):
    """Writes the indices j in lo..hi-1 (0 <= lo <= hi <= len(xi)) where xi[j] != 0 (NaN included, -0.0
    not) to ci[0], ci[1], ... in order and returns how many there are. ci must hold hi - lo entries; the
    compiled version may write past the count too (scratch for the caller)."""
    c = 0
    for j in range(lo, hi):
        if xi[j] != 0:
            ci[c] = j
            c += 1
    return c


def _lanes(dtype):
    """How many numbers of dtype fill a cache line."""
    return CACHE_LINE * 8 // dtype.bitwidth


@intrinsic
def _compress_line(typingctx, xi, j, ci, c):
    """ci[c:] gets the indices j, j + 1, ... of the nonzeros among the entries of xi from j on that fill a
    cache line, in order; returns c plus their number. For the arrays the overload below passes it (xi a
    contiguous 1-D float array with xi[j:j + lanes] in bounds, ci a contiguous 1-D int32 array with room for
    the nonzeros)."""
    lanes = _lanes(xi.dtype)

    def codegen(context, builder, signature, args):
        x_arr, j_val, c_arr, c_val = args
        xs = context.make_array(signature.args[0])(context, builder, x_arr)
        cs = context.make_array(signature.args[2])(context, builder, c_arr)
        fty, i32, i1 = context.get_value_type(xi.dtype), ir.IntType(32), ir.IntType(1)
        line = builder.bitcast(builder.gep(xs.data, [j_val]), ir.VectorType(fty, lanes).as_pointer())
        values = builder.load(line, align=xi.dtype.bitwidth // 8)
        mask = builder.fcmp_unordered('!=', values, ir.Constant(ir.VectorType(fty, lanes), None))
        first = builder.insert_element(ir.Constant(ir.VectorType(i32, lanes), ir.Undefined),
                                       builder.trunc(j_val, i32), ir.Constant(i32, 0))
        first = builder.shuffle_vector(first, first, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
        indices = builder.add(first, ir.Constant(ir.VectorType(i32, lanes), list(range(lanes))))
        store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.VectorType(i32, lanes), cs.data.type,
                                                              ir.VectorType(i1, lanes)]),
            f'llvm.masked.compressstore.v{lanes}i32')
        builder.call(store, [indices, builder.gep(cs.data, [c_val]), mask])
        bits = builder.bitcast(mask, ir.IntType(lanes))
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bits.type, [bits.type]),
                                               f'llvm.ctpop.i{lanes}')
        found = builder.zext(builder.call(ctpop, [bits]), c_val.type)
        return builder.add(c_val, found)
    return types.intp(xi, types.intp, ci, types.intp), codegen


@overload(nonzero_columns, inline='always')
def _nonzero_columns_compiled(xi, lo, hi, ci):
    lines = (COMPRESS and isinstance(xi.dtype, types.Float) and ci.dtype == types.int32
             and xi.ndim == ci.ndim == 1 and xi.layout == ci.layout == 'C')
    if not lines:
        return lambda xi, lo, hi, ci: _branch_free(xi, lo, hi, ci, 0)
    lanes = _lanes(xi.dtype)

    def impl(xi, lo, hi, ci):
        c, j = 0, lo
        while j + lanes <= hi:
            c = _compress_line(xi, j, ci, c)
            j += lanes
        return _branch_free(xi, j, hi, ci, c)
    return impl


@njit(inline='always')
def _branch_free(xi, j, hi, ci, c):
    """nonzero_columns from xi[j] up to hi, c found before j: writes every index, advances only past a nonzero."""
    for q in range(j, hi):
        ci[c] = q
        c += xi[q] != 0
    return c
