"""Elementwise activations, forward and backward, on 1-D (flattened) arrays.

Backward works from the saved *output* y of the activation (relu: y > 0, sigmoid: y (1 - y),
tanh: 1 - y^2), so forward never has to keep its input.
"""
import numpy as np
from numba import njit

IDENTITY, RELU, SIGMOID, TANH = 0, 1, 2, 3
ACTIVATION_CODES = {'identity': IDENTITY, None: IDENTITY, 'relu': RELU, 'sigmoid': SIGMOID, 'tanh': TANH}


@njit(inline='always')
def act(v, code):
    """The activation of one value; sigmoid split by sign so exp never overflows."""
    if code == RELU:
        return v if v > 0 else v * 0
    if code == SIGMOID:
        if v >= 0:
            return 1 / (1 + np.exp(-v))
        e = np.exp(v)
        return e / (1 + e)
    if code == TANH:
        return np.tanh(v)
    return v


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


@njit(cache=True)
def activation_forward(x, code):
    """y = act(x), elementwise, for a 1-D array."""
    y = np.empty_like(x)
    for i in range(x.shape[0]):
        y[i] = act(x[i], code)
    return y


@njit(cache=True)
def activation_backward(y, g, code):
    """g * act'(x) from the saved output y, elementwise, for 1-D arrays."""
    gx = np.empty_like(g)
    for i in range(g.shape[0]):
        gx[i] = g[i] * act_derivative(y[i], code)
    return gx
