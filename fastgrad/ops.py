"""The built-in Ops: one class per op, forward and backward side by side.

The maths lives here; the heavy lifting (matmuls, activations, softmax, cross-entropy) runs in the numba
kernels that backend.OP_KERNELS lists for each op, on arrays made ready by backend.prepare. Broadcasting
gradients are reduced by the framework (core._reduce_to_shape), so the elementwise ops return full-shape
gradients. No backward writes into a forward value.
"""
import numpy as np

from . import backend, kernels
from .backend import OP_KERNELS, prepare
from .core import Op, TensorNode, register_operators


# -- helpers shared by the ops
def _check_broadcast(op, a, b):
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f'{op}: shapes {a.shape} and {b.shape} do not broadcast') from None


def _check_ndim(op, name, x, ndim):
    if x.ndim != ndim:
        raise ValueError(f'{op}: {name} must have {ndim} dimensions, got shape {x.shape}')


def _matmul(a, b):
    """a @ b (2-D) through numba's BLAS, the one BLAS of the training step."""
    return OP_KERNELS['MatrixMultiply'].forward(*prepare(a, b))


def _rows(x):
    """x as a C-contiguous 2-D float array (n, last dimension), for the row-wise softmax kernels."""
    x = prepare(x)
    return x.reshape(-1, x.shape[-1]) if x.ndim != 1 else x.reshape(1, -1)


# -- elementwise arithmetic (numpy broadcasting)
class Add(Op):
    """a + b."""
    edits_goutputs = False
    broadcasts = True
    @staticmethod
    def forward(context, a, b):
        _check_broadcast('Add', a, b)
        return a + b

    @staticmethod
    def backward(context, go):
        return go, go


class Subtract(Op):
    """a - b."""
    edits_goutputs = False
    broadcasts = True
    @staticmethod
    def forward(context, a, b):
        _check_broadcast('Subtract', a, b)
        return a - b

    @staticmethod
    def backward(context, go):
        return go, -go


class Multiply(Op):
    """a * b, elementwise."""
    edits_goutputs = False
    broadcasts = True
    @staticmethod
    def forward(context, a, b):
        _check_broadcast('Multiply', a, b)
        context['a'], context['b'] = a, b
        return a * b

    @staticmethod
    def backward(context, go):
        need_a, need_b = context['needs_input_grad']
        a, b = context['a'], context['b']
        return (go * b if need_a else None), (go * a if need_b else None)


class Divide(Op):
    """a / b, elementwise."""
    edits_goutputs = False
    broadcasts = True
    @staticmethod
    def forward(context, a, b):
        _check_broadcast('Divide', a, b)
        context['a'], context['b'] = a, b
        return a / b

    @staticmethod
    def backward(context, go):
        need_a, need_b = context['needs_input_grad']
        a, b = context['a'], context['b']
        return (go / b if need_a else None), (-go * a / (b * b) if need_b else None)


# -- matrix products
class MatrixMultiply(Op):
    """a @ b; 2-D float operands go through the numba kernel, anything else through np.matmul."""
    edits_goutputs = False
    broadcasts = True
    @staticmethod
    def forward(context, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f'MatrixMultiply: cannot multiply shapes {a.shape} and {b.shape}')
        context['a'], context['b'] = a, b
        if a.ndim == 2 and b.ndim == 2:
            return _matmul(a, b)
        return np.matmul(a, b)

    @staticmethod
    def backward(context, go):
        need_a, need_b = context['needs_input_grad']
        a, b = context['a'], context['b']
        if a.ndim == 2 and b.ndim == 2:
            ga = _matmul(go, b.T) if need_a else None
            gb = _matmul(a.T, go) if need_b else None
        else:
            ga = np.matmul(go, np.swapaxes(b, -1, -2)) if need_a else None
            gb = np.matmul(np.swapaxes(a, -1, -2), go) if need_b else None
        return ga, gb


class BatchMM(Op):
    """vugrad's batch of matrix-vector products: matrix (m, f), vectors (n, f) -> vectors @ matrix.T, (n, m)."""
    edits_goutputs = False
    @staticmethod
    def forward(context, matrix, vectors):
        _check_ndim('BatchMM', 'matrix', matrix, 2)
        _check_ndim('BatchMM', 'vectors', vectors, 2)
        if matrix.shape[1] != vectors.shape[1]:
            raise ValueError(f'BatchMM: matrix {matrix.shape} does not fit vectors {vectors.shape}')
        context['matrix'], context['vectors'] = matrix, vectors
        return _matmul(vectors, matrix.T)

    @staticmethod
    def backward(context, go):
        need_m, need_v = context['needs_input_grad']
        matrix, vectors = context['matrix'], context['vectors']
        return (_matmul(go.T, vectors) if need_m else None), (_matmul(go, matrix) if need_v else None)


class Linear(Op):
    """act(x @ w.T + b), fused: x (n, in), w (out, in), b (out,) or (1, out); activation is one of
    None/'identity', 'relu', 'sigmoid', 'tanh'. x is cast to w's dtype (its gradient is cast back).
    Backward returns (dL/dx, dL/dw, dL/db) from the same kernels' backward, skipping dL/dx when x needs none.

    The kernels read w.T row by row: a weight made by `Linear.weight` is column-major, so that w.T needs
    no copy (any other layout works, copied once per call). An input that needs no gradient (the data)
    takes the sparse kernels when it is mostly zeros and the thread policy lets numba's threads run."""
    edits_goutputs = False
    @staticmethod
    def weight(values, dtype):
        """A new weight array (out, in) holding `values`, laid out as this op's kernels read it fastest."""
        return np.asfortranarray(values, dtype=dtype)

    @staticmethod
    def forward(context, x, w, b, activation=None):
        code = kernels.ACTIVATION_CODES.get(activation)
        if code is None:
            raise ValueError(f'Linear: unknown activation {activation!r}; use one of identity, relu, sigmoid, tanh')
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or b.size != w.shape[0]:
            _check_ndim('Linear', 'input', x, 2)
            _check_ndim('Linear', 'weight', w, 2)
            raise ValueError(f'Linear: input {x.shape}, weight {w.shape} (out, in) and bias {b.shape} do not fit')
        wt = prepare(w.T)
        x, b = prepare(x, dtype=wt.dtype), prepare(b, dtype=wt.dtype)
        sparse = not context['needs_input_grad'][0] and backend.sparse_allowed() and kernels.sparse_enough(x)
        y, nonzeros = OP_KERNELS['Linear'].forward(x, wt, b.reshape(-1), code, backend.sparse_parts() if sparse else 0)
        context['x'], context['wt'], context['y'], context['code'] = x, wt, y, code
        context['bshape'], context['nonzeros'] = b.shape, nonzeros
        return y

    @staticmethod
    def backward(context, go):
        need_x, need_w, need_b = context['needs_input_grad']
        x, wt = context['x'], context['wt']
        gx, gwt, gb = OP_KERNELS['Linear'].backward(x, wt, context['y'], prepare(go, dtype=context['y'].dtype),
                                                    context['code'], need_x, context['nonzeros'],
                                                    backend.numba_parts(x.shape[0] * wt.size))
        return gx, (gwt.T if need_w else None), (gb.reshape(context['bshape']) if need_b else None)


# -- reductions and shapes
class Sum(Op):
    """Sum over all elements (vugrad's), or over `axis`; backward spreads the gradient back."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, axis=None, keepdims=False):
        context.update(shape=x.shape, axis=axis, keepdims=keepdims)
        return np.asarray(x.sum(axis=axis, keepdims=keepdims))

    @staticmethod
    def backward(context, go):
        shape, axis = context['shape'], context['axis']
        if axis is not None and not context['keepdims']:
            go = np.expand_dims(go, axis)
        return np.broadcast_to(go, shape).copy()


class Normalize(Op):
    """Divides each row of a matrix by its sum."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x):
        sumd = x.sum(axis=1, keepdims=True)
        context['x'], context['sumd'] = x, sumd
        return x / sumd

    @staticmethod
    def backward(context, go):
        x, sumd = context['x'], context['sumd']
        return go / sumd - (go * x / (sumd * sumd)).sum(axis=1, keepdims=True)


class Expand(Op):
    """Repeats a singleton dimension `dim` `repeats` times (explicit broadcasting); backward sums it back."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, *, dim, repeats):
        if x.shape[dim] != 1:
            raise ValueError(f'Expand: can only expand a singleton dimension; dimension {dim} of shape {x.shape} is not')
        context['dim'] = dim
        return np.repeat(x, repeats, axis=dim)

    @staticmethod
    def backward(context, go):
        return go.sum(axis=context['dim'], keepdims=True)


class Select(Op):
    """Picks one element per row: x (n, m), indices (n,) -> x[i, indices[i]], shape (n,)."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, *, indices):
        indices = np.asarray(indices)
        _check_ndim('Select', 'input', x, 2)
        if indices.shape != (x.shape[0],):
            raise ValueError(f'Select: indices of shape {indices.shape} do not fit input {x.shape}')
        if indices.dtype.kind not in 'iu':
            raise ValueError(f'Select: indices must be integers, not {indices.dtype}')
        if indices.size and (indices.min() < 0 or indices.max() >= x.shape[1]):  # numpy would wrap -1 silently
            bad = indices[(indices < 0) | (indices >= x.shape[1])]
            raise ValueError(f'Select: indices must be in [0, {x.shape[1]}) for input {x.shape}, got {bad[0]}')
        rows = np.arange(x.shape[0])
        context.update(shape=x.shape, rows=rows, indices=indices)
        return x[rows, indices]

    @staticmethod
    def backward(context, go):
        g = np.zeros(context['shape'], dtype=go.dtype)
        g[context['rows'], context['indices']] = go
        return g


class Squeeze(Op):
    """Removes singleton dimension `dim`."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, dim=0):
        context['dim'] = dim
        return x.squeeze(dim)

    @staticmethod
    def backward(context, go):
        return np.expand_dims(go, axis=context['dim'])


class Unsqueeze(Op):
    """Inserts a singleton dimension at `dim`."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, dim=0):
        context['dim'] = dim
        return np.expand_dims(x, axis=dim)

    @staticmethod
    def backward(context, go):
        return go.squeeze(context['dim'])


class Reshape(Op):
    """x.reshape(shape)."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, *, shape):
        context['shape'] = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f'Reshape: cannot reshape {x.shape} into {tuple(shape)}') from None

    @staticmethod
    def backward(context, go):
        return go.reshape(context['shape'])


class Transpose(Op):
    """x.transpose(axes); reverses the dimensions by default."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, axes=None):
        context['axes'] = axes
        return x.transpose(axes)

    @staticmethod
    def backward(context, go):
        axes = context['axes']
        return go.transpose(None if axes is None else np.argsort(axes))


# -- elementwise functions
class Exp(Op):
    """exp(x)."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x):
        context['expd'] = np.exp(x)
        return context['expd']

    @staticmethod
    def backward(context, go):
        return go * context['expd']


class Log(Op):
    """Natural logarithm."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x):
        context['x'] = x
        return np.log(x)

    @staticmethod
    def backward(context, go):
        return go / context['x']


class _Activation(Op):
    """An elementwise activation run by its op_kernels (which a subclass inherits); backward uses the saved output."""
    edits_goutputs = False
    code = kernels.IDENTITY

    @classmethod
    def forward(cls, context, x):
        context['y'] = y = cls.op_kernels.forward(x if x.dtype.kind == 'f' else prepare(x), cls.code)
        return y

    @classmethod
    def backward(cls, context, go):
        y = context['y']
        g = prepare(go, dtype=y.dtype)
        return cls.op_kernels.backward(y.reshape(-1), g.reshape(-1), cls.code).reshape(y.shape)


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), computed without overflow."""
    code = kernels.SIGMOID
    op_kernels = OP_KERNELS['Sigmoid']


class ReLU(_Activation):
    """max(0, x); the gradient at 0 is 0, as in PyTorch."""
    code = kernels.RELU
    op_kernels = OP_KERNELS['ReLU']


class Tanh(_Activation):
    """tanh(x)."""
    code = kernels.TANH
    op_kernels = OP_KERNELS['Tanh']


# -- softmax family (over the last dimension)
def _check_columns(op, x):
    if x.ndim == 0:
        raise ValueError(f'{op}: runs over the last dimension; the input is a scalar (shape ())')
    if x.shape[-1] == 0:
        raise ValueError(f'{op}: runs over the last dimension, which has 0 columns here: input of shape {x.shape}')


class Softmax(Op):
    """softmax over the last dimension, shifted by the maximum (stable for logits of +-1e4)."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x):
        _check_columns('Softmax', x)
        context['y'] = y = OP_KERNELS['Softmax'].forward(_rows(x)).reshape(x.shape)
        return y

    @staticmethod
    def backward(context, go):
        y = context['y']
        return y * (go - (go * y).sum(axis=-1, keepdims=True))


class LogSoftmax(Op):
    """log softmax over the last dimension, via log-sum-exp."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x):
        _check_columns('LogSoftmax', x)
        context['logp'] = logp = OP_KERNELS['LogSoftmax'].forward(_rows(x))
        return logp.reshape(x.shape)

    @staticmethod
    def backward(context, go):
        logp = context['logp']
        return OP_KERNELS['LogSoftmax'].backward(logp, prepare(go, dtype=logp.dtype).reshape(logp.shape)).reshape(go.shape)


class CrossEntropy(Op):
    """Softmax cross-entropy of logits (n, classes) against integer targets (n,), in one kernel;
    reduction 'mean' or 'sum'. Forward keeps the probabilities; backward is (p - onehot) scaled."""
    edits_goutputs = False
    @staticmethod
    def forward(context, logits, *, targets, reduction='mean'):
        targets = np.asarray(targets)
        _check_ndim('CrossEntropy', 'logits', logits, 2)
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"CrossEntropy: reduction must be 'mean' or 'sum', not {reduction!r}")
        if targets.shape != (logits.shape[0],) or targets.dtype.kind not in 'iu':
            raise ValueError(f'CrossEntropy: targets must be integers of shape ({logits.shape[0]},) '
                             f'for logits {logits.shape}, got {targets.dtype} {targets.shape}')
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        logits = prepare(logits)
        total, probs, bad = OP_KERNELS['CrossEntropy'].forward(logits, targets)
        if bad >= 0:
            raise ValueError(f'CrossEntropy: targets must lie in [0, {logits.shape[1]}), '
                             f'got {targets[bad]} at position {bad}')
        scale = 1.0 / max(logits.shape[0], 1) if reduction == 'mean' else 1.0
        context['probs'], context['targets'], context['scale'] = probs, targets, scale
        return np.array(total * scale, dtype=logits.dtype)

    @staticmethod
    def backward(context, go):
        return OP_KERNELS['CrossEntropy'].backward(context['probs'], context['targets'], float(go) * context['scale'])


# -- indexing, reductions and elementwise maths that TensorNode's methods and operators reach
def index_key(key):
    """An index with any TensorNode in it replaced by its array (nodes as indices carry no gradient)."""
    if isinstance(key, tuple):
        return tuple(k.value if isinstance(k, TensorNode) else k for k in key)
    return key.value if isinstance(key, TensorNode) else key


def _is_basic(key):
    """Whether numpy treats the index as basic (ints, slices, None, ...): each element picked at most once."""
    parts = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (slice, int, np.integer)) and not isinstance(k, bool)
               for k in parts)


class Index(Op):
    """x[key] with numpy's indexing (ints, slices, None, ..., integer or boolean arrays); backward scatters
    the gradient back into zeros of x's shape, adding up where an index repeats."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, *, key):
        key = index_key(key)
        context['shape'], context['key'] = x.shape, key
        return np.asarray(x[key])

    @staticmethod
    def backward(context, go):
        key = context['key']
        g = np.zeros(context['shape'], dtype=go.dtype)
        if _is_basic(key):
            g[key] = go
        else:
            np.add.at(g, key, go)
        return g


def _keep_axes(go, shape, axis, keepdims):
    """The gradient of a reduction over `axis` with the reduced axes put back (as size 1)."""
    if axis is None:
        return go.reshape((1,) * len(shape))
    return go if keepdims else np.expand_dims(go, axis)


class Mean(Op):
    """The mean over all elements or over `axis` (an int or a tuple); backward spreads go / count back."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, axis=None, keepdims=False):
        y = np.asarray(x.mean(axis=axis, keepdims=keepdims))
        context.update(shape=x.shape, axis=axis, keepdims=keepdims, count=x.size // max(y.size, 1) if x.size else 0)
        return y

    @staticmethod
    def backward(context, go):
        g = _keep_axes(go, context['shape'], context['axis'], context['keepdims'])
        return np.broadcast_to(g / max(context['count'], 1), context['shape']).copy()


class Max(Op):
    """The maximum over all elements or over `axis`; backward splits the gradient evenly between the
    elements that tie for the maximum (as torch.amax), NaNs counting as the maximum they produce."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x, axis=None, keepdims=False):
        if x.size == 0:
            raise ValueError(f'Max: the maximum of an empty array (shape {x.shape}) is undefined')
        top = x.max(axis=axis, keepdims=True)
        context.update(x=x, top=top, axis=axis, keepdims=keepdims)
        if keepdims:
            return top
        return top.reshape(()) if axis is None else np.squeeze(top, axis=axis)

    @staticmethod
    def backward(context, go):
        x, top = context['x'], context['top']
        mask = (x == top) | (np.isnan(x) & np.isnan(top))
        count = mask.sum(axis=context['axis'], keepdims=True)
        g = _keep_axes(go, x.shape, context['axis'], context['keepdims'])
        return np.where(mask, g / count, 0).astype(go.dtype, copy=False)


class Abs(Op):
    """|x|; the gradient at 0 is 0, as in PyTorch."""
    edits_goutputs = False
    @staticmethod
    def forward(context, x):
        context['x'] = x
        return np.abs(x)

    @staticmethod
    def backward(context, go):
        return go * np.sign(context['x'])


class Power(Op):
    """a ** b, elementwise (numpy broadcasting). d/da = b a^(b-1) (0 where b is 0); d/db = a^b log a
    (0 where a is 0 and b >= 0, NaN for a negative base, as in PyTorch)."""
    edits_goutputs = False
    broadcasts = True
    @staticmethod
    def forward(context, a, b):
        _check_broadcast('Power', a, b)
        y = np.power(a, b)
        context['a'], context['b'], context['y'] = a, b, y
        return y

    @staticmethod
    def backward(context, go):
        need_a, need_b = context['needs_input_grad']
        a, b, y = context['a'], context['b'], context['y']
        ga = gb = None
        with np.errstate(divide='ignore', invalid='ignore'):
            if need_a:
                ga = go * np.where(b == 0, 0, b * np.power(a, b - 1))
            if need_b:
                gb = go * np.where((a == 0) & (b >= 0), 0, y * np.log(a))
        return ga, gb


register_operators(Add=Add, Subtract=Subtract, Multiply=Multiply, Divide=Divide, MatrixMultiply=MatrixMultiply,
                   Sum=Sum, Transpose=Transpose, Reshape=Reshape, Index=Index, Mean=Mean, Max=Max, Abs=Abs,
                   Power=Power, Exp=Exp, Log=Log, Sigmoid=Sigmoid, ReLU=ReLU, Tanh=Tanh, Softmax=Softmax,
                   LogSoftmax=LogSoftmax)
