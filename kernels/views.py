"""flat(a): a C-contiguous array as a 1-D view of the same memory, for compiled steps.

numba's reshape calls a C helper (numba_attempt_nocopy_reshape) for every reshape, whatever the layout;
a compiled step of a small network flattens each parameter, gradient and state for its update, so those
calls are a few per cent of its time. For a C-contiguous array the view needs no search: its shape is
(size,) and its stride the item size. `flat` is the Python definition (it runs as written under
NUMBA_DISABLE_JIT); compiled code gets the overload below.
"""
from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload


def flat(a):
    """a.reshape(-1): for a C-contiguous a, a view of its memory."""
    return a.reshape(-1)


@intrinsic
def _flat_view(typingctx, a):
    """The 1-D view of a C-contiguous array."""
    view = a.copy(ndim=1, layout='C')

    def codegen(context, builder, signature, args):
        src = context.make_array(a)(context, builder, args[0])
        out = context.make_array(view)(context, builder)
        cgutils.copy_struct(out, src, {'shape': cgutils.pack_array(builder, [src.nitems]),
                                       'strides': cgutils.pack_array(builder, [src.itemsize])})
        return impl_ret_borrowed(context, builder, view, out._getvalue())
    return view(a), codegen


@overload(flat, inline='always')
def _flat_compiled(a):
    if isinstance(a, types.Array) and a.layout == 'C':
        return lambda a: _flat_view(a)
    return lambda a: a.reshape(-1)
