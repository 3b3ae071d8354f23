"""vugrad.ops: fastgrad's ops under vugrad's names, and the three ops fastgrad has no use for itself."""
import numpy as np

from ..ops import Log, Exp, Sum, Normalize, BatchMM, Sigmoid, Expand, Select, Squeeze, Unsqueeze
from .core import Op


def _check_matrix(op, x):
    if x.ndim != 2:
        raise ValueError(f'{op}: input must be a matrix (2 dimensions), got shape {x.shape}')


class Id(Op):
    """x, as a node of its own (for building and debugging graphs); backward passes the gradient on."""
    edits_goutputs = False

    @staticmethod
    def forward(context, x):
        return x

    @staticmethod
    def backward(context, go):
        return go


class RowMax(Op):
    """Row-wise maximum: x (n, m) -> (n,); backward sends each row's gradient to that row's (first) maximum."""
    edits_goutputs = False

    @staticmethod
    def forward(context, x):
        _check_matrix('RowMax', x)
        context['xshape'] = x.shape  # the key RowSum.backward reads too, as in vugrad
        context['idxs'] = idxs = np.argmax(x, axis=1)
        return x[np.arange(x.shape[0]), idxs]

    @staticmethod
    def backward(context, go):
        gx = np.zeros(context['xshape'], dtype=go.dtype)
        gx[np.arange(gx.shape[0]), context['idxs']] = go
        return gx


class RowSum(Op):
    """Row-wise sum: x (n, m) -> (n,); backward copies each row's gradient to the row's m elements."""
    edits_goutputs = False

    @staticmethod
    def forward(context, x):
        _check_matrix('RowSum', x)
        context['xshape'] = x.shape
        return x.sum(axis=1)

    @staticmethod
    def backward(context, go):
        return np.repeat(go[:, None], context['xshape'][1], axis=1)
