"""Activations, forward and backward.

Forward of sigmoid and tanh runs on numpy's SIMD ufuncs (exp/tanh vectorised, unlike a
numba loop, which calls the scalar libm function per element); relu fuses into the numba loops.
Backward works from the saved *output* y (relu: y > 0, sigmoid: y (1 - y), tanh: 1 - y^2), so forward
never has to keep its input.
"""
import numpy as np
from numba import njit

from .jit import kernel

IDENTITY, RELU, SIGMOID, TANH = 0, 1, 2, 3
ACTIVATION_CODES = {'identity': IDENTITY, None: IDENTITY, 'relu': RELU, 'sigmoid': SIGMOID, 'tanh': TANH}


def activate_inplace(z, code):
    """Applies the activation to z in place and returns z (identity leaves it as it is)."""
    if code == SIGMOID:
        with np.errstate(over='ignore'):  # exp(-z) = inf for very negative z gives the right limit, 0
            np.negative(z, out=z)
            np.exp(z, out=z)
            z += 1
            np.reciprocal(z, out=z)
    elif code == TANH:
        np.tanh(z, out=z)
    elif code == RELU:
        np.maximum(z, 0, out=z)  # keeps NaN, as torch.relu
    return z


def activation_forward(x, code):
    """y = act(x), elementwise, as a new array."""
    return activate_inplace(np.array(x), code)


@njit(inline='always')
def act_derivative(y, code):
    """d act / d input, written in terms of the output y."""
    if code == RELU:
        return y * 0 + 1 if y > 0 else y * 0
    if code == SIGMOID:
        return y * (1 - y)
    if code == TANH:
        return 1 - y * y
    return y * 0 + 1


@kernel
def activation_backward(y, g, code):
    """g * act'(x) from the saved output y, elementwise, for 1-D arrays."""
    gx = np.empty_like(g)
    for i in range(g.shape[0]):
        gx[i] = g[i] * act_derivative(y[i], code)
    return gx


@njit(inline='always')
def activate(v, code):
    """act(v) for one value, for code that runs inside numba: sigmoid as 1 / (1 + exp(-v)), which overflows
    to the right limit, 0; relu keeps NaN, as np.maximum."""
    if code == SIGMOID:
        return 1 / (1 + np.exp(-v))
    if code == TANH:
        return np.tanh(v)
    if code == RELU:
        return v if not v < 0 else v * 0
    return v


@kernel
def activate_loop(x, z, code):
    """z = act(x) as a numba loop over C-contiguous arrays of one size (a compiled step's); x may be z, except
    for relu: written in place, relu stores only the entries it changes, and LLVM makes that a masked store,
    several times slower than storing them all (AMD's vmaskmovps)."""
    src, flat = x.reshape(-1), z.reshape(-1)
    if code == SIGMOID:  # a branch outside each loop, so that the relu loop vectorises
        for i in range(flat.shape[0]):
            flat[i] = activate(src[i], SIGMOID)
    elif code == TANH:
        for i in range(flat.shape[0]):
            flat[i] = activate(src[i], TANH)
    elif code == RELU:
        for i in range(flat.shape[0]):
            flat[i] = activate(src[i], RELU)
    return z
