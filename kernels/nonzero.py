"""The column indices of a row's nonzeros, for the sparse kernels: one cache line of the row at a time.

A numba loop can write the indices of the nonzeros one after another (compact them) only one element at a
time, each element waiting for the count before it. On AVX-512, one instruction (vpcompressd, LLVM's
masked compress-store) writes the indices that a cache line's nonzero lanes select. On AVX2, which has no
compress, a 256-bit vector's nonzero lanes form a bit mask (vmovmskps) that picks a row of a table holding
their lane numbers in order: all of that row is stored, plus the vector's first index, and the count
advances by the mask's population count (the entries past it are scratch the next vector overwrites).

`nonzero_columns` is the Python definition (it runs as written under NUMBA_DISABLE_JIT); compiled code
gets the overload below: on a CPU with AVX-512, `_compress_line` for every whole cache line of the range,
on one with AVX2 `_pack_vector` for every whole vector, and a branch-free loop for the rest; elsewhere
(LLVM would expand a compress-store into a branch per lane), and for rows that are not contiguous, the
branch-free loop alone.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .jit import CACHE_LINE, CPU_FEATURES

COMPRESS = '+avx512f' in CPU_FEATURES.split(',')
PACK = not COMPRESS and '+avx2' in CPU_FEATURES.split(',')
VECTOR = 32  # bytes: an AVX2 vector


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


def _lanes(dtype, size=CACHE_LINE):
    """How many numbers of dtype fill size bytes."""
    return size * 8 // dtype.bitwidth


def lane_table(lanes):
    """Row m: the lanes whose bit is set in m, in order, then zeros."""
    table = np.zeros((1 << lanes, lanes), np.int32)
    for m in range(1 << lanes):
        found = [k for k in range(lanes) if m >> k & 1]
        table[m, :len(found)] = found
    return table


def _nonzero_lanes(context, builder, xi, x_arr, j_val, lanes):
    """The mask of the nonzero lanes (une 0: NaN counts, -0.0 does not) of xi[j:j + lanes], loaded as one
    vector."""
    xs = context.make_array(xi)(context, builder, x_arr)
    fty = context.get_value_type(xi.dtype)
    vector = builder.bitcast(builder.gep(xs.data, [j_val]), ir.VectorType(fty, lanes).as_pointer())
    values = builder.load(vector, align=xi.dtype.bitwidth // 8)
    return builder.fcmp_unordered('!=', values, ir.Constant(ir.VectorType(fty, lanes), None))


def _indices(builder, j_val, offsets, lanes):
    """j plus each of the int32 vector offsets."""
    i32 = ir.IntType(32)
    first = builder.insert_element(ir.Constant(ir.VectorType(i32, lanes), ir.Undefined),
                                   builder.trunc(j_val, i32), ir.Constant(i32, 0))
    first = builder.shuffle_vector(first, first, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
    return builder.add(first, offsets)


def _counted(builder, c_val, mask, lanes):
    """c plus the number of lanes set in mask."""
    bits = builder.zext(builder.bitcast(mask, ir.IntType(lanes)), ir.IntType(32))
    ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bits.type, [bits.type]),
                                           'llvm.ctpop.i32')
    return builder.add(c_val, builder.zext(builder.call(ctpop, [bits]), c_val.type))


@intrinsic
def _compress_line(typingctx, xi, j, ci, c):
    """ci[c:] gets the indices j, j + 1, ... of the nonzeros among the entries of xi from j on that fill a
    cache line, in order; returns c plus their number. For the arrays the overload below passes it (xi a
    contiguous 1-D float array with xi[j:j + lanes] in bounds, ci a contiguous 1-D int32 array with room for
    the nonzeros)."""
    lanes = _lanes(xi.dtype)

    def codegen(context, builder, signature, args):
        x_arr, j_val, c_arr, c_val = args
        mask = _nonzero_lanes(context, builder, xi, x_arr, j_val, lanes)
        i32 = ir.IntType(32)
        indices = _indices(builder, j_val, ir.Constant(ir.VectorType(i32, lanes), list(range(lanes))), lanes)
        cs = context.make_array(ci)(context, builder, c_arr)
        store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.VectorType(i32, lanes), cs.data.type,
                                                              ir.VectorType(ir.IntType(1), lanes)]),
            f'llvm.masked.compressstore.v{lanes}i32')
        builder.call(store, [indices, builder.gep(cs.data, [c_val]), mask])
        return _counted(builder, c_val, mask, lanes)
    return types.intp(xi, types.intp, ci, types.intp), codegen


@intrinsic
def _pack_vector(typingctx, xi, j, ci, c, table):
    """ci[c:c + lanes] gets j plus the row of table (lane_table(lanes)) that the nonzero lanes of the
    vector xi[j:j + lanes] select, so the indices of its nonzeros first, in order; returns c plus their
    number. For the arrays the overload below passes it (xi a contiguous 1-D float array with
    xi[j:j + lanes] in bounds, ci a contiguous 1-D int32 array with ci[c:c + lanes] in bounds)."""
    lanes = _lanes(xi.dtype, VECTOR)

    def codegen(context, builder, signature, args):
        x_arr, j_val, c_arr, c_val, t_arr = args
        mask = _nonzero_lanes(context, builder, xi, x_arr, j_val, lanes)
        vty = ir.VectorType(ir.IntType(32), lanes)
        ts = context.make_array(table)(context, builder, t_arr)
        cs = context.make_array(ci)(context, builder, c_arr)
        row = builder.mul(builder.zext(builder.bitcast(mask, ir.IntType(lanes)), c_val.type),
                          ir.Constant(c_val.type, lanes))
        offsets = builder.load(builder.bitcast(builder.gep(ts.data, [row]), vty.as_pointer()), align=4)
        out = builder.bitcast(builder.gep(cs.data, [c_val]), vty.as_pointer())
        builder.store(_indices(builder, j_val, offsets, lanes), out, align=4)
        return _counted(builder, c_val, mask, lanes)
    return types.intp(xi, types.intp, ci, types.intp, table), codegen


@overload(nonzero_columns, inline='always')
def _nonzero_columns_compiled(xi, lo, hi, ci):
    vectors = ((COMPRESS or PACK) and isinstance(xi.dtype, types.Float) and ci.dtype == types.int32
               and xi.ndim == ci.ndim == 1 and xi.layout == ci.layout == 'C')
    if not vectors:
        return lambda xi, lo, hi, ci: _branch_free(xi, lo, hi, ci, 0)
    if COMPRESS:
        return lambda xi, lo, hi, ci: compressed_columns(xi, lo, hi, ci)
    table = lane_table(_lanes(xi.dtype, VECTOR))  # a constant of the compiled code
    return lambda xi, lo, hi, ci: packed_columns(xi, lo, hi, ci, table)


@njit(inline='always')
def compressed_columns(xi, lo, hi, ci):
    """nonzero_columns on AVX-512: a cache line at a time, then the rest."""
    lanes = CACHE_LINE // xi.itemsize
    c, j = 0, lo
    while j + lanes <= hi:
        c = _compress_line(xi, j, ci, c)
        j += lanes
    return _branch_free(xi, j, hi, ci, c)


@njit(inline='always')
def packed_columns(xi, lo, hi, ci, table):
    """nonzero_columns on AVX2, table = lane_table(VECTOR // xi.itemsize): a vector at a time, then the rest."""
    lanes = table.shape[1]
    c, j = 0, lo
    while j + lanes <= hi:  # then c + lanes <= j - lo + lanes <= hi - lo: the store stays in ci
        c = _pack_vector(xi, j, ci, c, table)
        j += lanes
    return _branch_free(xi, j, hi, ci, c)


@njit(inline='always')
def _branch_free(xi, j, hi, ci, c):
    """nonzero_columns from xi[j] up to hi, c found before j: writes every index, advances only past a nonzero."""
    for q in range(j, hi):
        ci[c] = q
        c += xi[q] != 0
    return c
