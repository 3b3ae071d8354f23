"""numba kernels for fastgrad's hot paths (installed as fastgrad.kernels).

Plain functions on contiguous numpy arrays (float32 or float64); nothing here imports fastgrad, and
nothing here decides how many threads to use: parallel kernels take that as an argument.
Activations are chosen by a small integer code so that one compiled kernel serves all of them.
"""
from .activations import (IDENTITY, RELU, SIGMOID, TANH, ACTIVATION_CODES, activation_forward, activation_backward,
                          activate_loop)
from .blas import matmul
from .linear import linear_forward, linear_backward, sparse_enough
from .softmax import softmax, log_softmax, log_softmax_backward, cross_entropy_forward, cross_entropy_backward
from .optim import RULES, update
from .conv import conv2d_forward, conv2d_backward, maxpool2d_forward, maxpool2d_backward

__all__ = [
    'IDENTITY', 'RELU', 'SIGMOID', 'TANH', 'ACTIVATION_CODES', 'activation_forward', 'activation_backward',
    'activate_loop',
    'matmul', 'linear_forward', 'linear_backward', 'sparse_enough',
    'softmax', 'log_softmax', 'log_softmax_backward', 'cross_entropy_forward', 'cross_entropy_backward',
    'RULES', 'update',
    'conv2d_forward', 'conv2d_backward', 'maxpool2d_forward', 'maxpool2d_backward',
]
