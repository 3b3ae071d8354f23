"""Dense layers: y = act(x @ w.T + b) with w stored (out, in) as in vugrad and PyTorch.

Every matmul of a training step goes through numba's np.dot (SciPy's OpenBLAS), evaluation included:
mixing it with numpy's own BLAS in one loop makes the two thread pools fight (see DESIGN.md).
"""
import numpy as np

from .activations import IDENTITY, RELU, act_derivative, activate_inplace
from .jit import kernel


@kernel
def matmul(a, b):
    """a @ b for two C-contiguous 2-D arrays of one dtype."""
    return a @ b


@kernel
def affine(x, w, b, relu):
    """x (n, in), w (out, in), b (out,) -> x @ w.T + b, shape (n, out), with relu fused into the bias loop."""
    y = x @ w.T
    n, m = y.shape
    for i in range(n):
        for j in range(m):
            v = y[i, j] + b[j]
            y[i, j] = v if (v > 0 or not relu) else v * 0
    return y


def linear_forward(x, w, b, code):
    """act(x @ w.T + b): one numba kernel, then sigmoid/tanh in place on numpy's SIMD ufuncs."""
    y = affine(x, w, b, code == RELU)
    return y if code in (IDENTITY, RELU) else activate_inplace(y, code)


@kernel
def linear_backward(x, w, y, g, code, need_gx):
    """From g = dL/dy: returns (gx or an empty array, gw (out, in), gb (out,)).

    The activation derivative is taken from the saved output y and fused with the bias sum.
    """
    n, m = g.shape
    gb = np.zeros(m)  # float64 accumulator
    if code == IDENTITY:
        gz = g
        for i in range(n):
            for j in range(m):
                gb[j] += g[i, j]
    else:
        gz = np.empty_like(g)
        for i in range(n):
            for j in range(m):
                v = g[i, j] * act_derivative(y[i, j], code)
                gz[i, j] = v
                gb[j] += v
    gw = gz.T @ x
    gx = gz @ w if need_gx else g[:0, :0].copy()
    gb_out = np.empty_like(g[0])
    gb_out[:] = gb
    return gx, gw, gb_out
