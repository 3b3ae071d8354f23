"""numba kernels for fastgrad's hot paths.

Plain functions on contiguous numpy arrays (float32 or float64); nothing here imports fastgrad.
Activations are chosen by a small integer code so that one compiled kernel serves all of them.
"""
from .activations import IDENTITY, RELU, SIGMOID, TANH, ACTIVATION_CODES, activation_forward, activation_backward
from .blas import matmul, limit_scipy_blas, scipy_blas
from .linear import linear_forward, linear_backward, sparse_enough
from .softmax import softmax, log_softmax, log_softmax_backward, cross_entropy_forward, cross_entropy_backward
from .optim import sgd_step, adam_step

__all__ = [
    'IDENTITY', 'RELU', 'SIGMOID', 'TANH', 'ACTIVATION_CODES', 'activation_forward', 'activation_backward',
    'matmul', 'limit_scipy_blas', 'scipy_blas', 'linear_forward', 'linear_backward', 'sparse_enough',
    'softmax', 'log_softmax', 'log_softmax_backward', 'cross_entropy_forward', 'cross_entropy_backward',
    'sgd_step', 'adam_step',
]
